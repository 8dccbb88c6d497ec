"""Stages running at once (`dvc queue start -j 2`) on a new local SQLite store: each process opens
it, logs a run, and none fails on the other's table creation."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.support import ROOT, command_env

PROCESSES = 4
STAGE = """
import sys, time
from pathlib import Path
from imgpipe.params import TrackingParams
from imgpipe.tracking.connection import open_store

go = Path(sys.argv[1])
Path(sys.argv[2]).touch()
while not go.exists():  # all processes have imported mlflow: open the store at the same moment
    time.sleep(0.01)
store = open_store(TrackingParams(experiment="parallel", uri=None, on_unreachable="fail"))
run = store.start_run(model_name="dense", dataset="digits", data_hash="0" * 16, params={"i": 1})
run.log_metrics({"accuracy": 0.5})
run.finish()
assert run.failure is None, run.failure
"""


def test_parallel_stages_create_and_share_a_new_sqlite_store(tmp_path: Path) -> None:
    go = tmp_path / "go"
    env = {**command_env(), "DVC_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", STAGE, str(go), str(tmp_path / f"ready-{index}")],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(PROCESSES)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < PROCESSES and time.monotonic() < deadline:
        time.sleep(0.1)
    go.touch()
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("parallel")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == PROCESSES and len({r.info.run_id for r in runs}) == PROCESSES
    assert all(r.info.status == "FINISHED" for r in runs)
