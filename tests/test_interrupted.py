"""Stages killed with SIGKILL leave no partial outputs, and an interrupted train resumes exactly.

The stages run as real subprocesses (the commands dvc.yaml runs) and are killed once their own
progress shows they are mid-way: a checkpoint on disk for train, a finished table in the staging
folder for tabulate.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

from imgpipe.runtime import atomic_directory
from imgpipe.splitting import SPLITS
from imgpipe.tables import TableWriter, read_table, record_batch, table_schema

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def stage_env() -> dict[str, str]:
    """The environment a stage subprocess runs in: this checkout importable, no outside store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["CI"] = "1"  # one Keras line per epoch instead of progress bars
    return env


def start_stage(args: list[str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """Start `python -m stages.<stage> ...` in its own process group, logging to a file."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=cwd,
            env=stage_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so that killpg reaches its worker processes too
        )


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float) -> None:
    """SIGKILL the process group as soon as ready() is true; fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the stage ended (exit {process.returncode}) before it could be killed")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("the stage made no progress in time")
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def run_stage(args: list[str], cwd: Path, log_path: Path) -> str:
    """Run a stage to completion; return its output."""
    process = start_stage(args, cwd, log_path)
    code = process.wait(timeout=600)
    output = log_path.read_text(errors="replace")
    assert code == 0, output[-4000:]
    return output


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
            [sys.executable, "-c", _REWRITER, str(target)], env=stage_env(), cwd=tmp_path
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
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "a.parquet").write_text("new, half written")
        raise RuntimeError("killed")
    assert (target / "a.parquet").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tables"]


# --------------------------------------------------------------------------- tabulate


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
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["views"] = {
        "gray8": {"height": 8, "width": 8, "color": "grayscale"},
        "rgb8": {"height": 8, "width": 8, "color": "rgb"},
    }
    params["models"] = {"dense": "gray8", "cnn": "rgb8", "numpy_mlp": "gray8"}
    # many small chunks: a slow stage
    params["tabulate"] = {"engine": "local", "workers": 1, "rows_per_group": 4}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = ["stages.tabulate", "--split", "split", "--out", "tables"]

    # an earlier complete output, as after a previous run (made from half the images)
    for path in list((tmp_path / "split").rglob("1??.png")):
        path.rename(path.with_name(f"x{path.name}"))
    run_stage(command, tmp_path, tmp_path / "first.log")
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

    run_stage(command, tmp_path, tmp_path / "rerun.log")
    assert not staging.exists()
    for view in ("gray8", "rgb8"):
        for split_name in SPLITS:
            table = read_table(tmp_path / "tables" / view / f"{split_name}.parquet")
            expected = [p.split("/", 1)[1] for p in files if p.startswith(f"{split_name}/")]
            assert sorted(table.sources) == sorted(expected)


# --------------------------------------------------------------------------- train


def write_digit_tables(folder: Path) -> None:
    """scikit-learn's digits as 8x8 grayscale train/val/test pixel tables."""
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    labels = digits.target.astype(np.int16)
    class_names = [str(d) for d in range(10)]
    schema = table_schema((8, 8, 1), class_names, "gray8")
    bounds = {"train": (0, 1200), "val": (1200, 1500), "test": (1500, len(labels))}
    for split_name, (start, stop) in bounds.items():
        with TableWriter(folder / f"{split_name}.parquet", schema) as writer:
            rows = slice(start, stop)
            sources = [f"{labels[i]}/{i}.png" for i in range(start, stop)]
            writer.write(record_batch(schema, pixels[rows], labels[rows], sources))


@pytest.fixture(scope="module")
def train_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with digit tables and params for a dense model that trains in a few seconds."""
    project = tmp_path_factory.mktemp("train")
    write_digit_tables(project / "tables" / "gray8")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["views"] = {"gray8": {"height": 8, "width": 8, "color": "grayscale"}}
    params["models"] = {"dense": "gray8", "cnn": "gray8", "numpy_mlp": "gray8"}
    params["dense"].update(hidden_units=[256, 128], epochs=10, learning_rate=0.005, batch_size=32)
    params["tracking"]["uri"] = f"sqlite:///{project / 'mlflow.db'}"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def train_command(out: str, checkpoint: str) -> list[str]:
    return [
        "stages.train",
        "--model",
        "dense",
        "--tables",
        "tables/gray8",
        "--out",
        out,
        "--checkpoint",
        checkpoint,
    ]


def checkpoint_epochs(folder: Path) -> int:
    try:
        return json.loads((folder / "state.json").read_text())["epochs_done"]
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_killed_training_resumes_and_ends_exactly_like_an_uninterrupted_run(
    train_project: Path,
) -> None:
    import keras
    from mlflow.tracking import MlflowClient

    project = train_project
    checkpoint = project / "checkpoints" / "dense"
    process = start_stage(
        train_command("models/dense", "checkpoints/dense"), project, project / "killed.log"
    )
    kill_when(process, lambda: checkpoint_epochs(checkpoint) >= 3, timeout=240)

    # item 4: nothing under the output name that a later run could take for a model
    assert not (project / "models" / "dense").exists()
    state = json.loads((checkpoint / "state.json").read_text())
    killed_at = state["epochs_done"]
    assert 3 <= killed_at < 10
    run_id = state["extra"]["run_id"]

    output = run_stage(
        train_command("models/dense", "checkpoints/dense"), project, project / "resumed.log"
    )
    assert f"resuming from checkpoint checkpoints/dense after epoch {killed_at} of 10" in output
    assert not checkpoint.exists(), "the checkpoint must go once the model is saved"
    run_stage(
        train_command("models/straight", "checkpoints/straight"), project, project / "straight.log"
    )

    resumed = json.loads((project / "models" / "dense" / "history.json").read_text())
    straight = json.loads((project / "models" / "straight" / "history.json").read_text())
    assert resumed["resumed_from_epoch"] == killed_at
    assert straight["resumed_from_epoch"] == 0
    assert resumed["history"] == straight["history"]  # exactly, every epoch, every metric
    weights = [
        keras.saving.load_model(project / "models" / name / "model.keras", safe_mode=True)
        for name in ("dense", "straight")
    ]
    for a, b in zip(weights[0].get_weights(), weights[1].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

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
    project = tmp_path_factory.mktemp("two_devices")
    write_digit_tables(project / "tables" / "gray8")
    params = yaml.safe_load((train_project / "params.yaml").read_text())
    params["train"]["devices"] = 2
    params["tracking"]["uri"] = f"sqlite:///{project / 'mlflow.db'}"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


@pytest.mark.slow
def test_killed_two_device_training_resumes_and_ends_like_an_uninterrupted_run(
    two_device_project: Path,
) -> None:
    import keras

    project = two_device_project
    checkpoint = project / "checkpoints" / "dense"
    process = start_stage(
        train_command("models/dense", "checkpoints/dense"), project, project / "killed.log"
    )
    kill_when(process, lambda: checkpoint_epochs(checkpoint) >= 3, timeout=240)
    killed_at = checkpoint_epochs(checkpoint)
    assert 3 <= killed_at < 10

    output = run_stage(
        train_command("models/dense", "checkpoints/dense"), project, project / "resumed.log"
    )
    assert "training data-parallel on 2 devices (/cpu:0, /cpu:1) with MirroredStrategy" in output
    assert f"resuming from checkpoint checkpoints/dense after epoch {killed_at} of 10" in output
    straight_output = run_stage(
        train_command("models/straight", "checkpoints/straight"), project, project / "straight.log"
    )
    assert "global batch 32, 16 per device" in straight_output

    resumed = json.loads((project / "models" / "dense" / "history.json").read_text())
    straight = json.loads((project / "models" / "straight" / "history.json").read_text())
    assert resumed["resumed_from_epoch"] == killed_at
    assert resumed["choices"]["replicas"] == straight["choices"]["replicas"] == 2
    # the checkpoint's arrays went back into both devices' copies (weights, Adam's slots, the
    # dropout and flip seed states): the same batches, draws and updates as without a stop
    assert resumed["history"] == straight["history"]
    weights = [
        keras.saving.load_model(project / "models" / name / "model.keras", safe_mode=True)
        for name in ("dense", "straight")
    ]
    for a, b in zip(weights[0].get_weights(), weights[1].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
