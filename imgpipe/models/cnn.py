"""`cnn`: a VGG-style convolutional net with augmentation, the CNN tutorial's model done better."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from imgpipe.keras_models import KerasModelType, KerasParams
from imgpipe.sections import Section, check_positive

if TYPE_CHECKING:
    import keras
    from keras import layers


class AugmentParams(Section):
    """params.yaml `cnn.augment:`, random changes to each training image."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"]
    rotation: float = Field(ge=0, le=1)  # fraction of a full turn
    zoom: float = Field(ge=0, lt=1)
    shift: float = Field(ge=0, lt=1)  # fraction of height and width


class CnnParams(KerasParams):
    """params.yaml `cnn:`."""

    filters: list[int] = Field(min_length=1)
    convs_per_block: int = Field(ge=1)
    batch_norm: bool
    # weight of the old moving mean/variance at each training step
    batch_norm_momentum: float = Field(gt=0, lt=1)
    pooling: Literal["global_average", "flatten"]
    head_units: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    augment: AugmentParams

    @model_validator(mode="after")
    def _positive_filters(self) -> CnnParams:
        check_positive(self.filters, "filters")
        return self


def _augmentation(augment: AugmentParams) -> list[layers.Layer]:
    from keras import layers

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


class CnnType(KerasModelType):
    """Augmentation, [Conv -> (BN) -> ReLU] * n -> MaxPool per block, pooled dense head."""

    params_class = CnnParams

    def build(
        self, input_shape: tuple[int, int, int], num_classes: int, params: CnnParams
    ) -> keras.Model:
        """The network for one view and class count (augmentation is active only in training)."""
        import keras
        from keras import layers

        inputs = keras.Input(shape=input_shape, dtype="uint8", name="pixels")  # (N, H, W, C)
        x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
        for step in _augmentation(params.augment):
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


MODEL_TYPE = CnnType()
