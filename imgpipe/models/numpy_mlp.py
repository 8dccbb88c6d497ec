"""`numpy_mlp`: the same net as `dense`, written with NumPy alone (imgpipe/numpy_net.py): an
L-layer perceptron with its own forward pass, backpropagation, dropout, flips, optimizers and
schedules."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from imgpipe.numpy_net import (
    FLIPS,
    INITS,
    OPTIMIZERS,
    OUTPUTS,
    FitSettings,
    NumpyMLP,
    TrainBatch,
    array_batches,
    fit,
    fit_batches,
    shuffled_array_batches,
)
from imgpipe.registry import EpochCallback, ModelType, TrainingData, TrainResult
from imgpipe.runtime import StageError
from imgpipe.sections import ScheduledTraining, check_positive


class NumpyMlpParams(ScheduledTraining):
    """params.yaml `numpy_mlp:`."""

    hidden_units: list[int] = Field(min_length=1)
    dropout: float = Field(ge=0, lt=1)
    flip: Literal[FLIPS]  # type: ignore[valid-type]
    output: Literal[OUTPUTS]  # type: ignore[valid-type]
    init: Literal[INITS]  # type: ignore[valid-type]
    optimizer: Literal[OPTIMIZERS]  # type: ignore[valid-type]
    weight_decay: float = Field(ge=0)  # decoupled, x learning_rate per step; 0 = none

    @model_validator(mode="after")
    def _positive_units(self) -> NumpyMlpParams:
        check_positive(self.hidden_units, "hidden_units")
        return self


class NumpyMlpType(ModelType):
    """NumpyMLP trained by numpy_net's fit(); weights in a plain .npz (no pickle)."""

    params_class = NumpyMlpParams
    weights_file = "model.npz"
    streams = True  # mini-batches: a table over train.stream_over_mb streams through them

    def fit(
        self, params: NumpyMlpParams, data: TrainingData, *, seed: int, on_epoch_end: EpochCallback
    ) -> TrainResult:
        """Build the net for the view's inputs and fit it with the section's settings.

        A streamed train table (data.train_stream) gives each epoch's batches through its
        shuffle buffer, in an order that depends only on (seed, epoch); a streamed val table is
        read in file order. Flips and dropout draw from the same generator either way.
        """
        if params.output == "sigmoid" and data.num_classes != 2:
            raise StageError(
                f"numpy_mlp.output: sigmoid needs exactly 2 classes, the data has "
                f"{data.num_classes}; use softmax"
            )
        n_inputs = math.prod(data.image_shape)
        n_outputs = 1 if params.output == "sigmoid" else data.num_classes
        model = NumpyMLP(
            [n_inputs, *params.hidden_units, n_outputs],
            output=params.output,
            init=params.init,
            seed=seed,
        )
        settings = _fit_settings(params, seed)
        started = time.perf_counter()
        if not data.streamed:
            history = fit(
                model,
                data.x_train,
                data.y_train,
                x_val=data.x_val,
                y_val=data.y_val,
                settings=settings,
                on_epoch_end=on_epoch_end,
            )
        else:
            history = fit_batches(
                model,
                _table_batches(data, params.batch_size, seed),
                lambda: (
                    data.val_stream.ordered_batches(params.batch_size)
                    if data.val_stream is not None
                    else array_batches(data.x_val, data.y_val, params.batch_size)
                ),
                train_size=data.train_size,
                settings=settings,
                on_epoch_end=on_epoch_end,
            )
        seconds = time.perf_counter() - started
        return TrainResult(
            model=model,
            history={key: [float(v) for v in values] for key, values in history.items()},
            seconds=seconds,
            images_per_second=data.train_size * params.epochs / seconds,
            parameters=model.count_params(),
        )

    def save(self, model: NumpyMLP, path: Path) -> None:
        """Weights and config as plain arrays."""
        model.save(path)

    def load(self, path: Path) -> NumpyMLP:
        """Read the .npz back (np.load without pickle)."""
        return NumpyMLP.load(path)

    def predict_proba(self, model: NumpyMLP, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """Probabilities, batch by batch."""
        return model.predict_proba(pixels, batch_size=batch_size)


def _fit_settings(params: NumpyMlpParams, seed: int) -> FitSettings:
    """The section's training knobs, with the training's seed."""
    return FitSettings(
        epochs=params.epochs,
        batch_size=params.batch_size,
        learning_rate=params.learning_rate,
        optimizer=params.optimizer,
        weight_decay=params.weight_decay,
        schedule=params.schedule,
        decay_steps=params.decay_steps,
        decay_rate=params.decay_rate,
        dropout=params.dropout,
        flip=params.flip,
        seed=seed,
    )


def _table_batches(
    data: TrainingData, batch_size: int, seed: int
) -> Callable[[int, np.random.Generator], Iterable[TrainBatch]]:
    """train_batches for fit_batches: the train stream's seeded epochs (each batch a
    fresh array of its rows), or the arrays' epochs as fit() draws them."""
    stream = data.train_stream
    if stream is None:
        return shuffled_array_batches(data.x_train, data.y_train, batch_size)

    def train_batches(epoch: int, rng: np.random.Generator) -> Iterator[TrainBatch]:
        for pixels, labels in stream.shuffled_batches(batch_size, seed=seed, epoch=epoch):
            yield pixels, slice(None), labels

    return train_batches


MODEL_TYPE = NumpyMlpType()
