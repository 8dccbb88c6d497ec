"""Stages killed with SIGKILL leave no partial outputs, and an interrupted train resumes exactly.

The stages run as real subprocesses (the commands dvc.yaml runs) and are killed once their own
progress shows they are mid-way: a checkpoint on disk for train, a finished table in the staging
folder for tabulate.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgpipe.runtime import atomic_directory
from imgpipe.splitting import SPLITS
from imgpipe.tables import read_table
from tests.support import (
    checkout_env,
    checkpoint_epochs,
    data_stage_params,
    histories_of_equal_models,
    kill_midway,
    kill_when,
    load_repo_params,
    resume_and_train_straight,
    run_stage_subprocess,
    start_stage,
    write_train_project,
)

# --------------------------------------------------------------------------- atomic_directory

_REWRITER = """
import sys
from pathlib import Path
from imgpipe.runtime import atomic_directory
target = Path(sys.argv[1])
generation = 0
while True:
    generation += 1
    with atomic_directory(target) as staging:
        for index in range(20):
            (staging / f"{index:02d}.txt").write_text(f"{generation}\\n" * 200)
"""


@pytest.mark.slow
def test_atomic_directory_survives_sigkill_at_any_moment(tmp_path: Path) -> None:
    """A process rewriting a folder in a loop, killed at random moments: the folder is always
    absent or one whole generation, never a mix or a part."""
    target = tmp_path / "out"
    rng = np.random.default_rng(0)
    complete_seen = 0
    for attempt in range(8):
        process = subprocess.Popen(
            [sys.executable, "-c", _REWRITER, str(target)], env=checkout_env(), cwd=tmp_path
        )
        time.sleep(0.3 + float(rng.uniform(0, 0.3)))  # start-up, then a random moment
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        if not target.exists():
            assert attempt == 0 or not complete_seen, "a complete folder vanished"
            continue
        files = sorted(target.iterdir())
        assert [p.name for p in files] == [f"{i:02d}.txt" for i in range(20)]
        generations = {p.read_text() for p in files}
        assert len(generations) == 1, "files from different runs mixed in one folder"
        complete_seen += 1
    assert complete_seen >= 6
    # the next writer sweeps any debris of a killed one away
    with atomic_directory(target) as staging:
        (staging / "final.txt").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_keeps_the_old_output_when_the_block_fails(tmp_path: Path) -> None:
    target = tmp_path / "tables"
    with atomic_directory(target) as staging:
        (staging / "a.parquet").write_text("old")
    with pytest.raises(RuntimeError, match="killed"), atomic_directory(target) as staging:
        (staging / "a.parquet").write_text("new, half written")
        raise RuntimeError("killed")
    assert (target / "a.parquet").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tables"]


# --------------------------------------------------------------------------- tabulate

TABULATE_VIEWS = {
    "gray8": {"height": 8, "width": 8, "color": "grayscale"},
    "rgb8": {"height": 8, "width": 8, "color": "rgb"},
}


@pytest.mark.slow
def test_tabulate_killed_midway_leaves_the_old_tables_and_reruns_cleanly(
    tmp_path: Path, image_factory: Callable[[str, int], bytes], tree_writer: Callable
) -> None:
    files = {}
    for split_name in SPLITS:
        for label in ("cat", "dog"):
            for index in range(150 if split_name == "train" else 60):
                files[f"{split_name}/{label}/{index:03d}.png"] = image_factory(
                    "gray.png", len(files)
                )
    tree_writer(tmp_path / "split", files)
    # many small chunks: a slow stage
    params = data_stage_params(TABULATE_VIEWS, workers=1, rows_per_group=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = ["stages.tabulate", "--split", "split", "--out", "tables"]

    # an earlier complete output, as after a previous run (made from half the images)
    for path in list((tmp_path / "split").rglob("1??.png")):
        path.rename(path.with_name(f"x{path.name}"))
    run_stage_subprocess(command, tmp_path, tmp_path / "first.log")
    old = {p: p.read_bytes() for p in (tmp_path / "tables").rglob("*.parquet")}
    assert len(old) == 6
    for path in list((tmp_path / "split").rglob("x1??.png")):
        path.rename(path.with_name(path.name[1:]))

    staging = tmp_path / ".tables.partial"
    process = start_stage(command, tmp_path, tmp_path / "killed.log")
    kill_when(process, lambda: (staging / "gray8" / "train.parquet").exists(), timeout=120)
    # killed after its first table was complete: the output is still the old, complete one
    assert {p: p.read_bytes() for p in (tmp_path / "tables").rglob("*.parquet")} == old
    assert not list((tmp_path / "tables").rglob("*partial*"))

    run_stage_subprocess(command, tmp_path, tmp_path / "rerun.log")
    assert not staging.exists()
    for view in ("gray8", "rgb8"):
        for split_name in SPLITS:
            table = read_table(tmp_path / "tables" / view / f"{split_name}.parquet")
            expected = [p.split("/", 1)[1] for p in files if p.startswith(f"{split_name}/")]
            assert sorted(table.sources) == sorted(expected)


# --------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def train_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with digit tables and params for a dense model that trains in a few seconds."""
    params = load_repo_params()
    params["views"] = {"gray8": {"height": 8, "width": 8, "color": "grayscale"}}
    params["models"] = {"dense": "gray8", "cnn": "gray8", "numpy_mlp": "gray8"}
    params["dense"].update(hidden_units=[256, 128], epochs=10, learning_rate=0.005, batch_size=32)
    return write_train_project(tmp_path_factory.mktemp("train"), params)


@pytest.mark.slow
def test_killed_training_resumes_and_ends_exactly_like_an_uninterrupted_run(
    train_project: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    project = train_project
    checkpoint = kill_midway(project)

    # item 4: nothing under the output name that a later run could take for a model
    assert not (project / "models" / "dense").exists()
    state = json.loads((checkpoint / "state.json").read_text())
    killed_at = state["epochs_done"]
    assert 3 <= killed_at < 10
    run_id = state["extra"]["run_id"]

    output, _ = resume_and_train_straight(project)
    assert f"resuming from checkpoint checkpoints/dense after epoch {killed_at} of 10" in output
    assert not checkpoint.exists(), "the checkpoint must go once the model is saved"

    resumed, straight = histories_of_equal_models(project)
    assert resumed["resumed_from_epoch"] == killed_at
    assert straight["resumed_from_epoch"] == 0
    assert resumed["history"] == straight["history"]  # exactly, every epoch, every metric

    # the resumed training logged into the same MLflow run, every epoch once at least
    assert (
        json.loads((project / "models" / "dense" / "mlflow_run.json").read_text())["run_id"]
        == run_id
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    steps = {m.step for m in client.get_metric_history(run_id, "val_loss")}
    assert steps == set(range(10))
    assert client.get_run(run_id).data.params["dense.epochs"] == "10"


@pytest.fixture(scope="module")
def two_device_project(tmp_path_factory: pytest.TempPathFactory, train_project: Path) -> Path:
    """train_project's tables and params, training on the CPU split into two devices."""
    params = yaml.safe_load((train_project / "params.yaml").read_text())
    params["train"]["devices"] = 2
    return write_train_project(tmp_path_factory.mktemp("two_devices"), params)


@pytest.mark.slow
def test_killed_two_device_training_resumes_and_ends_like_an_uninterrupted_run(
    two_device_project: Path,
) -> None:
    project = two_device_project
    killed_at = checkpoint_epochs(kill_midway(project))
    assert 3 <= killed_at < 10

    output, straight_output = resume_and_train_straight(project)
    assert "training data-parallel on 2 devices (/cpu:0, /cpu:1) with MirroredStrategy" in output
    assert f"resuming from checkpoint checkpoints/dense after epoch {killed_at} of 10" in output
    assert "global batch 32, 16 per device" in straight_output

    resumed, straight = histories_of_equal_models(project)
    assert resumed["resumed_from_epoch"] == killed_at
    assert resumed["choices"]["replicas"] == straight["choices"]["replicas"] == 2
    # the checkpoint's arrays went back into both devices' copies (weights, Adam's slots, the
    # dropout and flip seed states): the same batches, draws and updates as without a stop
    assert resumed["history"] == straight["history"]
