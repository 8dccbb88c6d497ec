"""`cnn`: a convolutional net with augmentation, the CNN tutorial's model done better.

Blocks of 3x3 convolutions (VGG-style, or residual with a 1x1 or an identity shortcut), each
ending in a max-pool, after an optional stride-2 stem; global average pooling and a small head.
With `flip_tta` the saved model averages its predictions for each image and its mirror image,
and with `tta_shift` for the image shifted up, down, left and right too (test-time augmentation).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from imgpipe.keras_models import KerasModelType, KerasParams
from imgpipe.runtime import StageError
from imgpipe.sections import Section, check_positive

if TYPE_CHECKING:
    import keras
    from keras import layers

    from imgpipe.registry import TrainingData

log = logging.getLogger("imgpipe.models.cnn")
SMALL_IMAGES = "cnn_small_images"  # TrainingData.derived's key for the resized table


class AugmentParams(Section):
    """params.yaml `cnn.augment:`, random changes to each training image."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"]
    rotation: float = Field(ge=0, le=1)  # fraction of a full turn
    zoom: float = Field(ge=0, lt=1)
    shift: float = Field(ge=0, lt=1)  # fraction of height and width
    # pad-and-random-crop on the uint8 batch: whole-pixel shifts of up to this fraction of height
    # and width, edges reflected; the cheap kind of shift (`shift` is sub-pixel, a projective
    # transform of float images)
    crop: float = Field(ge=0, lt=0.5)


class ProgressiveParams(Section):
    """params.yaml `cnn.progressive:`, progressive resizing: smaller images first."""

    # this share of the epochs (rounded, and never the last), the first ones, train on images
    # resized to `scale` of the view's height and width (about scale squared of the work), the
    # rest on the full view; a share, so that `-S cnn.epochs=N` keeps the proportion; 0 = none
    fraction: float = Field(ge=0, lt=1)
    scale: float = Field(gt=0, le=1)


class CnnParams(KerasParams):
    """params.yaml `cnn:`."""

    # a 3x3 convolution (filters[0] wide, batch norm, ReLU) before the blocks; with stride 2 it
    # halves height and width, and every block after it costs a quarter as much; _pool adds a
    # 2x2 max-pool after it (a quarter of the height and width, as ResNet's stem)
    # patchN: an NxN convolution with stride N (non-overlapping patches, as ConvNeXt's stem):
    # height and width divided by N with no larger intermediate maps (patch4 on 128x128 costs
    # the blocks what conv3x3_stride2 on 64x64 does)
    stem: Literal[
        "none", "conv3x3", "conv3x3_stride2", "conv3x3_stride2_pool", "patch2", "patch3", "patch4"
    ]
    filters: list[int] = Field(min_length=1)
    convs_per_block: int = Field(ge=1)
    # each block adds a shortcut to its last convolution's output (before the last ReLU)
    residual: bool
    # the residual shortcut: conv1x1, the block's input through a 1x1 convolution (and batch
    # norm); identity, the block's first convolution's output (it has the block's width already),
    # so no extra convolution: with convs_per_block 2, a residual around the second convolution
    shortcut: Literal["conv1x1", "identity"]
    batch_norm: bool
    # weight of the old moving mean/variance at each training step
    batch_norm_momentum: float = Field(gt=0, lt=1)
    pooling: Literal["global_average", "flatten"]
    head_units: int = Field(ge=0)  # a ReLU layer before the output; 0 = none
    dropout: float = Field(ge=0, lt=1)
    augment: AugmentParams
    # saved, evaluated and served model: the mean of the probabilities for the image and for
    # its left-right mirror image (twice the prediction work)
    flip_tta: bool
    # the saved model also averages its probabilities for the image shifted up, down, left and
    # right by this fraction of its height and width (whole pixels, edges reflected, as the crop
    # fills them): 5 views of each image, 10 with flip_tta, in one batch; 0 = none
    tta_shift: float = Field(ge=0, lt=0.5)
    # momentum of an exponential moving average of the weights, updated after every step; the
    # trained model ends with the average (its batch-norm statistics measured again for it);
    # 0 = none, the last step's weights
    ema: float = Field(ge=0, lt=1)
    progressive: ProgressiveParams
    # CutMix: this share of the training batches (drawn per batch) has a random box of each
    # image replaced by the same box of the next image in the batch, and its targets mixed by
    # the box's share of the pixels (box area uniform in 0..1); 0 = none
    cutmix: float = Field(ge=0, le=1)

    @property
    def one_hot_targets(self) -> bool:
        """One-hot targets where labels are smoothed or mixed (cutmix)."""
        return self.label_smoothing > 0 or self.cutmix > 0

    @model_validator(mode="after")
    def _resizing_needs_a_pooled_head(self) -> CnnParams:
        if self.small_epochs and self.pooling != "global_average":
            raise ValueError(
                "progressive resizing needs pooling: global_average (flatten's head is sized for "
                "one image size): set progressive.fraction to 0 or pooling to global_average"
            )
        return self

    @property
    def small_epochs(self) -> int:
        """How many epochs, the first ones, train on smaller images (progressive resizing):
        progressive.fraction of them, rounded, always leaving the last on the full view."""
        return min(math.floor(self.progressive.fraction * self.epochs + 0.5), self.epochs - 1)

    @model_validator(mode="after")
    def _positive_filters(self) -> CnnParams:
        check_positive(self.filters, "filters")
        return self

    @model_validator(mode="after")
    def _identity_needs_two_convolutions(self) -> CnnParams:
        if self.residual and self.shortcut == "identity" and self.convs_per_block < 2:
            raise ValueError(
                "shortcut identity adds the block's first convolution's output to its last, so "
                "it needs convs_per_block 2 or more: raise convs_per_block or set shortcut "
                "conv1x1"
            )
        return self


def _mirror_in_crop(augment: AugmentParams) -> bool:
    """Whether the crop layer mirrors images too (left to right, at random): with a crop, a
    horizontal flip costs nothing more in its gather of uint8 pixels, where Keras' RandomFlip
    moves float32 ones (6.8 ms of a 143 ms training step of the 128x128 patch4 net)."""
    return augment.crop > 0 and augment.flip == "horizontal"


def _augmentation(augment: AugmentParams) -> list[layers.Layer]:
    from keras import layers

    steps: list[layers.Layer] = []
    if augment.flip != "none" and not _mirror_in_crop(augment):
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


def _conv(
    x: keras.KerasTensor,
    filters: int,
    name: str,
    params: CnnParams,
    *,
    size: int = 3,
    stride: int = 1,
    relu: bool = True,
) -> keras.KerasTensor:
    """A convolution, with batch norm (then no bias) if the section asks, and a ReLU."""
    from keras import layers

    x = layers.Conv2D(
        filters,
        size,
        strides=stride,
        padding="same",
        use_bias=not params.batch_norm,
        name=name,
    )(x)
    if params.batch_norm:
        x = layers.BatchNormalization(momentum=params.batch_norm_momentum, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def _block(x: keras.KerasTensor, block: int, filters: int, params: CnnParams) -> keras.KerasTensor:
    """Block number `block`: its convolutions (and shortcut), then a max-pool."""
    from keras import layers

    shortcut = x
    for index in range(1, params.convs_per_block + 1):
        # a residual block's last ReLU comes after the addition
        relu = not (params.residual and index == params.convs_per_block)
        x = _conv(x, filters, f"block{block}_conv{index}", params, relu=relu)
        if index == 1 and params.shortcut == "identity":
            shortcut = x
    if params.residual:
        if params.shortcut == "conv1x1":
            shortcut = _conv(
                shortcut, filters, f"block{block}_shortcut", params, size=1, relu=False
            )
        x = layers.Add(name=f"block{block}_add")([x, shortcut])
        x = layers.Activation("relu", name=f"block{block}_relu")(x)
    return layers.MaxPooling2D(2, name=f"block{block}_pool")(x)  # halves H and W


def _head(x: keras.KerasTensor, num_classes: int, params: CnnParams) -> keras.KerasTensor:
    """Pooling, dropout and the optional hidden layer, then the float32 softmax."""
    from keras import layers

    if params.pooling == "global_average":
        x = layers.GlobalAveragePooling2D(name="pool")(x)  # (N, filters[-1])
    else:
        x = layers.Flatten(name="flatten")(x)
    if params.dropout > 0:
        x = layers.Dropout(params.dropout, name="head_dropout")(x)
    if params.head_units:
        x = layers.Dense(params.head_units, activation="relu", name="head")(x)
        if params.dropout > 0:
            x = layers.Dropout(params.dropout, name="head_dropout_2")(x)
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)


class CnnType(KerasModelType):
    """Augmentation, (stem), [Conv -> (BN) -> ReLU] * n (+ shortcut) -> MaxPool per block,
    pooled head."""

    params_class = CnnParams

    def build(
        self, input_shape: tuple[int, int, int], num_classes: int, params: CnnParams
    ) -> keras.Model:
        """The network for one view and class count (augmentation is active only in training)."""
        import keras
        from keras import layers

        inputs = keras.Input(shape=input_shape, dtype="uint8", name="pixels")  # (N, H, W, C)
        x = inputs
        if params.augment.crop > 0:  # on the uint8 batch: a quarter of float32's bytes to move
            crop = custom_layers()["RandomCropShift"]
            x = crop(params.augment.crop, mirror=_mirror_in_crop(params.augment), name="crop")(x)
        if params.small_epochs:  # the full view until prepare_epoch says otherwise; first,
            # so that everything after it works on the smaller images
            x = custom_layers()["TrainingResize"](name="progressive_resize")(x)
        x = layers.Rescaling(1.0 / 255, name="scale")(x)
        for step in _augmentation(params.augment):
            x = step(x)
        if params.stem.startswith("patch"):
            size = int(params.stem.removeprefix("patch"))
            x = _conv(x, params.filters[0], "stem", params, size=size, stride=size)
        elif params.stem != "none":
            x = _conv(
                x, params.filters[0], "stem", params, stride=2 if "stride2" in params.stem else 1
            )
            if params.stem.endswith("_pool"):
                x = layers.MaxPooling2D(2, name="stem_pool")(x)
        for block, filters in enumerate(params.filters, start=1):
            x = _block(x, block, filters, params)
        return keras.Model(inputs, _head(x, num_classes, params), name="cnn")

    def section_problem(self, params: CnnParams, shape: tuple[int, int, int]) -> str | None:
        """Why the view, or progressive resizing's smaller images, are too small for the stem
        and the blocks (each block's 2x2 max-pool halves the maps, which must keep a pixel),
        or None."""
        sides = {"the view's images": min(shape[:2])}
        if params.small_epochs:
            sides["progressive resizing's smaller images"] = min(small_size(shape[:2], params))
        blocks = len(params.filters)
        for what, side in sides.items():
            maps = _maps_after_stem(side, params.stem)
            if maps < 2**blocks:
                return (
                    f"{what} are {side} pixels on their short side: the {params.stem} stem "
                    f"leaves maps of {maps}, and {blocks} blocks that each halve them need at "
                    f"least {2**blocks}; use a larger view, a stem that shrinks less (e.g. "
                    "cnn.stem: conv3x3_stride2), fewer cnn.filters"
                    + (", or cnn.progressive.fraction: 0" if params.small_epochs else "")
                )
        return None

    def prepare_epoch(
        self, model: keras.Model, params: CnnParams, epoch: int, *, train_size: int
    ) -> None:
        """Progressive resizing: the image size epoch `epoch` trains on (traced again when it
        changes); nothing without it.

        In the smaller images' epochs the model takes batches of any height and width: those
        of a table in memory come resized already (training_pixels), a streamed table's are
        resized by the progressive_resize layer. The full view's epochs take the view's size
        only, as the saved model does.
        """
        if not params.small_epochs:
            return
        import keras

        layer = model.get_layer("progressive_resize")
        height, width, channels = model.input_shape[1:]
        size = small_size((height, width), params) if epoch < params.small_epochs else None
        if (layer.height, layer.width) != (size or (height, width)):
            layer.height, layer.width = size or (height, width)
            # the spec Keras makes from the model's input, with free height and width if small
            model.input_spec = [
                keras.layers.InputSpec(
                    shape=(None, None, None, channels) if size else (None, height, width, channels),
                    allow_last_axis_squeeze=True,
                    name=model.inputs[0].name,
                )
            ]
            model.train_function = None  # Keras traces the training step again for the new size

    def epoch_input(
        self,
        params: CnnParams,
        data: TrainingData,
        targets: tuple[np.ndarray, np.ndarray],
        *,
        seed: int,
        epoch: int,
    ) -> dict[str, Any]:
        """KerasModelType's epoch input, its training batches cut-mixed where params.cutmix."""
        arguments = super().epoch_input(params, data, targets, seed=seed, epoch=epoch)
        if not params.cutmix:
            return arguments
        if data.train_stream is not None:
            raise StageError(
                "cnn.cutmix mixes batches of a train table in memory, and this one is streamed: "
                "raise train.stream_over_mb above the table's size, or set cnn.cutmix to 0"
            )
        arguments["x"] = cutmix_batches(arguments["x"], params.cutmix, seed=seed, epoch=epoch)
        return arguments

    def training_pixels(self, params: CnnParams, data: TrainingData, epoch: int) -> np.ndarray:
        """Progressive resizing's smaller images in its first epochs: the train table resized
        once, when the first of them starts, and kept in data.derived until the full view's
        epochs begin (a quarter of the table's bytes at scale 0.5); the table otherwise."""
        if epoch >= params.small_epochs:
            data.derived.pop(SMALL_IMAGES, None)
            return data.x_train
        size = small_size(data.image_shape[:2], params)
        small = data.derived.get(SMALL_IMAGES)
        if small is None or small.shape[1:3] != size:
            started = time.perf_counter()
            small = data.derived[SMALL_IMAGES] = resized_table(data.x_train, size)
            log.info(
                "progressive resizing: %d training images resized to %dx%d for the first %d "
                "epochs in %.1f s",
                len(small),
                *size,
                params.small_epochs,
                time.perf_counter() - started,
            )
        return small

    def weight_average(self, params: CnnParams) -> float:
        """cnn.ema."""
        return params.ema

    def inference_model(self, model: keras.Model, params: CnnParams) -> keras.Model:
        """With flip_tta or tta_shift, a model around the trained one that averages its
        probabilities over each image's views (views_per_image); the trained model otherwise."""
        views = views_per_image(params)
        if views == 1:
            return model
        import keras

        made = custom_layers()
        inputs = keras.Input(shape=model.input_shape[1:], dtype="uint8", name="pixels")
        batch = made["TestTimeViews"](params.tta_shift, params.flip_tta, name="views")(inputs)
        outputs = made["ViewMean"](views, name="view_mean", dtype="float32")(model(batch))
        return keras.Model(inputs, outputs, name="cnn_tta")

    def predict_proba(self, model: keras.Model, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """Probabilities as KerasModelType's, batch_size counted in views: a model averaging
        V views of each image gets batch_size // V images at a time (at least one), so that a
        forward pass holds as many images whatever the test-time views (the server's batches
        of up to 256 images would otherwise hold 2,560)."""
        return super().predict_proba(model, pixels, max(batch_size // _views_of(model), 1))

    def load(self, path: Path) -> keras.Model:
        """Load a .keras file, flip-averaging and cropping ones included."""
        custom_layers()  # registered before Keras looks the names up
        return super().load(path)


def cutmix_batches(batches: Any, share: float, *, seed: int, epoch: int) -> Any:
    """CutMix on a tf.data pipeline of (uint8 pixels (N, H, W, C), one-hot targets (N, K))
    batches: in `share` of them, drawn per batch, a box of each image is replaced by the same
    box of the next image in the batch (the last image's partner is the first), and each row of
    targets becomes (1 - a) x its own + a x its partner's, a being the box's share of the
    pixels. The box: area 1 - lambda of the image with lambda uniform in 0..1, the image's
    proportions, centred anywhere, clipped at the edges. Its random numbers depend only on
    (seed, epoch, batch), so a resumed run mixes as an uninterrupted one."""
    import tensorflow as tf

    def mix(index: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        pixels, targets = batch
        height, width = pixels.shape[1], pixels.shape[2]
        key = tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + epoch, index])
        draw = tf.random.stateless_uniform([4], seed=key)  # apply?, lambda, centre y, centre x
        side = tf.sqrt(1.0 - draw[1])  # of the box, as a share of the image's height and width
        boxes = []
        for size, centre in ((height, draw[2]), (width, draw[3])):
            half = tf.cast(tf.round(side * size), tf.int32) // 2
            middle = tf.cast(centre * size, tf.int32)
            boxes.append((tf.maximum(middle - half, 0), tf.minimum(middle + half, size)))
        (top, bottom), (left, right) = boxes
        rows, cols = tf.range(height), tf.range(width)
        inside = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))
        inside &= draw[0] < share  # the whole batch as it was, in 1 - share of the batches
        partner = tf.roll(pixels, -1, axis=0)
        mixed = tf.where(inside[None, :, :, None], partner, pixels)
        area = tf.reduce_mean(tf.cast(inside, targets.dtype))
        return mixed, (1 - area) * targets + area * tf.roll(targets, -1, axis=0)

    return batches.enumerate().map(mix)


def _maps_after_stem(side: int, stem: str) -> int:
    """Height (or width) of the maps the stem makes from images of that side: its convolution
    pads ("same"), so stride N gives ceil(side / N); the _pool stem's 2x2 max-pool floors."""
    stride = {"conv3x3_stride2": 2, "conv3x3_stride2_pool": 2}.get(stem, 1)
    if stem.startswith("patch"):
        stride = int(stem.removeprefix("patch"))
    maps = math.ceil(side / stride)
    return maps // 2 if stem.endswith("_pool") else maps


def _views_of(model: keras.Model) -> int:
    """How many views of each image a saved model puts through the net in one pass: its
    ViewMean's; 1 for the others (the trained net, or the earlier flip averaging, which made
    one pass per view)."""
    layer = next((layer for layer in model.layers if layer.name == "view_mean"), None)
    return 1 if layer is None else layer.views


def views_per_image(params: CnnParams) -> int:
    """How many views of each image the saved model averages: the image, with tta_shift four
    shifted copies, and with flip_tta the mirror image of each."""
    return (5 if params.tta_shift else 1) * (2 if params.flip_tta else 1)


def reflected_shift(size: int, shift: int) -> np.ndarray:
    """Indices 0..size-1 moved by `shift` (positive: the content moves towards index 0), those
    past either edge reflected back into the image, as RandomCropShift fills its edges."""
    index = np.abs(np.arange(size) + shift)
    return (size - 1) - np.abs((size - 1) - index)


def small_size(view: tuple[int, int], params: CnnParams) -> tuple[int, int]:
    """(height, width) of progressive resizing's smaller images for a view's (height, width)."""
    return tuple(max(round(side * params.progressive.scale), 1) for side in view)  # type: ignore[return-value]


def resize_images(images: Any, size: tuple[int, int]) -> Any:
    """A batch (N, H, W, C) resized to size (height, width): bilinear with antialiasing;
    uint8 pixels come back as uint8, rounded, as a smaller view's would be."""
    from keras import ops

    resized = ops.image.resize(ops.cast(images, "float32"), size, antialias=True)
    if images.dtype == "uint8":
        resized = ops.cast(ops.clip(ops.round(resized), 0, 255), "uint8")
    return resized


def resized_table(pixels: np.ndarray, size: tuple[int, int], chunk: int = 512) -> np.ndarray:
    """A table of uint8 images (N, H, W, C) resized to size by resize_images, chunk images
    at a time (their float copies stay small)."""
    out = np.empty((len(pixels), *size, pixels.shape[-1]), dtype=np.uint8)
    for start in range(0, len(pixels), chunk):
        out[start : start + chunk] = np.asarray(resize_images(pixels[start : start + chunk], size))
    return out


@functools.cache
def custom_layers() -> dict[str, type[keras.layers.Layer]]:
    """The CNN's own Keras layers, by class name, each registered as imgpipe>Name, so that
    safe-mode loading accepts them; made on first use, so importing this module does not import
    Keras.

    MirrorLeftRight flips images (N, H, W, C) left to right, always, not only in training
    (the flip averaging of models saved before TestTimeViews).
    TestTimeViews turns a batch (N, H, W, C) into the batch of its views (V x N, H, W, C), view
    by view: the images, then with `shift` > 0 the images shifted by round(shift x H) pixels
    down and up, then by round(shift x W) right and left (edges reflected), then with `mirror`
    the mirror image of each of those. ViewMean(views) averages the net's probabilities for
    them, (V x N, K) to (N, K).
    TrainingResize resizes training batches to the size prepare_epoch sets (progressive
    resizing), and passes everything else through.
    RandomCropShift, in training only, shifts each image by a random whole number of pixels, up
    to `fraction` of its height and width each way, filling the edges by reflection, as padding
    and a random crop of the original size would, and with `mirror` flips half of them left to
    right (each image at random); one gather of the (uint8) batch, with no interpolation. Its
    random numbers come from a SeedGenerator (a model variable, so seeded by
    keras.utils.set_random_seed and saved with the training state).
    """
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="imgpipe")
    class MirrorLeftRight(keras.layers.Layer):
        def call(self, images: Any) -> Any:
            return keras.ops.flip(images, axis=2)

    @keras.saving.register_keras_serializable(package="imgpipe")
    class RandomCropShift(keras.layers.Layer):
        def __init__(
            self, fraction: float, mirror: bool = False, seed: int | None = None, **kwargs: Any
        ) -> None:
            super().__init__(**kwargs)
            self.fraction = fraction
            self.mirror = mirror
            self.seed = seed
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, images: Any, training: bool | None = None) -> Any:
            if not training:
                return images
            n = ops.shape(images)[0]
            height, width, channels = images.shape[1:]
            offsets = []
            for size in (height, width):
                most = round(self.fraction * size)
                shift = keras.random.randint((n, 1), -most, most + 1, seed=self.seed_generator)
                index = ops.abs(shift + ops.arange(size)[None, :])  # (N, size), reflected at 0
                offsets.append((size - 1) - ops.abs((size - 1) - index))  # and at size - 1
            rows, cols = offsets
            if self.mirror:  # read each row backwards in half the images, chosen at random
                flip = keras.random.randint((n, 1), 0, 2, seed=self.seed_generator)
                cols = ops.where(flip == 1, (width - 1) - cols, cols)
            # each output pixel's position in the batch flattened to (N * H * W, C)
            source = (ops.arange(n)[:, None, None] * height + rows[:, :, None]) * width
            source = source + cols[:, None, :]  # (N, H, W)
            pixels = ops.take(ops.reshape(images, (-1, channels)), ops.reshape(source, (-1,)), 0)
            return ops.reshape(pixels, (n, height, width, channels))

        def compute_output_shape(self, input_shape: tuple) -> tuple:
            return input_shape

        def get_config(self) -> dict[str, Any]:
            config = {"fraction": self.fraction, "mirror": self.mirror, "seed": self.seed}
            return {**super().get_config(), **config}

    return {
        "MirrorLeftRight": MirrorLeftRight,
        "RandomCropShift": RandomCropShift,
        "TrainingResize": _training_resize(),
        **_test_time_layers(),
    }


def _test_time_layers() -> dict[str, type[keras.layers.Layer]]:
    """custom_layers' TestTimeViews and ViewMean (see there)."""
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="imgpipe")
    class TestTimeViews(keras.layers.Layer):
        def __init__(self, shift: float, mirror: bool, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.shift = shift
            self.mirror = mirror

        def call(self, images: Any) -> Any:
            height, width = images.shape[1:3]
            views = [images]
            if self.shift:
                for axis, size in ((1, height), (2, width)):
                    step = max(round(self.shift * size), 1)
                    for shift in (-step, step):
                        index = reflected_shift(size, shift)
                        views.append(ops.take(images, ops.convert_to_tensor(index), axis=axis))
            if self.mirror:
                views += [ops.flip(view, axis=2) for view in views]
            return ops.concatenate(views, axis=0)

        def compute_output_shape(self, input_shape: tuple) -> tuple:
            return (None, *input_shape[1:])

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "shift": self.shift, "mirror": self.mirror}

    @keras.saving.register_keras_serializable(package="imgpipe")
    class ViewMean(keras.layers.Layer):
        def __init__(self, views: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.views = views

        def call(self, probabilities: Any) -> Any:
            classes = probabilities.shape[-1]
            grouped = ops.reshape(probabilities, (self.views, -1, classes))
            return ops.mean(ops.cast(grouped, "float32"), axis=0)

        def compute_output_shape(self, input_shape: tuple) -> tuple:
            return (None, input_shape[-1])

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "views": self.views}

    return {"TestTimeViews": TestTimeViews, "ViewMean": ViewMean}


def _training_resize() -> type[keras.layers.Layer]:
    """custom_layers' TrainingResize (see there)."""
    import keras

    @keras.saving.register_keras_serializable(package="imgpipe")
    class TrainingResize(keras.layers.Layer):
        # (height, width) that training batches (uint8 pixels) are resized to (bilinear,
        # antialiased, rounded); 0: as they come. Set between epochs (CnnType.prepare_epoch),
        # not saved: a loaded model, and every prediction, sees the full view
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.height = self.width = 0

        def call(self, images: Any, training: bool | None = None) -> Any:
            if not training or not self.height or images.shape[1:3] == (self.height, self.width):
                return images
            return resize_images(images, (self.height, self.width))

        def compute_output_shape(self, input_shape: tuple) -> tuple:
            return input_shape  # as at prediction; training's size changes between epochs

    return TrainingResize


MODEL_TYPE = CnnType()
