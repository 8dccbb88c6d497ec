"""Training loops for Keras models and the NumPy MLP: uint8 pixels in, per-epoch logs out."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from imgpipe.params import CnnParams, DenseParams, NumpyMlpParams

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
) -> TrainResult:
    """Build, compile and fit a registered Keras model on uint8 pixels (N, H, W, C)."""
    import keras

    from imgpipe.models import build_model, build_optimizer

    seed_everything(seed)
    precision = getattr(params, "precision", "float32")
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        model = build_model(model_name, tuple(x_train.shape[1:]), num_classes, params)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    model.compile(
        optimizer=build_optimizer(
            params.optimizer,
            learning_rate=params.learning_rate,
            decay_steps=params.decay_steps,
            decay_rate=params.decay_rate,
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks: list[keras.callbacks.Callback] = []
    if on_epoch_end is not None:
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: on_epoch_end(epoch, _float_logs(logs))
            )
        )
    started = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val) if len(x_val) else None,
        batch_size=params.batch_size,
        epochs=params.epochs,
        shuffle=True,
        callbacks=callbacks,
        verbose=2 if os.environ.get("CI") else 1,
    )
    seconds = time.perf_counter() - started
    return TrainResult(
        model=model,
        history=_clean_history(history.history),
        seconds=seconds,
        images_per_second=len(x_train) * params.epochs / seconds,
        parameters=int(model.count_params()),
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
        decay_steps=params.decay_steps,
        decay_rate=params.decay_rate,
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
