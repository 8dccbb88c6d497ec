"""The layout of a trained model's folder, models/<model>/, the one place that knows it.

    meta.json          ModelMeta: which model type, the view it reads, its classes
    <weights file>     the model type's own format (model.keras, model.npz)
    history.json       per-epoch history and the training summary (time, speed, parameters,
                       the model type's choices, the machine)
    history.csv        the same history, one row per epoch, for `dvc plots`
    mlflow_run.json    the MLflow run that train opened and evaluate completes

The train stage writes it whole or not at all; evaluate, imgpipe-predict and the MLflow model
read it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgpipe.registry import ModelType, model_type, model_types
from imgpipe.runtime import StageError, atomic_directory, write_bytes_atomic, write_json_atomic

META_FILE = "meta.json"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
RUN_FILE = "mlflow_run.json"


@dataclass(frozen=True)
class ModelMeta:
    """What a saved model needs besides its weights: its type, input view and classes."""

    model: str  # the model type's name: dense, cnn, numpy_mlp, logreg
    view: str
    height: int
    width: int
    color: str
    class_names: list[str]
    # what training started from besides random numbers (pretrained: weights, weights_sha256)
    start: dict[str, str] = field(default_factory=dict)

    @property
    def model_type(self) -> ModelType:
        """The registry entry that saves, loads and runs this model."""
        return model_type(self.model)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for meta.json."""
        return asdict(self)

    @classmethod
    def read(cls, path: str | Path) -> ModelMeta:
        """Read a meta.json (older ones also carry a `kind`, which the registry now knows)."""
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        payload.pop("kind", None)
        if payload.get("model") not in model_types():
            raise StageError(
                f"{path}: model type {payload.get('model')!r} is unknown to this imgpipe, which "
                f"knows {', '.join(model_types())}: retrain it (`dvc repro`) or use the imgpipe "
                "version that trained it"
            )
        return cls(**payload)


def history_csv(history: dict[str, list[float]]) -> str:
    """Per-epoch history as CSV with an `epoch` column counted from 1 (for `dvc plots`)."""
    keys = list(history)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for epoch in range(len(history[keys[0]]) if keys else 0):
        writer.writerow([epoch + 1, *(f"{history[k][epoch]:.6f}" for k in keys)])
    return buffer.getvalue()


class ModelFolder:
    """models/<model>/: paths of its files, and reading them with errors that say what to do."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta_path = self.path / META_FILE
        self.history_json = self.path / HISTORY_JSON
        self.history_csv = self.path / HISTORY_CSV
        self.run_file = self.path / RUN_FILE

    def meta(self) -> ModelMeta:
        """The folder's meta.json."""
        if not self.meta_path.is_file():
            raise StageError(
                f"{self.meta_path} not found: is {self.path} a folder written by the train "
                "stage? Run `dvc repro` (or `dvc pull`) first."
            )
        return ModelMeta.read(self.meta_path)

    def weights_path(self, meta: ModelMeta) -> Path:
        """Where the model type keeps its weights in this folder."""
        return self.path / meta.model_type.weights_file

    def history(self) -> dict[str, Any]:
        """history.json: {"history": {key: [per epoch]}, "train_seconds": ..., ...}."""
        return json.loads(self.history_json.read_text(encoding="utf-8"))

    def run_id(self) -> str:
        """The MLflow run id that the train stage recorded."""
        return json.loads(self.run_file.read_text(encoding="utf-8"))["run_id"]

    def write_run_report(self, report: dict[str, Any]) -> None:
        """Replace mlflow_run.json (e.g. to list what could not be logged)."""
        write_json_atomic(self.run_file, report)

    def write(
        self,
        meta: ModelMeta,
        model: Any,
        *,
        summary: dict[str, Any],
        history: dict[str, list[float]],
        run_report: dict[str, Any],
    ) -> None:
        """Write every file at once: the folder is replaced whole, or left as it was."""
        with atomic_directory(self.path) as staging:
            meta.model_type.save(model, staging / meta.model_type.weights_file)
            write_json_atomic(staging / META_FILE, meta.to_json())
            write_json_atomic(staging / HISTORY_JSON, {**summary, "history": history})
            write_bytes_atomic(staging / HISTORY_CSV, history_csv(history).encode())
            write_json_atomic(staging / RUN_FILE, run_report)
