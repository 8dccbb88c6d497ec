"""A grid sweep as docs/team.md shows it: `dvc exp run --queue` with DVC's grid syntax (two
learning rates x two epoch counts of numpy_mlp) and `dvc queue start -j 2`, in a temporary
project of raw digits; each grid point lands once in `dvc exp show` and once in MLflow, the best
one is promoted with `imgpipe-promote --exp`, and the MLflow UI compares the sweep in headless
Chromium (`IMGPIPE_UPDATE_SCREENSHOT=1` refreshes docs/sweep-compare.png)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import BIN, ROOT, command_env, free_port, run
from tests.team_support import (
    chromium_paths,
    make_project,
    mlflow_compare_view,
    refresh_screenshot,
    serving,
)

MODEL = "numpy_mlp"
GRID = {"learning_rate": ("0.001", "0.003"), "epochs": ("2", "3")}
SCREENSHOT = ROOT / "docs" / "sweep-compare.png"

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Sweep:
    """The project after its baseline `dvc repro` and the grid's four queued experiments."""

    origin: Path
    names: list[str]
    env: dict[str, str]


def wait_for_queue(origin: Path, env: dict[str, str], timeout: float = 900) -> str:
    """`dvc queue status` once nothing is queued or running and no worker is left."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(["dvc", "queue", "status"], origin, env)
        idle = re.search(r"Worker status: 0 active, 0 idle", status)
        if idle and not re.search(r"\b(Queued|Running)\b", status):
            return status
        assert time.monotonic() < deadline, f"queue not done after {timeout} s:\n{status}"
        time.sleep(3)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """Raw digits, numpy_mlp only, logging to the project's mlflow.db; then the grid."""
    origin = tmp_path_factory.mktemp("sweep")
    make_project(origin, models=(MODEL,))
    env = command_env()
    run(["dvc", "repro"], origin, env)
    run(["git", "add", "-A"], origin, env)
    run(["git", "commit", "-q", "-m", "dvc repro"], origin, env)
    grid = [f"{MODEL}.{key}={','.join(values)}" for key, values in GRID.items()]
    queued = run(["dvc", "exp", "run", "--queue", "-S", grid[0], "-S", grid[1]], origin, env)
    names = re.findall(r"Queued experiment '([^']+)'", queued)
    run(["dvc", "queue", "start", "-j", "2"], origin, env)
    status = wait_for_queue(origin, env)
    for name in names:
        line = next(line for line in status.splitlines() if f" {name} " in f" {line} ")
        assert "Success" in line, f"{name}:\n{run(['dvc', 'queue', 'logs', name], origin, env)}"
    return Sweep(origin, names, env)


def shown(sweep: Sweep) -> dict[str, dict]:
    """{experiment name: (its numpy_mlp params, its metrics)} as `dvc exp show --json` says."""
    rows = {}
    for baseline in json.loads(run(["dvc", "exp", "show", "--json"], sweep.origin, sweep.env)):
        for experiment in baseline.get("experiments") or []:
            for revision in experiment["revs"]:
                data = revision["data"]
                rows[revision["name"]] = (
                    data["params"]["params.yaml"]["data"][MODEL],
                    data["metrics"][f"metrics/{MODEL}.json"]["data"],
                )
    return rows


def test_each_grid_point_lands_once_in_dvc_and_in_mlflow(sweep: Sweep) -> None:
    from mlflow.tracking import MlflowClient

    assert len(sweep.names) == 4  # the grid: 2 learning rates x 2 epoch counts
    rows = shown(sweep)
    assert sorted(rows) == sorted(sweep.names)
    points = {(str(params["learning_rate"]), str(params["epochs"])) for params, _ in rows.values()}
    assert points == set(itertools.product(*GRID.values()))
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep.origin / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("imgpipe")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert len(runs) == 1 + len(sweep.names)  # the baseline and one per grid point
    for name, (params, metrics) in rows.items():
        (found,) = [r for r in runs if r.data.tags.get("dvc_experiment") == name]
        assert found.data.params[f"{MODEL}.learning_rate"] == str(params["learning_rate"])
        assert found.data.params[f"{MODEL}.epochs"] == str(params["epochs"])
        assert found.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
        assert found.info.status == "FINISHED"
        contexts = {
            entry.dataset.name: [tag.value for tag in entry.tags]
            for entry in found.inputs.dataset_inputs
        }  # the tables it read: train's two and evaluate's one
        assert contexts == {
            "gray16/train": ["training"],
            "gray16/val": ["validation"],
            "gray16/test": ["test"],
        }


def test_the_best_grid_point_is_compared_with_the_champion(sweep: Sweep) -> None:
    first = run(["imgpipe-promote", MODEL], sweep.origin, sweep.env)  # the workspace's run
    assert "first champion" in first
    rows = shown(sweep)
    best = max(rows, key=lambda name: rows[name][1]["accuracy"])
    result = subprocess.run(
        ["imgpipe-promote", MODEL, "--exp", best],
        cwd=sweep.origin, env=sweep.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode in (0, 1), output  # promoted, or refused as not significantly better
    assert "on 30 test images" in output and "McNemar's exact p = " in output
    assert ("promoted run" in output) == (result.returncode == 0)


@pytest.fixture(scope="module")
def mlflow_ui(sweep: Sweep) -> Iterator[str]:
    """`mlflow ui` on the project's store, on a free port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{sweep.origin}/mlflow.db"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**sweep.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with serving(args, cwd=sweep.origin, env=env, ready_url=f"{url}/health", timeout=240):
        yield url


def test_mlflow_ui_compares_the_sweep_in_headless_chromium(
    sweep: Sweep, mlflow_ui: str, tmp_path: Path
) -> None:
    chromium_paths()  # skipped (or failed under CI) before any work when there is no browser
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{sweep.origin / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("imgpipe").experiment_id
    runs = [r for r in client.search_runs([experiment_id]) if r.data.tags.get("dvc_experiment")]
    query = urllib.parse.urlencode(
        {"runs": json.dumps([r.info.run_id for r in runs], separators=(",", ":")),
         "experiments": json.dumps([experiment_id])}, quote_via=urllib.parse.quote,
    )  # fmt: skip
    page = f"{mlflow_ui}/#/compare-runs?{query}"
    texts = [*(r.info.run_name for r in runs), f"{MODEL}.learning_rate", f"{MODEL}.epochs"]
    shot = tmp_path / "sweep-compare.png"
    not_shown = mlflow_compare_view(page, texts, shot, "1400,1100")
    assert not not_shown, f"not visible on {page}: {not_shown} (see {shot})"
    refresh_screenshot(shot, SCREENSHOT)  # docs/sweep-compare.png
