"""`pretrained`: a Keras Applications backbone (ImageNet weights, a weights file, or none), its
head trained with the backbone frozen, then the whole net fine-tuned.

The transfer-learning recipe of Keras' guide: the backbone (without its classifier) keeps its
batch normalisation frozen, in inference mode on its own statistics, in both phases; the frozen
phase trains only the new head (pooling, dropout, softmax); the fine-tuning phase unfreezes the
rest of the backbone and trains everything at a lower learning rate, with a new optimizer.
Each phase has its own epochs and learning rate. The backbone brings its own preprocessing
(`include_preprocessing`): the model takes uint8 pixels like every other.

Not in the default `models:` (a default `dvc repro` must work offline): add it with
`dvc exp run -S '+models.pretrained=rgb64'` or under `models:` in params.yaml.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from imgpipe.keras_models import (
    OPTIMIZERS,
    KerasModelType,
    KerasParams,
    build_optimizer,
    training_loss,
)
from imgpipe.precision import PRECISIONS
from imgpipe.runtime import StageError
from imgpipe.sections import SCHEDULES, Section

if TYPE_CHECKING:
    import keras


MIN_SIDE = 32  # the smallest height and width both backbone families accept
PHASES = ("frozen", "fine_tune")  # in the order they train
MOBILENET_V3_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/"
EFFICIENTNET_V2_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/"
)


@dataclass(frozen=True)
class Backbone:
    """One Keras Applications backbone: how to build it and the ImageNet file Keras caches."""

    function: str  # keras.applications.<function>
    options: tuple[tuple[str, object], ...]  # its further keyword arguments
    imagenet_file: str  # the no-top weights file Keras downloads into <keras home>/models/
    base_url: str

    @property
    def imagenet_url(self) -> str:
        """Where Keras downloads imagenet_file from."""
        return self.base_url + self.imagenet_file


# params.yaml `pretrained.backbone` -> the backbone; the file names are the ones Keras' own
# mobilenet_v3.py and efficientnet_v2.py ask get_file for (include_top=False)
BACKBONES = {
    "MobileNetV3Small": Backbone(
        "MobileNetV3Small",
        (),
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        MOBILENET_V3_URL,
    ),
    "MobileNetV3SmallMinimalistic": Backbone(
        "MobileNetV3Small",
        (("minimalistic", True),),
        "weights_mobilenet_v3_small_minimalistic_224_1.0_float_no_top_v2.h5",
        MOBILENET_V3_URL,
    ),
    "MobileNetV3Large": Backbone(
        "MobileNetV3Large",
        (),
        "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        MOBILENET_V3_URL,
    ),
    "EfficientNetV2B0": Backbone(
        "EfficientNetV2B0", (), "efficientnetv2-b0_notop.h5", EFFICIENTNET_V2_URL
    ),
    "EfficientNetV2B1": Backbone(
        "EfficientNetV2B1", (), "efficientnetv2-b1_notop.h5", EFFICIENTNET_V2_URL
    ),
}


class PhaseParams(Section):
    """params.yaml `pretrained.frozen:` and `pretrained.fine_tune:`, one training phase."""

    epochs: int = Field(ge=0)  # 0 = skip the phase
    learning_rate: float = Field(gt=0)  # the phase's peak rate (its schedule starts afresh)


class PretrainedParams(Section):
    """params.yaml `pretrained:`."""

    backbone: Literal[tuple(BACKBONES)]  # type: ignore[valid-type]
    # imagenet (Keras' own download and cache), none (random), or the path of a Keras weights
    # file (.weights.h5, or Keras' own no-top .h5) of this backbone, under the repository's
    # weights/ folder, which the `weights` stage hashes for DVC
    weights: str = Field(min_length=1)
    dropout: float = Field(ge=0, lt=1)  # before the softmax
    flip: Literal["none", "horizontal"]  # random left-right flips while training
    frozen: PhaseParams  # the backbone frozen: only the head trains
    fine_tune: PhaseParams  # everything trains but batch norm (frozen, in inference mode)
    optimizer: Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]
    weight_decay: float = Field(ge=0, lt=1)  # x learning rate per step; 0 = none
    schedule: Literal[SCHEDULES]  # type: ignore[valid-type]  # within each phase
    warmup_epochs: float = Field(ge=0)  # cosine: at the start of each phase
    decay_steps: int = Field(ge=1)
    decay_rate: float = Field(gt=0, le=1)
    label_smoothing: float = Field(ge=0, lt=1)
    batch_size: int = Field(ge=1)
    precision: Literal["auto", *PRECISIONS]  # type: ignore[valid-type]

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, value: str) -> str:
        if value not in ("imagenet", "none") and not value.endswith(".h5"):
            raise ValueError(
                "must be imagenet, none, or the path of a Keras weights file of the backbone "
                "(.weights.h5, or Keras' own no-top .h5)"
            )
        return value

    @model_validator(mode="after")
    def _phases_fit(self) -> PretrainedParams:
        if self.epochs < 1:
            raise ValueError("frozen.epochs + fine_tune.epochs must be at least 1")
        if self.warmup_epochs and self.schedule != "cosine":
            raise ValueError("warmup_epochs needs schedule: cosine (set warmup_epochs: 0)")
        for name in PHASES:
            epochs = self.phase(name).epochs
            if epochs and self.warmup_epochs >= epochs:
                raise ValueError(
                    f"warmup_epochs ({self.warmup_epochs}) must be less than {name}.epochs "
                    f"({epochs}): each phase warms up at its start"
                )
        return self

    # KerasParams' own rule (its section is not a KerasParams, but has label_smoothing too)
    one_hot_targets = KerasParams.one_hot_targets

    @property
    def epochs(self) -> int:
        """Epochs of the whole run: the frozen phase's, then the fine-tuning phase's."""
        return self.frozen.epochs + self.fine_tune.epochs

    def phase(self, name: str) -> PhaseParams:
        """The frozen or fine_tune section."""
        return self.frozen if name == "frozen" else self.fine_tune

    def phase_of(self, epoch: int) -> str:
        """The phase that trains epoch `epoch` (from 0)."""
        if epoch < self.frozen.epochs or not self.fine_tune.epochs:
            return "frozen"
        return "fine_tune"

    def keras_params(self, name: str) -> KerasParams:
        """One phase's optimizer settings as a Keras model section: its epochs and learning
        rate, the rest of this section's."""
        shared = self.model_dump(exclude={"backbone", "weights", "dropout", "flip", *PHASES})
        return KerasParams(**shared, **self.phase(name).model_dump())


def keras_cache_file(file_name: str) -> Path:
    """Where Keras keeps a downloaded model file: <keras home>/models/<file_name>, the home being
    $KERAS_HOME, else ~/.keras (made here as importing Keras makes it), else /tmp/.keras where
    that is not writable (keras.utils.get_file's own fallback)."""
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    with contextlib.suppress(OSError):
        home.mkdir(parents=True, exist_ok=True)
    if not os.access(home, os.W_OK):
        home = Path("/tmp/.keras")
    return home / "models" / file_name


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_record(params: PretrainedParams, folder: Path) -> dict[str, str]:
    """What the `weights` stage records for pretrained: the weights' name, and for a file its
    SHA-256 (so the record changes exactly when the file's bytes do). The file must lie under
    `folder` (weights/), the folder DVC hashes for that stage."""
    if params.weights == "none":
        return {"weights": "none"}
    if params.weights == "imagenet":  # Keras pins the file by its hash: its name says it all
        return {"weights": "imagenet", "file": BACKBONES[params.backbone].imagenet_file}
    path = Path(params.weights)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise StageError(
            f"pretrained.weights {params.weights} is not under {folder}/, the folder whose "
            f"content DVC tracks for pretrained: move the file into {folder}/ (and `dvc add` it) "
            "and set pretrained.weights to its new path"
        )
    return {"weights": params.weights, "sha256": _existing_sha256(path)}


def _existing_sha256(path: Path) -> str:
    """file_sha256 of a weights file, or a StageError that says what to do."""
    if not path.is_file():
        raise StageError(
            f"pretrained.weights {path} not found: `dvc pull` it, or put the backbone's "
            "weights file there (docs/pipeline.md 'Fine-tuning a pretrained backbone')"
        )
    return file_sha256(path)


def imagenet_weights(backbone: Backbone) -> Path:
    """The backbone's ImageNet file in Keras' cache, downloaded by Keras if absent; where that
    fails (offline), a one-line StageError naming the file and where to put it."""
    cached = keras_cache_file(backbone.imagenet_file)
    if cached.is_file():
        return cached
    import keras

    try:
        keras.utils.get_file(
            backbone.imagenet_file,
            backbone.imagenet_url,
            cache_dir=str(cached.parent.parent),
            cache_subdir="models",
        )
    except Exception:  # get_file wraps URLError, HTTPError, a proxy's refusal: all one to us
        raise StageError(
            f"pretrained.weights imagenet: {backbone.imagenet_file} is not in Keras' cache and "
            f"cannot be downloaded here: download {backbone.imagenet_url} and put it at "
            f"{cached} (or set pretrained.weights to a weights file, or none)"
        ) from None
    return cached


class PretrainedType(KerasModelType):
    """Backbone (batch norm frozen) -> global average pool -> dropout -> softmax, trained frozen
    then fine-tuned."""

    params_class = PretrainedParams

    def starting_point(self, params: PretrainedParams) -> dict[str, str]:
        """The weights training starts from and their SHA-256 (the file's bytes); stops, saying
        what to do, where they cannot be had: before any table is read."""
        if params.weights == "none":
            return {"weights": "none"}
        if params.weights == "imagenet":
            cached = imagenet_weights(BACKBONES[params.backbone])
            return {"weights": "imagenet", "weights_sha256": file_sha256(cached)}
        return {"weights": params.weights, "weights_sha256": _existing_sha256(Path(params.weights))}

    def view_problem(self, shape: tuple[int, int, int]) -> str | None:
        """Why a view of this (H, W, C) cannot feed the backbone, or None."""
        height, width, channels = shape
        if channels != 3 or min(height, width) < MIN_SIDE:
            return (
                f"pretrained needs an RGB view of at least {MIN_SIDE}x{MIN_SIDE} (the backbones' "
                f"minimum), got {height}x{width}x{channels}: e.g. models.pretrained: rgb64"
            )
        return None

    def backbone(self, input_shape: tuple[int, int, int], params: PretrainedParams) -> keras.Model:
        """The Keras Applications backbone without its classifier, with its own preprocessing
        (it takes float RGB in [0, 255]), its weights as params.weights says."""
        import keras

        spec = BACKBONES[params.backbone]
        model = getattr(keras.applications, spec.function)(
            input_shape=input_shape,
            include_top=False,
            weights=None,
            include_preprocessing=True,
            **dict(spec.options),
        )
        if params.weights == "imagenet":
            model.load_weights(str(imagenet_weights(spec)))
        elif params.weights != "none":
            model.load_weights(params.weights)
        return model

    def build(
        self, input_shape: tuple[int, int, int], num_classes: int, params: PretrainedParams
    ) -> keras.Model:
        """uint8 pixels -> float -> (flip) -> backbone -> pooled head (the backbone frozen:
        compile_phase sets what trains)."""
        import keras
        from keras import layers

        inputs = keras.Input(shape=input_shape, dtype="uint8", name="pixels")  # (N, H, W, 3)
        x = layers.Rescaling(1.0, name="to_float")(inputs)  # the backbone scales [0, 255] itself
        if params.flip == "horizontal":
            x = layers.RandomFlip("horizontal", name="flip")(x)
        base = self.backbone(input_shape, params)
        base.trainable = False
        x = base(x)
        x = layers.GlobalAveragePooling2D(name="pool")(x)  # (N, channels)
        if params.dropout > 0:
            x = layers.Dropout(params.dropout, name="head_dropout")(x)
        outputs = layers.Dense(
            num_classes, activation="softmax", dtype="float32", name="probabilities"
        )(x)
        return keras.Model(inputs, outputs, name="pretrained")

    def compiled_model(
        self,
        params: PretrainedParams,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        train_size: int,
        precision: str,
    ) -> keras.Model:
        """The model built in `precision` and compiled for its first phase."""
        import keras

        keras.mixed_precision.set_dtype_policy(precision)
        try:
            model = self.build(input_shape, num_classes, params)  # type: ignore[arg-type]
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        self.compile_phase(model, params, params.phase_of(0), train_size)
        return model

    def compile_phase(
        self, model: keras.Model, params: PretrainedParams, phase: str, train_size: int
    ) -> None:
        """Set what trains in `phase` (the backbone frozen, or everything but its batch norm) and
        compile a new optimizer with the phase's learning rate and schedule over the phase's
        steps.

        Batch norm stays frozen in both phases, so it runs in inference mode on its ImageNet
        statistics, as Keras' transfer-learning guide intends: its `base(x, training=False)`
        does not hold in Keras 3, whose Functional models pass fit's training flag into every
        nested layer, and fine-tuning moved the statistics (tests/test_pretrained.py)."""
        import keras

        backbone = backbone_of(model)
        backbone.trainable = phase == "fine_tune"  # every layer inside, batch norm included
        for layer in backbone.layers:  # (a Keras Applications model nests no model)
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # trainable False: inference mode in Keras 3
        settings = params.keras_params(phase)
        steps = settings.epochs * math.ceil(train_size / params.batch_size)
        model.compile(
            optimizer=build_optimizer(settings, total_steps=max(steps, 1)),
            loss=training_loss(settings),
            metrics=["accuracy"],
        )
        model.optimizer.build(model.trainable_variables)  # its slots, before any restore

    def prepare_epoch(
        self, model: keras.Model, params: PretrainedParams, epoch: int, *, train_size: int
    ) -> None:
        """At the first epoch of the fine-tuning phase (or resuming into it), unfreeze the
        backbone and compile the phase's optimizer; nothing within a phase."""
        phase = params.phase_of(epoch)
        if backbone_of(model).trainable != (phase == "fine_tune"):
            self.compile_phase(model, params, phase, train_size)


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone inside a pretrained model: its one nested model."""
    import keras

    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


MODEL_TYPE = PretrainedType()
