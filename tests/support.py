"""Helpers shared by the tests: commands in temporary git + DVC copies, training on arrays."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Literal

import numpy as np

from imgpipe.checkpoints import TrainingCheckpoint
from imgpipe.registry import EpochCallback, TrainingData, TrainResult, model_type

BIN = Path(sys.executable).parent  # this venv's commands: dvc, mlflow, imgpipe-predict


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


def run_stage(stage: str, *arguments: str) -> None:
    """Run `python -m stages.<stage> arguments...` in this process (faster than a subprocess):
    the stage's own entry point, its argument parsing and its `[stage] message` exits."""
    saved = sys.argv
    sys.argv = [f"stages/{stage}.py", *arguments]
    try:
        runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=False)
    finally:
        sys.argv = saved
