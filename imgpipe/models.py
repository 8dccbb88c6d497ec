"""Keras model builders (a registry from model name to builder) and optimizers.

Builders return uncompiled models that take raw uint8 pixels (N, H, W, C) and scale them inside
the graph, batch by batch: no float copy of the data set is ever made, and a saved model needs
no separate preprocessing to predict.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from imgpipe.params import CnnParams, DenseParams

Builder = Callable[..., keras.Model]


def build_dense(
    input_shape: tuple[int, int, int], num_classes: int, params: DenseParams
) -> keras.Model:
    """Fully connected net on flattened pixels: [Dense -> Dropout] * k -> softmax.

    Pixels are scaled to [-1, 1]: zero-centred inputs train a net without batch norm markedly
    better than [0, 1] (0.66 against 0.63 test accuracy on Dogs vs. Cats at 32x32 RGB).
    Horizontal flips (training only) are the one augmentation that suits flattened pixels.
    """
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="pixels")  # (N, H, W, C)
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs)
    if params.flip == "horizontal":
        x = layers.RandomFlip("horizontal", name="flip")(x)
    x = layers.Flatten(name="flatten")(x)  # (N, H*W*C)
    for index, units in enumerate(params.hidden_units, start=1):
        x = layers.Dense(units, activation="relu", name=f"dense_{index}")(x)
        if params.dropout > 0:
            x = layers.Dropout(params.dropout, name=f"dropout_{index}")(x)
    # float32 output keeps softmax and the loss exact under a mixed-precision policy
    outputs = layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name="dense")


def _augmentation(params: CnnParams) -> list[layers.Layer]:
    augment = params.augment
    steps: list[layers.Layer] = []
    if augment.flip != "none":
        steps.append(layers.RandomFlip(augment.flip, name="flip"))
    if augment.rotation > 0:
        steps.append(layers.RandomRotation(augment.rotation, fill_mode="reflect", name="rotate"))
    if augment.zoom > 0:
        steps.append(layers.RandomZoom(augment.zoom, fill_mode="reflect", name="zoom"))
    if augment.shift > 0:
        steps.append(
            layers.RandomTranslation(
                augment.shift, augment.shift, fill_mode="reflect", name="shift"
            )
        )
    return steps


def build_cnn(
    input_shape: tuple[int, int, int], num_classes: int, params: CnnParams
) -> keras.Model:
    """VGG-style CNN: augmentation, [Conv -> (BN) -> ReLU] * n -> MaxPool per block, dense head."""
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="pixels")  # (N, H, W, C)
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    for step in _augmentation(params):  # active only while training
        x = step(x)
    for block, filters in enumerate(params.filters, start=1):
        for conv in range(1, params.convs_per_block + 1):
            name = f"block{block}_conv{conv}"
            x = layers.Conv2D(
                filters, 3, padding="same", use_bias=not params.batch_norm, name=name
            )(x)
            if params.batch_norm:
                x = layers.BatchNormalization(
                    momentum=params.batch_norm_momentum, name=f"{name}_bn"
                )(x)
            x = layers.Activation("relu", name=f"{name}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)  # halves H and W
    if params.pooling == "global_average":
        x = layers.GlobalAveragePooling2D(name="pool")(x)  # (N, filters[-1])
    else:
        x = layers.Flatten(name="flatten")(x)
    if params.dropout > 0:
        x = layers.Dropout(params.dropout, name="head_dropout")(x)
    x = layers.Dense(params.head_units, activation="relu", name="head")(x)
    if params.dropout > 0:
        x = layers.Dropout(params.dropout, name="head_dropout_2")(x)
    outputs = layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name="cnn")


MODEL_BUILDERS: dict[str, Builder] = {"dense": build_dense, "cnn": build_cnn}


def build_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, params: DenseParams | CnnParams
) -> keras.Model:
    """Build a registered Keras model by name."""
    try:
        builder = MODEL_BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"unknown Keras model {name!r}; known: {', '.join(MODEL_BUILDERS)}"
        ) from None
    return builder(input_shape, num_classes, params)


def build_optimizer(
    name: str,
    *,
    learning_rate: float,
    decay_steps: int,
    decay_rate: float,
    schedule: str = "exponential",
    total_steps: int | None = None,
) -> keras.optimizers.Optimizer:
    """An optimizer with a learning-rate schedule.

    exponential: lr * decay_rate ** (step / decay_steps) (decay_rate 1.0 = constant);
    cosine: from lr down to 0 over total_steps updates (the whole run), then 0.
    """
    rate: float | keras.optimizers.schedules.LearningRateSchedule = learning_rate
    if schedule == "cosine":
        if not total_steps or total_steps < 1:
            raise ValueError(f"a cosine schedule needs total_steps >= 1, got {total_steps!r}")
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps)
    elif schedule != "exponential":
        raise ValueError(f"unknown schedule {schedule!r}; known: exponential, cosine")
    elif decay_rate < 1.0:
        rate = keras.optimizers.schedules.ExponentialDecay(
            learning_rate, decay_steps=decay_steps, decay_rate=decay_rate
        )
    optimizers = {
        "adam": keras.optimizers.Adam,
        "adamax": keras.optimizers.Adamax,
        "rmsprop": keras.optimizers.RMSprop,
        "sgd": keras.optimizers.SGD,
    }
    try:
        return optimizers[name](learning_rate=rate)
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(optimizers)}") from None
