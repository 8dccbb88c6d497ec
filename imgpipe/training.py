"""Training loops for Keras models and the NumPy MLP: uint8 pixels in, per-epoch logs out."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from imgpipe.params import CnnParams, DenseParams, NumpyMlpParams

if TYPE_CHECKING:
    import keras

    from imgpipe.checkpoints import TrainingCheckpoint

log = logging.getLogger("imgpipe.training")

EpochCallback = Callable[[int, dict[str, float]], None]
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass
class TrainResult:
    """A trained model with its per-epoch history and cost."""

    model: object
    history: dict[str, list[float]]
    seconds: float
    images_per_second: float
    parameters: int
    extra: dict[str, float] = field(default_factory=dict)
    resumed_from_epoch: int = 0  # epochs restored from a checkpoint instead of trained here


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and the Keras backend, and ask TensorFlow for deterministic ops."""
    random.seed(seed)
    np.random.seed(seed)
    import keras

    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _clean_history(raw: dict[str, list]) -> dict[str, list[float]]:
    return {key: [float(v) for v in raw[key]] for key in HISTORY_KEYS if key in raw}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of one epoch: depends only on (seed, epoch), not on what ran
    before in this process, so a run resumed at epoch k sees the same batches as one that never
    stopped."""
    return np.random.default_rng([seed, epoch]).permutation(n)  # (N,)


def training_state(model: keras.Model) -> dict[str, np.ndarray]:
    """Every variable training changes: weights, batch-norm statistics, the random-seed states of
    dropout and augmentation layers (model.variables) and the optimizer's slots and step count."""
    arrays = {f"model_{i}": np.asarray(v) for i, v in enumerate(model.variables)}
    arrays.update({f"opt_{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)})
    return arrays


def restore_training_state(model: keras.Model, arrays: dict[str, np.ndarray]) -> None:
    """Put back what training_state saved, into a model built and compiled the same way."""
    targets = {f"model_{i}": v for i, v in enumerate(model.variables)}
    targets.update({f"opt_{i}": v for i, v in enumerate(model.optimizer.variables)})
    if set(targets) != set(arrays):
        raise ValueError(
            f"checkpoint holds {len(arrays)} arrays but the model and optimizer have "
            f"{len(targets)} variables"
        )
    for name, variable in targets.items():
        if tuple(variable.shape) != arrays[name].shape:
            raise ValueError(f"checkpoint array {name} has shape {arrays[name].shape}")
        variable.assign(arrays[name])


def compiled_model(
    model_name: str,
    params: DenseParams | CnnParams,
    input_shape: tuple[int, ...],
    num_classes: int,
    train_size: int,
) -> keras.Model:
    """A registered Keras model built in its params' precision and compiled as training does.

    train_size (the number of training images) sets the length of a cosine schedule.
    """
    import keras

    from imgpipe.models import build_model, build_optimizer

    keras.mixed_precision.set_dtype_policy(getattr(params, "precision", "float32"))
    try:
        model = build_model(model_name, input_shape, num_classes, params)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    model.compile(
        optimizer=build_optimizer(
            params.optimizer,
            learning_rate=params.learning_rate,
            decay_steps=params.decay_steps,
            decay_rate=params.decay_rate,
            schedule=params.schedule,
            total_steps=params.epochs * math.ceil(train_size / params.batch_size),
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def train_keras(
    model_name: str,
    params: DenseParams | CnnParams,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    num_classes: int,
    seed: int,
    on_epoch_end: EpochCallback | None = None,
    checkpoint: TrainingCheckpoint | None = None,
) -> TrainResult:
    """Build, compile and fit a registered Keras model on uint8 pixels (N, H, W, C).

    With a checkpoint, each finished epoch is saved to it, and a matching checkpoint found at the
    start is restored: training continues after its last epoch and ends exactly where an
    uninterrupted run would (same batches, same dropout and augmentation draws, same optimizer
    state).
    """
    import keras

    seed_everything(seed)
    model = compiled_model(
        model_name, params, tuple(x_train.shape[1:]), num_classes, train_size=len(x_train)
    )
    model.optimizer.build(model.trainable_variables)  # its slots exist before any restore
    history: dict[str, list[float]] = {}
    first_epoch, earlier_seconds = 0, 0.0
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None and state.epochs_done <= params.epochs:
        restore_training_state(model, state.arrays)
        history, first_epoch, earlier_seconds = state.history, state.epochs_done, state.seconds
        log.info(
            "resuming from checkpoint %s after epoch %d of %d",
            checkpoint.directory if checkpoint else "",
            first_epoch,
            params.epochs,
        )
    callbacks: list[keras.callbacks.Callback] = []
    if on_epoch_end is not None:
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: on_epoch_end(epoch, _float_logs(logs))
            )
        )
    verbose = 2 if os.environ.get("CI") else 1
    started = time.perf_counter()
    for epoch in range(first_epoch, params.epochs):
        log.info("epoch %d/%d", epoch + 1, params.epochs)
        order = epoch_order(len(x_train), seed, epoch)  # a uint8 copy per epoch, never floats
        fitted = model.fit(
            x_train[order],
            y_train[order],
            validation_data=(x_val, y_val) if len(x_val) else None,
            batch_size=params.batch_size,
            initial_epoch=epoch,
            epochs=epoch + 1,
            shuffle=False,  # epoch_order shuffled it, reproducibly per epoch
            callbacks=callbacks,
            verbose=verbose,
        )
        for key, values in _clean_history(fitted.history).items():
            history.setdefault(key, []).extend(values)
        if checkpoint is not None:
            seconds = earlier_seconds + time.perf_counter() - started
            checkpoint.save(epoch + 1, history, training_state(model), seconds)
    seconds = time.perf_counter() - started
    epochs_here = params.epochs - first_epoch
    return TrainResult(
        model=model,
        history=history,
        seconds=earlier_seconds + seconds,
        images_per_second=len(x_train) * epochs_here / max(seconds, 1e-9),
        parameters=int(model.count_params()),
        resumed_from_epoch=first_epoch,
    )


def _float_logs(logs: dict | None) -> dict[str, float]:
    return {key: float(value) for key, value in (logs or {}).items() if key in HISTORY_KEYS}


def train_numpy_mlp(
    params: NumpyMlpParams,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    num_classes: int,
    seed: int,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Train the from-scratch NumPy MLP on uint8 pixels (N, H, W, C)."""
    from imgpipe.numpy_mlp import NumpyMLP

    if params.output == "sigmoid" and num_classes != 2:
        raise ValueError(
            f"numpy_mlp.output: sigmoid needs exactly 2 classes, the data has {num_classes}; "
            "use softmax"
        )
    n_inputs = int(np.prod(x_train.shape[1:]))
    n_outputs = 1 if params.output == "sigmoid" else num_classes
    model = NumpyMLP(
        [n_inputs, *params.hidden_units, n_outputs],
        output=params.output,
        init=params.init,
        seed=seed,
    )

    def report(epoch: int, logs: dict[str, float]) -> None:
        print(
            f"Epoch {epoch + 1}/{params.epochs} - "
            + " - ".join(f"{key}: {value:.4f}" for key, value in logs.items()),
            flush=True,
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, logs)

    started = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        x_val=x_val,
        y_val=y_val,
        epochs=params.epochs,
        batch_size=params.batch_size,
        learning_rate=params.learning_rate,
        optimizer=params.optimizer,
        schedule=params.schedule,
        decay_steps=params.decay_steps,
        decay_rate=params.decay_rate,
        dropout=params.dropout,
        flip=params.flip,
        seed=seed,
        on_epoch_end=report,
    )
    seconds = time.perf_counter() - started
    return TrainResult(
        model=model,
        history=_clean_history(history),
        seconds=seconds,
        images_per_second=len(x_train) * params.epochs / seconds,
        parameters=model.count_params(),
    )
