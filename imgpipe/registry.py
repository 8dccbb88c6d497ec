"""The model registry: every model type the pipeline can train, one module each in imgpipe/models/.

A model type is the module `imgpipe/models/<name>.py`, which defines `MODEL_TYPE`, an instance of
a ModelType subclass: its params section's class, how it is trained, saved, loaded and how it
predicts. `<name>` is the model's name everywhere: the `models:` entry and the params section in
params.yaml, the stages train@<name> and evaluate@<name>, models/<name>/, the MLflow run and
registered model. The registry finds the modules itself; nothing else lists model names.

Model modules are cheap to import (params.py imports them all to validate params.yaml): heavy
libraries (Keras, scikit-learn) are imported inside the functions that need them.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:
    from imgpipe.checkpoints import TrainingCheckpoint
    from imgpipe.sections import Section
    from imgpipe.tables import TableStream

MODELS_PACKAGE = "imgpipe.models"
# What a training history holds, per epoch, for every model type (curves, MLflow, dvc plots).
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")

EpochCallback = Callable[[int, dict[str, float]], None]  # (epoch from 0, {key: value})


@dataclass(frozen=True)
class TrainingData:
    """A view's train and val tables as arrays, or, a table over `train.stream_over_mb`, as a
    stream read one row group at a time (only for model types whose `streams` is True)."""

    x_train: np.ndarray  # (N, H, W, C) uint8; (0, H, W, C) when train_stream holds the table
    y_train: np.ndarray  # (N,) int64 class indices; (0,) when streamed
    x_val: np.ndarray  # (M, H, W, C) uint8; (0, H, W, C) when val_stream holds the table
    y_val: np.ndarray  # (M,) int64
    num_classes: int
    train_stream: TableStream | None = None  # the train table, when too big to read whole
    val_stream: TableStream | None = None  # the val table, when too big to read whole
    # arrays a model type derives from the tables once in a run and reuses over epochs (the
    # CNN's smaller images for progressive resizing), under the model type's own keys
    derived: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, stream, pixels in (
            ("train", self.train_stream, self.x_train),
            ("val", self.val_stream, self.x_val),
        ):
            if stream is not None and (len(pixels) or tuple(pixels.shape[1:]) != stream.shape):
                raise ValueError(
                    f"a streamed {name} table comes with empty arrays of its image shape "
                    f"{stream.shape}, got {pixels.shape}"
                )

    @property
    def streamed(self) -> bool:
        """True when a table is streamed rather than held in the arrays."""
        return self.train_stream is not None or self.val_stream is not None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def train_size(self) -> int:
        """Training images, streamed or not."""
        return self.train_stream.rows if self.train_stream is not None else len(self.y_train)

    @property
    def val_size(self) -> int:
        """Validation images, streamed or not."""
        return self.val_stream.rows if self.val_stream is not None else len(self.y_val)

    def train_head(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `rows` training images and labels, in table order (read from the stream
        when there is one)."""
        if self.train_stream is not None:
            return self.train_stream.head(rows)
        return self.x_train[:rows], self.y_train[:rows]


@dataclass
class TrainResult:
    """A trained model with its per-epoch history and cost."""

    model: Any
    history: dict[str, list[float]]  # HISTORY_KEYS -> one value per epoch
    seconds: float
    images_per_second: float
    parameters: int
    resumed_from_epoch: int = 0  # epochs restored from a checkpoint instead of trained here
    # what the model type decided while training, for MLflow (e.g. the precision `auto` chose)
    choices: dict[str, str | float] = field(default_factory=dict)


class ModelType(ABC):
    """How one kind of model is trained, saved, loaded and asked for probabilities."""

    params_class: ClassVar[type[Section]]  # its params.yaml section
    weights_file: ClassVar[str]  # the weights' file name inside models/<name>/
    # True when train() saves every epoch to a TrainingCheckpoint and resumes from one
    resumable: ClassVar[bool] = False
    # True when train() can take a table as a TableStream (TrainingData.train_stream,
    # val_stream) instead of arrays: the train stage streams tables over train.stream_over_mb
    streams: ClassVar[bool] = False

    def train(
        self,
        params: Any,
        data: TrainingData,
        *,
        seed: int,
        on_epoch_end: EpochCallback,
        checkpoint: TrainingCheckpoint | None,
        devices: Literal["auto"] | int,
    ) -> TrainResult:
        """Fit a new model on data.x_train (uint8 pixels), reporting each finished epoch.

        devices is train.devices: what Keras models train on, data-parallel over several; the
        NumPy and scikit-learn models train on the CPU and do not use it. By default fit():
        a model type that resumes from a checkpoint or trains on devices overrides train.
        """
        return self.fit(params, data, seed=seed, on_epoch_end=on_epoch_end)

    def fit(
        self, params: Any, data: TrainingData, *, seed: int, on_epoch_end: EpochCallback
    ) -> TrainResult:
        """train() for a model type that trains from scratch on the CPU (no checkpoint, no
        devices): the NumPy and scikit-learn ones."""
        raise NotImplementedError(f"{type(self).__name__} must define fit() or train()")

    def starting_point(self, params: Any) -> dict[str, str]:
        """What training starts from besides seeded random numbers (a weights file's name and
        SHA-256), logged with the run and in meta.json; {} by default. Called before any table
        is read: a model type whose starting weights cannot be had stops here, saying why."""
        return {}

    def view_problem(self, shape: tuple[int, int, int]) -> str | None:
        """Why a view of images (H, W, C) cannot feed this model type (checked with params.yaml),
        or None: any view by default."""
        return None

    def planned_epochs(self, params: Any) -> int:
        """How many epochs train() runs with these params (its `epochs` knob by default)."""
        return params.epochs

    @abstractmethod
    def save(self, model: Any, path: Path) -> None:
        """Write the model's weights to path (models/<name>/<weights_file>)."""

    @abstractmethod
    def load(self, path: Path) -> Any:
        """Read back what save() wrote."""

    @abstractmethod
    def predict_proba(self, model: Any, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """(N, K) class probabilities for uint8 pixels (N, H, W, C) of the model's view."""


@functools.cache
def model_types() -> dict[str, ModelType]:
    """Every model type, by name, from the modules in imgpipe/models/ (sorted by name)."""
    package = importlib.import_module(MODELS_PACKAGE)
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)
    types: dict[str, ModelType] = {}
    for name in names:
        module = importlib.import_module(f"{MODELS_PACKAGE}.{name}")
        entry = getattr(module, "MODEL_TYPE", None)
        if not isinstance(entry, ModelType):
            raise TypeError(
                f"{module.__file__} must define MODEL_TYPE, an instance of a "
                "imgpipe.registry.ModelType subclass (see docs/architecture.md 'Adding a model')"
            )
        types[name] = entry
    return types


def model_type(name: str) -> ModelType:
    """The model type called `name`; an unknown name raises KeyError listing the known ones."""
    types = model_types()
    if name not in types:
        raise KeyError(
            f"unknown model {name!r}; known models: {', '.join(types)} "
            f"(one module each in {module_file('<name>').parent})"
        )
    return types[name]


def module_file(name: str) -> Path:
    """The module that defines model type `name`, relative to the project root."""
    return Path(*MODELS_PACKAGE.split("."), f"{name}.py")
