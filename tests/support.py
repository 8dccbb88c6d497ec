"""Helpers shared by the tests: commands and stages run in temporary project copies, training on
arrays, scikit-learn's digits as arrays and tables, and tiny images of every kind."""

from __future__ import annotations

import io
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import yaml
from PIL import Image

from imgpipe.checkpoints import TrainingCheckpoint
from imgpipe.registry import EpochCallback, TrainingData, TrainResult, model_type
from imgpipe.tables import TableWriter, record_batch, table_schema

ROOT = Path(__file__).resolve().parents[1]  # the repository
BIN = Path(sys.executable).parent  # this venv's commands: dvc, mlflow, imgpipe-predict


# --------------------------------------------------------------------------- commands


def command_env() -> dict[str, str]:
    """This environment without MLflow/DVC settings, with this venv's commands first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    return env


def checkout_env(**variables: str) -> dict[str, str]:
    """command_env() with this checkout importable (PYTHONPATH), plus more variables."""
    return {**command_env(), "PYTHONPATH": str(ROOT), **variables}


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    """Run a command, fail the test with its output if it fails, return stdout+stderr."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
    return output


def stages_run(output: str) -> set[str]:
    """Stage names that `dvc repro` / `dvc exp run` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- project copies


def load_repo_params() -> dict[str, Any]:
    """The repository's params.yaml as a plain mapping."""
    with open(ROOT / "params.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def data_stage_params(
    views: Mapping[str, Mapping[str, Any]], *, workers: int, rows_per_group: int
) -> dict[str, Any]:
    """The repository's params for split and tabulate on tiny images: only these views (the
    grayscale one for dense and numpy_mlp, the rgb one for cnn), tabulated by the local engine
    with `workers` processes in row groups of `rows_per_group` rows."""
    named = {view["color"]: name for name, view in views.items()}  # {"grayscale": ..., "rgb": ...}
    params = load_repo_params()
    params["views"] = dict(views)
    params["models"] = {
        "dense": named["grayscale"],
        "cnn": named["rgb"],
        "numpy_mlp": named["grayscale"],
    }
    params["tabulate"] = {"engine": "local", "workers": workers, "rows_per_group": rows_per_group}
    return params


def copy_project(folder: Path) -> None:
    """Copy the project's code and configuration (no data, no git) into folder."""
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pyproject.toml"):
        shutil.copy(ROOT / name, folder / name)
    for code in ("stages", "imgpipe", "weights"):  # weights/: the `weights` stage's dep
        shutil.copytree(ROOT / code, folder / code, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", folder / ".dvc" / "config")
    shutil.copy(ROOT / ".dvc" / ".gitignore", folder / ".dvc" / ".gitignore")
    # .dvc/config names it: `dvc plots show` draws offline with it
    shutil.copy(ROOT / ".dvc" / "plots-template.html", folder / ".dvc" / "plots-template.html")


def small_params(path: Path, models: Mapping[str, str], *, epochs: int) -> dict[str, Any]:
    """The params.yaml at path, shrunk so that `models` ({model: view}) train in seconds on 16x16
    views of the digits (gray16, rgb16); the caller changes more and writes it back."""
    views = {
        "gray16": {"height": 16, "width": 16, "color": "grayscale"},
        "rgb16": {"height": 16, "width": 16, "color": "rgb"},
    }
    params = yaml.safe_load(path.read_text())
    params["views"] = {name: view for name, view in views.items() if name in models.values()}
    params["models"] = dict(models)
    # a 3x3 stride-2 stem: 16x16 images at progressive resizing's half size through the default
    # 4x4 patch stem leave 2x2 maps, too few for two blocks' pools
    params["cnn"].update(stem="conv3x3_stride2")
    params["dense"].update(hidden_units=[32], epochs=epochs, learning_rate=0.01)
    params["numpy_mlp"].update(hidden_units=[32], epochs=epochs, learning_rate=0.01)
    return params


# --------------------------------------------------------------------------- stages


def run_stage_in_process(stage: str, *arguments: str) -> None:
    """Run `python -m stages.<stage> arguments...` in this process (faster than a subprocess):
    the stage's own entry point, its argument parsing and its `[stage] message` exits. Not for
    split and tabulate, which fork: run_forking_stage."""
    saved = sys.argv
    sys.argv = [f"stages/{stage}.py", *arguments]
    try:
        runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=False)
    finally:
        sys.argv = saved


_EXIT_MARK = "\n@@stage-exit@@"
_FRESH_STAGE = """
import runpy, sys
sys.argv = ["stages/{stage}.py", *sys.argv[1:]]
try:
    runpy.run_module("stages.{stage}", run_name="__main__", alter_sys=False)
except SystemExit as stop:
    if stop.code not in (None, 0):
        sys.stderr.write({mark!r} + str(stop.code))
        sys.exit(1)
"""


def run_forking_stage(stage: str, *arguments: str, setup: str = "") -> str:
    """Run `python -m stages.<stage> arguments...` to completion in a new interpreter, in the
    current directory, after the Python statements `setup` (a test's patches); return its output.
    Where the stage exits with a message, raise SystemExit with that message, as the stage's own
    exit would in this process (run_stage_in_process).

    For the stages that fork worker processes (split, tabulate): a fork of a test worker that
    holds TensorFlow's threads (a test before it trained a model there) can deadlock in the
    child, which waits for a lock that one of those threads held, so they never fork from the
    test process.
    """
    code = setup + _FRESH_STAGE.format(stage=stage, mark=_EXIT_MARK)
    result = subprocess.run(
        [sys.executable, "-c", code, *arguments],
        env=checkout_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode == 0:
        return result.stdout + result.stderr
    if _EXIT_MARK in result.stderr:
        raise SystemExit(result.stderr.rsplit(_EXIT_MARK, 1)[1])
    pytest.fail(f"stages.{stage} crashed (exit {result.returncode}):\n{result.stderr[-4000:]}")


def start_stage(args: list[str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """Start `python -m stages.<stage> ...` in its own process group, logging to a file."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=cwd,
            env=checkout_env(CI="1"),  # CI: one Keras line per epoch instead of progress bars
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


def run_stage_subprocess(args: list[str], cwd: Path, log_path: Path) -> str:
    """Run `python -m stages.<stage> ...` in its own process to completion, as DVC does; fail the
    test if it fails; return its output."""
    process = start_stage(args, cwd, log_path)
    code = process.wait(timeout=600)
    output = log_path.read_text(errors="replace")
    assert code == 0, output[-4000:]
    return output


def train_command(out: str, checkpoint: str) -> list[str]:
    """The train stage's arguments for dense on the digit tables in tables/gray8."""
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
    """How many epochs the training checkpoint in folder holds (0 while there is none)."""
    try:
        return json.loads((folder / "state.json").read_text())["epochs_done"]
    except (OSError, ValueError):
        return 0


def kill_midway(project: Path) -> Path:
    """Start train_command's training of dense in project and SIGKILL it once its checkpoint
    holds 3 epochs; returns the checkpoint folder."""
    checkpoint = project / "checkpoints" / "dense"
    process = start_stage(
        train_command("models/dense", "checkpoints/dense"), project, project / "killed.log"
    )
    kill_when(process, lambda: checkpoint_epochs(checkpoint) >= 3, timeout=240)
    return checkpoint


def resume_and_train_straight(project: Path) -> tuple[str, str]:
    """Rerun the killed training of dense to its end, then train the same into models/straight
    without a stop; returns both runs' output."""
    resumed = run_stage_subprocess(
        train_command("models/dense", "checkpoints/dense"), project, project / "resumed.log"
    )
    straight = run_stage_subprocess(
        train_command("models/straight", "checkpoints/straight"), project, project / "straight.log"
    )
    return resumed, straight


def histories_of_equal_models(project: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """history.json of models/dense and models/straight, once their weights proved equal."""
    import keras

    models = [
        keras.saving.load_model(project / "models" / name / "model.keras", safe_mode=True)
        for name in ("dense", "straight")
    ]
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    return tuple(
        json.loads((project / "models" / name / "history.json").read_text())
        for name in ("dense", "straight")
    )


def train_here(model_name: str) -> None:
    """The train stage's core for model_name in the current folder (its params.yaml, the tables
    in tables/gray8, the model into models/<model_name>, no checkpoint)."""
    import mlflow

    from imgpipe.params import load_params
    from imgpipe.training import train_model

    try:
        train_model(
            model_name,
            load_params(),
            tables_dir=Path("tables/gray8"),
            out_dir=Path("models") / model_name,
            checkpoint_dir=None,
        )
    finally:
        mlflow.set_tracking_uri(None)  # start_run set it globally; no other test may see it


# --------------------------------------------------------------------------- training on arrays


def fit(
    model_name: str,
    section: object,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    num_classes: int,
    seed: int,
    on_epoch_end: EpochCallback | None = None,
    checkpoint: TrainingCheckpoint | None = None,
    devices: Literal["auto"] | int = 1,
) -> TrainResult:
    """Train a registered model type on arrays, as the train stage does (without files); on one
    device unless a test asks for more (train.devices)."""
    return model_type(model_name).train(
        section,
        TrainingData(x_train, y_train, x_val, y_val, num_classes=num_classes),
        seed=seed,
        on_epoch_end=on_epoch_end or (lambda epoch, logs: None),
        checkpoint=checkpoint,
        devices=devices,
    )


def digits_split(n_train: int, n_val: int | None = None) -> dict[str, np.ndarray]:
    """Scikit-learn's digits as uint8 images (N, 8, 8, 1) in 0..255, shuffled with seed 0: the
    first n_train to train on (x_train, y_train), the next n_val (default: all the rest) to
    validate on (x_val, y_val)."""
    from imgpipe.demo import digits_images  # scikit-learn: slow to import, only when asked

    pixels, labels = digits_images()
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = pixels[order][..., None], labels[order]  # (1797, 8, 8, 1)
    val_end = None if n_val is None else n_train + n_val
    return {
        "x_train": images[:n_train],
        "y_train": labels[:n_train],
        "x_val": images[n_train:val_end],
        "y_val": labels[n_train:val_end],
    }


def write_digit_tables(folder: Path, rows_per_group: int | None = None) -> None:
    """Scikit-learn's digits, in order, as 8x8 grayscale train (1,200), val (300) and test (297)
    tables in folder, in row groups of rows_per_group rows (default: one per table)."""
    from imgpipe.demo import digits_images  # scikit-learn: slow to import, only when asked

    pixels, labels = digits_images()
    pixels, labels = pixels[..., None], labels.astype(np.int16)  # (N, 8, 8, 1), (N,)
    schema = table_schema((8, 8, 1), [str(d) for d in range(10)], "gray8")
    bounds = {"train": (0, 1200), "val": (1200, 1500), "test": (1500, len(labels))}
    for split_name, (start, stop) in bounds.items():
        group = rows_per_group or stop - start
        with TableWriter(folder / f"{split_name}.parquet", schema) as writer:
            for first in range(start, stop, group):
                rows = slice(first, min(first + group, stop))
                sources = [f"{labels[i]}/{i}.png" for i in range(rows.start, rows.stop)]
                writer.write(record_batch(schema, pixels[rows], labels[rows], sources))


def write_train_project(
    folder: Path, params: dict[str, Any], rows_per_group: int | None = None
) -> Path:
    """folder made ready for the train stage: the digit tables in tables/gray8 (write_digit_tables)
    and params as its params.yaml, logging into folder/mlflow.db; returns folder."""
    write_digit_tables(folder / "tables" / "gray8", rows_per_group)
    params["tracking"]["uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def write_digits_model(folder: Path) -> Path:
    """A logreg trained on scikit-learn's digits (8x8 grayscale, params.yaml's logreg section),
    saved as a train stage's model folder (weights and meta.json) at folder; returns folder."""
    from imgpipe.model_folder import META_FILE, ModelMeta

    kind = model_type("logreg")
    data = digits_split(1400)
    section = kind.params_class(**load_repo_params()["logreg"])
    result = fit(
        "logreg", section, data["x_train"], data["y_train"], data["x_val"], data["y_val"],
        num_classes=10, seed=0,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    kind.save(result.model, folder / kind.weights_file)
    meta = ModelMeta("logreg", "gray8", 8, 8, "grayscale", [str(d) for d in range(10)])
    (folder / META_FILE).write_text(json.dumps(meta.to_json()))
    return folder


# --------------------------------------------------------------------------- tiny images

EXIF_ORIENTATION = 0x0112
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    """Encode a Pillow image in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def upright_halves(width: int, height: int) -> Image.Image:
    """An RGB image whose left half is red and right half blue: shows which way is up."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def exif_rotated_jpeg(width: int, height: int, mark: int = 0) -> bytes:
    """A JPEG that displays as `upright_halves(width, height)` only after EXIF orientation 6.

    Orientation 6 means "rotate 90 degrees clockwise to display", so the stored pixels are the
    upright picture turned 90 degrees counter-clockwise: (height x width), red half at the bottom.
    A non-zero mark changes one corner pixel, so that each mark gives different bytes.
    """
    upright = upright_halves(width, height)
    if mark:
        upright.putpixel((width - 1, 0), (mark % 256, (mark // 256) % 256, 128))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def noise(seed: int, shape: tuple[int, ...], dtype: type = np.uint8, high: int = 256) -> np.ndarray:
    """Seeded random pixels, so every generated image has different bytes."""
    return np.random.default_rng(seed).integers(0, high, size=shape, dtype=dtype)


def make_image(kind: str, seed: int = 0) -> bytes:
    """Bytes of one small image of a given kind; sizes differ between kinds on purpose."""
    if kind == "rgb.jpg":
        return encode(Image.fromarray(noise(seed, (30, 40, 3))), "JPEG", quality=90)
    if kind == "gray.png":
        return encode(Image.fromarray(noise(seed, (23, 17))), "PNG")
    if kind == "rgba.png":
        return encode(Image.fromarray(noise(seed, (20, 20, 4))), "PNG")
    if kind == "la.png":
        return encode(Image.fromarray(noise(seed, (9, 13, 2))).convert("LA"), "PNG")
    if kind == "palette.png":
        image = Image.fromarray(noise(seed, (18, 12), high=4)).convert("P")
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (252 * 3))
        return encode(image, "PNG", transparency=3)
    if kind == "cmyk.jpg":
        return encode(Image.fromarray(noise(seed, (20, 30, 4)), mode="CMYK"), "JPEG", quality=90)
    if kind == "gray16.png":
        return encode(Image.fromarray(noise(seed, (15, 25), np.uint16, 65536)), "PNG")
    if kind == "exif6.jpg":
        return exif_rotated_jpeg(40 + seed % 7, 20, mark=seed)
    raise ValueError(f"unknown image kind {kind!r}")


# Pillow mode each kind opens as: proves the fixtures really cover the modes they claim to
IMAGE_MODES = {
    "rgb.jpg": "RGB",
    "gray.png": "L",
    "rgba.png": "RGBA",
    "la.png": "LA",
    "palette.png": "P",
    "cmyk.jpg": "CMYK",
    "gray16.png": "I;16",
    "exif6.jpg": "RGB",
}
IMAGE_KINDS = tuple(IMAGE_MODES)


def corrupt_files() -> dict[str, bytes]:
    """Files named like images that no decoder can read."""
    jpeg = make_image("rgb.jpg", seed=99)
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "notes.jpg": b"this is a text file, not a JPEG\n",
    }


def write_tree(root: Path, files: Mapping[str, bytes]) -> Path:
    """Write {relative POSIX path: bytes} under root."""
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_zip(path: Path, files: Mapping[str, bytes], directories: tuple[str, ...] = ()) -> Path:
    """Write {entry name: bytes} into a zip, with optional explicit directory entries."""
    with zipfile.ZipFile(path, "w") as archive:
        for directory in directories:
            archive.writestr(zipfile.ZipInfo(directory.rstrip("/") + "/"), b"")
        for name, data in files.items():
            archive.writestr(name, data)
    return path
