"""Tests for the model registry, the Keras builders and optimizers, and each type's training."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers

from imgpipe.checkpoints import TrainingCheckpoint
from imgpipe.keras_models import OPTIMIZERS, KerasModelType, build_optimizer
from imgpipe.keras_training import epoch_order, in_memory_batches, seed_everything
from imgpipe.models.cnn import (
    SMALL_IMAGES,
    CnnParams,
    ProgressiveParams,
    custom_layers,
    cutmix_batches,
    resize_images,
    resized_table,
)
from imgpipe.models.dense import DenseParams
from imgpipe.models.numpy_mlp import NumpyMlpParams
from imgpipe.numpy_net import NumpyMLP
from imgpipe.params import Params, load_params
from imgpipe.precision import bfloat16_hardware, choose_precision, cpu_flags
from imgpipe.registry import HISTORY_KEYS, ModelType, TrainingData, model_type, model_types
from imgpipe.runtime import StageError
from tests.support import ROOT, fit

DENSE = model_type("dense")
CNN = model_type("cnn")
assert isinstance(DENSE, KerasModelType) and isinstance(CNN, KerasModelType)

NUM_CLASSES = 5
GRAY_SHAPE = (12, 12, 1)
RGB_SHAPE = (16, 16, 3)
CROP = custom_layers()["RandomCropShift"]
AUGMENT_LAYERS = (
    layers.RandomFlip,
    layers.RandomRotation,
    layers.RandomZoom,
    layers.RandomTranslation,
    CROP,
)
NO_AUGMENT = {"flip": "none", "rotation": 0.0, "zoom": 0.0, "shift": 0.0, "crop": 0.0}
EVERY_AUGMENT = {
    "flip": "horizontal_and_vertical",
    "rotation": 0.2,
    "zoom": 0.2,
    "shift": 0.2,
    "crop": 0.2,
}
# measured after 3 epochs on digits: val accuracy 0.94-0.97 (dense) and 0.94 (numpy_mlp) over
# 3 seeds, against 0.1 for guessing; the threshold keeps a wide margin
MIN_VAL_ACCURACY = 0.8


@pytest.fixture(scope="module")
def small_dense(params: Params) -> DenseParams:
    """The repo's dense section with a small net."""
    return params.dense.model_copy(update={"hidden_units": [16, 8]})


@pytest.fixture(scope="module")
def small_cnn(params: Params) -> CnnParams:
    """The repo's cnn section with two small blocks (augmentation as in params.yaml), a 3x3
    stride-2 stem and without progressive resizing (8x8 digits through a 4x4 patch stem, or at
    half size, leave too little for the blocks' pools)."""
    no_resizing = ProgressiveParams(fraction=0.0, scale=0.5)
    return params.cnn.model_copy(
        update={
            "stem": "conv3x3_stride2",
            "filters": [4, 8],
            "head_units": 8,
            "progressive": no_resizing,
        }
    )


def cnn_params(base: CnnParams, *, augment: dict | None = None, **update: object) -> CnnParams:
    """A copy of a cnn section with some values (and some augment values) replaced."""
    if augment is not None:
        update["augment"] = base.augment.model_copy(update=augment)
    return base.model_copy(update=update)


def random_pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Seeded random uint8 pixels."""
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def layers_of(model: keras.Model, kind: type | tuple[type, ...]) -> list[layers.Layer]:
    """The model's layers of one or more classes."""
    return [layer for layer in model.layers if isinstance(layer, kind)]


# --------------------------------------------------------------------------- builders


@pytest.mark.parametrize("model_name", ["dense", "cnn"])
def test_builders_return_uncompiled_uint8_softmax_models(
    model_name: str, small_dense: DenseParams, small_cnn: CnnParams
) -> None:
    section, shape = (small_dense, GRAY_SHAPE) if model_name == "dense" else (small_cnn, RGB_SHAPE)
    model = model_type(model_name).build(shape, NUM_CLASSES, section)

    assert isinstance(model, keras.Model)
    assert not model.compiled
    assert getattr(model, "optimizer", None) is None  # Keras sets it only in compile()
    assert len(model.inputs) == 1
    assert model.inputs[0].dtype == "uint8"
    assert tuple(model.inputs[0].shape) == (None, *shape)
    assert tuple(model.output_shape) == (None, NUM_CLASSES)

    proba = model.predict(random_pixels((7, *shape)), verbose=0)  # (7, K)
    assert proba.shape == (7, NUM_CLASSES)
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)


def test_dense_has_one_dense_layer_per_hidden_size_plus_the_output(
    small_dense: DenseParams,
) -> None:
    model = DENSE.build(GRAY_SHAPE, NUM_CLASSES, small_dense)
    units = [layer.units for layer in layers_of(model, layers.Dense)]
    assert units == [*small_dense.hidden_units, NUM_CLASSES]
    expected_dropouts = len(small_dense.hidden_units) if small_dense.dropout > 0 else 0
    assert len(layers_of(model, layers.Dropout)) == expected_dropouts
    no_dropout = DENSE.build(
        GRAY_SHAPE, NUM_CLASSES, small_dense.model_copy(update={"dropout": 0.0})
    )
    assert layers_of(no_dropout, layers.Dropout) == []


@pytest.mark.parametrize("flip", ["none", "horizontal"])
def test_dense_scales_pixels_to_minus_one_one_and_flips_only_when_asked(
    small_dense: DenseParams, flip: str
) -> None:
    model = DENSE.build(GRAY_SHAPE, NUM_CLASSES, small_dense.model_copy(update={"flip": flip}))
    flips = layers_of(model, layers.RandomFlip)
    assert [layer.mode for layer in flips] == (["horizontal"] if flip == "horizontal" else [])
    flattened = keras.Model(model.inputs, model.get_layer("flatten").output)
    pixels = np.zeros((2, *GRAY_SHAPE), np.uint8)
    pixels[1] = 255
    out = flattened.predict(pixels, verbose=0)  # inference: never flipped
    np.testing.assert_allclose(out[0], -1.0)
    np.testing.assert_allclose(out[1], 1.0)


@pytest.mark.parametrize(("filters", "convs_per_block"), [([4], 1), ([4, 8], 2), ([2, 4, 8], 3)])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_cnn_has_one_conv_per_block_and_conv(
    small_cnn: CnnParams, filters: list[int], convs_per_block: int, batch_norm: bool
) -> None:
    section = cnn_params(
        small_cnn,
        stem="none",
        residual=False,
        filters=filters,
        convs_per_block=convs_per_block,
        batch_norm=batch_norm,
    )
    model = CNN.build(RGB_SHAPE, NUM_CLASSES, section)

    convs = layers_of(model, layers.Conv2D)
    assert len(convs) == len(filters) * convs_per_block
    assert [conv.filters for conv in convs] == [f for f in filters for _ in range(convs_per_block)]
    assert len(layers_of(model, layers.MaxPooling2D)) == len(filters)
    norms = layers_of(model, layers.BatchNormalization)
    assert len(norms) == (len(convs) if batch_norm else 0)
    assert all(norm.momentum == section.batch_norm_momentum for norm in norms)


@pytest.mark.parametrize("pooling", ["global_average", "flatten"])
def test_cnn_pooling_choice_picks_the_head_input(small_cnn: CnnParams, pooling: str) -> None:
    model = CNN.build(RGB_SHAPE, NUM_CLASSES, cnn_params(small_cnn, pooling=pooling))
    has_global = bool(layers_of(model, layers.GlobalAveragePooling2D))
    has_flatten = bool(layers_of(model, layers.Flatten))
    assert (has_global, has_flatten) == (pooling == "global_average", pooling == "flatten")


def test_cnn_without_augment_settings_has_no_augmentation_layers(small_cnn: CnnParams) -> None:
    model = CNN.build(RGB_SHAPE, NUM_CLASSES, cnn_params(small_cnn, augment=NO_AUGMENT))
    assert layers_of(model, AUGMENT_LAYERS) == []


@pytest.mark.parametrize(
    ("setting", "layer_class"),
    [
        ({"flip": "horizontal"}, layers.RandomFlip),
        ({"rotation": 0.1}, layers.RandomRotation),
        ({"zoom": 0.1}, layers.RandomZoom),
        ({"shift": 0.1}, layers.RandomTranslation),
        ({"crop": 0.1}, CROP),
    ],
)
def test_each_augment_setting_adds_only_its_layer(
    small_cnn: CnnParams, setting: dict, layer_class: type
) -> None:
    model = CNN.build(
        RGB_SHAPE, NUM_CLASSES, cnn_params(small_cnn, augment={**NO_AUGMENT, **setting})
    )
    found = layers_of(model, AUGMENT_LAYERS)
    assert [type(layer) for layer in found] == [layer_class]


def test_a_horizontal_flip_with_a_crop_is_the_crop_layers_mirror(small_cnn: CnnParams) -> None:
    model = CNN.build(
        RGB_SHAPE,
        NUM_CLASSES,
        cnn_params(small_cnn, augment={**NO_AUGMENT, "flip": "horizontal", "crop": 0.1}),
    )
    found = layers_of(model, AUGMENT_LAYERS)
    assert [type(layer) for layer in found] == [CROP]
    assert found[0].mirror
    # a vertical flip is Keras' own layer still
    both = {**NO_AUGMENT, "flip": "horizontal_and_vertical", "crop": 0.1}
    model = CNN.build(RGB_SHAPE, NUM_CLASSES, cnn_params(small_cnn, augment=both))
    assert [type(layer) for layer in layers_of(model, AUGMENT_LAYERS)] == [CROP, layers.RandomFlip]
    assert not model.get_layer("crop").mirror


def test_augmentation_is_random_in_training_and_off_at_inference(small_cnn: CnnParams) -> None:
    # no dropout and no batch norm: augmentation is the only thing that differs between calls
    plain = {"dropout": 0.0, "batch_norm": False}
    augmented = CNN.build(
        RGB_SHAPE, NUM_CLASSES, cnn_params(small_cnn, augment=EVERY_AUGMENT, **plain)
    )
    assert len(layers_of(augmented, AUGMENT_LAYERS)) == 5
    pixels = random_pixels((8, *RGB_SHAPE), seed=1)

    first = augmented.predict(pixels, verbose=0)
    second = augmented.predict(pixels, verbose=0)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, np.asarray(augmented(pixels, training=False)))

    # the same model in training mode does transform its input: the check above is not vacuous
    trained_a = np.asarray(augmented(pixels, training=True))
    trained_b = np.asarray(augmented(pixels, training=True))
    assert not np.allclose(trained_a, trained_b)


def test_cnn_with_every_option_survives_save_and_safe_load(
    small_cnn: CnnParams, tmp_path: Path
) -> None:
    section = cnn_params(small_cnn, augment=EVERY_AUGMENT, batch_norm=True, pooling="flatten")
    model = CNN.build(RGB_SHAPE, NUM_CLASSES, section)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)

    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    pixels = random_pixels((4, *RGB_SHAPE), seed=2)
    np.testing.assert_array_equal(
        loaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0)
    )


@pytest.mark.parametrize(
    ("stem", "size_after_stem"),
    [("conv3x3", 16), ("conv3x3_stride2", 8), ("patch2", 8), ("patch4", 4)],
)
def test_cnn_stem_and_residual_blocks(
    small_cnn: CnnParams, stem: str, size_after_stem: int
) -> None:
    section = cnn_params(
        small_cnn, stem=stem, residual=True, shortcut="conv1x1", convs_per_block=2, filters=[4, 8]
    )
    model = CNN.build(RGB_SHAPE, NUM_CLASSES, section)

    stem_layer = model.get_layer("stem")
    assert stem_layer.output.shape[1:] == (size_after_stem, size_after_stem, 4)
    if stem.startswith("patch"):  # non-overlapping patches: kernel and stride the same size
        n = int(stem.removeprefix("patch"))
        assert stem_layer.kernel_size == stem_layer.strides == (n, n)
    # per block: two 3x3 convolutions and a 1x1 shortcut, added before the block's last ReLU
    for block, filters in enumerate([4, 8], start=1):
        shortcut = model.get_layer(f"block{block}_shortcut")
        assert (shortcut.kernel_size, shortcut.filters) == ((1, 1), filters)
        add = model.get_layer(f"block{block}_add")
        suffix = "_bn" if section.batch_norm else ""
        assert {t._keras_history.operation.name for t in add.input} == {
            f"block{block}_conv2{suffix}",
            f"block{block}_shortcut{suffix}",
        }
        assert f"block{block}_conv2_relu" not in [layer.name for layer in model.layers]
    assert len(layers_of(model, layers.Conv2D)) == 1 + 2 * (2 + 1)
    last = size_after_stem // 4  # two max-pools
    assert model.get_layer("block2_pool").output.shape[1:] == (last, last, 8)


@pytest.mark.parametrize("convs_per_block", [2, 3])
def test_cnn_identity_shortcut_adds_the_first_convolutions_output(
    small_cnn: CnnParams, convs_per_block: int
) -> None:
    section = cnn_params(
        small_cnn, residual=True, shortcut="identity", convs_per_block=convs_per_block
    )
    model = CNN.build(RGB_SHAPE, NUM_CLASSES, section)

    last = f"conv{convs_per_block}"
    suffix = "_bn" if section.batch_norm else ""
    for block in (1, 2):
        add = model.get_layer(f"block{block}_add")
        assert {t._keras_history.operation.name for t in add.input} == {
            f"block{block}_conv1_relu",
            f"block{block}_{last}{suffix}",
        }
    # no 1x1 convolution: the stem and convs_per_block 3x3 convolutions per block only
    convolutions = layers_of(model, layers.Conv2D)
    assert {c.kernel_size for c in convolutions} == {(3, 3)}
    assert len(convolutions) == 1 + 2 * convs_per_block


def test_cnn_identity_shortcut_needs_two_convolutions_per_block(small_cnn: CnnParams) -> None:
    values = {**small_cnn.model_dump(), "shortcut": "identity", "convs_per_block": 1}
    with pytest.raises(ValueError, match="convs_per_block 2 or more"):
        CnnParams.model_validate(values)
    # without residual blocks there is no shortcut to check
    CnnParams.model_validate({**values, "residual": False})


def test_crop_shifts_each_image_by_whole_pixels_with_reflected_edges() -> None:
    keras.utils.set_random_seed(3)
    height, width, most = 10, 8, 2  # fraction 0.25: round(2.5) = 2 rows, 2 columns each way
    crop = CROP(0.25)
    # each pixel holds its own (row, column), so the output says where it came from
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([rows, cols, rows * 0], axis=-1).astype(np.uint8)  # (H, W, 3)
    batch = np.repeat(image[None], 32, axis=0)

    np.testing.assert_array_equal(np.asarray(crop(batch, training=False)), batch)
    out = np.asarray(crop(batch, training=True))
    assert out.dtype == np.uint8 and out.shape == batch.shape

    # what it stands for: the image padded by reflection, then a window of the original size
    padded = np.pad(image, ((most, most), (most, most), (0, 0)), mode="reflect")
    shifts = set()
    for shifted in out:
        # the shift is where the middle pixel (away from any reflected edge) came from
        dy = int(shifted[5, 4, 0]) - 5
        dx = int(shifted[5, 4, 1]) - 4
        assert abs(dy) <= most and abs(dx) <= most
        window = padded[most + dy : most + dy + height, most + dx : most + dx + width]
        np.testing.assert_array_equal(shifted, window)
        shifts.add((dy, dx))
    assert len(shifts) > 5  # each image draws its own shift (25 are possible)
    # every shift within the limit is drawn, none beyond it
    assert {dy for dy, _ in shifts} == set(range(-most, most + 1))

    # with mirror, each image is such a window or that window mirrored, and both happen
    mirrored = np.asarray(CROP(0.25, mirror=True)(batch, training=True))
    flipped = []
    for shifted in mirrored:
        # columns 2 to 5 are never reflected edges: descending there, the image was mirrored
        flipped.append(int(shifted[5, 5, 1]) < int(shifted[5, 4, 1]))
        image_seen = shifted[:, ::-1] if flipped[-1] else shifted
        dy, dx = int(image_seen[5, 4, 0]) - 5, int(image_seen[5, 4, 1]) - 4
        window = padded[most + dy : most + dy + height, most + dx : most + dx + width]
        np.testing.assert_array_equal(image_seen, window)
    assert 0 < sum(flipped) < len(flipped)


def test_cnn_without_stem_or_residual_is_the_plain_vgg_stack(small_cnn: CnnParams) -> None:
    model = CNN.build(RGB_SHAPE, NUM_CLASSES, cnn_params(small_cnn, stem="none", residual=False))
    names = [layer.name for layer in model.layers]
    assert "stem" not in names
    assert not layers_of(model, layers.Add)
    assert not [name for name in names if "shortcut" in name]


def test_cnn_head_units_zero_goes_straight_from_pooling_to_the_output(
    small_cnn: CnnParams,
) -> None:
    model = CNN.build(RGB_SHAPE, NUM_CLASSES, cnn_params(small_cnn, head_units=0))
    assert [layer.name for layer in layers_of(model, layers.Dense)] == ["probabilities"]
    assert model.get_layer("probabilities").input.shape[-1] == small_cnn.filters[-1]


def shifted(pixels: np.ndarray, axis: int, shift: int) -> np.ndarray:
    """Images moved by `shift` pixels along axis 1 (rows) or 2 (columns), positive towards index
    0, the edges filled by reflection (numpy's pad, not the layer's own indexing)."""
    pad = [(0, 0)] * 4
    pad[axis] = (abs(shift), abs(shift))
    padded = np.pad(pixels, pad, mode="reflect")
    start = abs(shift) + shift
    return np.take(padded, np.arange(start, start + pixels.shape[axis]), axis=axis)


@pytest.mark.parametrize(
    ("flip_tta", "tta_shift", "views"), [(True, 0.0, 2), (False, 0.1, 5), (True, 0.1, 10)]
)
def test_test_time_augmentation_averages_each_images_views_and_loads_in_a_fresh_process(
    small_cnn: CnnParams, tmp_path: Path, flip_tta: bool, tta_shift: float, views: int
) -> None:
    import subprocess
    import sys

    section = cnn_params(small_cnn, flip_tta=flip_tta, tta_shift=tta_shift)
    base = CNN.build(RGB_SHAPE, NUM_CLASSES, section)
    tta = CNN.inference_model(base, section)
    pixels = random_pixels((6, *RGB_SHAPE), seed=3)
    step = 2  # 0.1 x 16 pixels, rounded
    images = [pixels]
    if tta_shift:
        images += [shifted(pixels, axis, s) for axis in (1, 2) for s in (-step, step)]
    if flip_tta:
        images += [image[:, :, ::-1] for image in images]
    assert len(images) == views
    each = [base.predict(image, verbose=0) for image in images]
    assert not np.allclose(each[0], each[-1], atol=1e-4)  # the net itself is not invariant
    averaged = tta.predict(pixels, verbose=0)
    np.testing.assert_allclose(averaged, np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
    if flip_tta:
        mirrored = tta.predict(pixels[:, :, ::-1], verbose=0)
        np.testing.assert_allclose(mirrored, averaged, rtol=1e-5, atol=1e-6)

    # saved as training saves it, and loaded in safe mode by a process that never built one
    CNN.save(tta, tmp_path / "model.keras")
    np.save(tmp_path / "pixels.npy", pixels)
    script = (
        "import sys, numpy as np\n"
        "from imgpipe.registry import model_type\n"
        "cnn = model_type('cnn')\n"
        "model = cnn.load(sys.argv[1] + '/model.keras')\n"
        "pixels = np.load(sys.argv[1] + '/pixels.npy')\n"
        "np.save(sys.argv[1] + '/out.npy', cnn.predict_proba(model, pixels, 4))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), averaged, rtol=1e-5, atol=1e-6)


def test_prediction_batches_count_views_so_a_forward_pass_holds_as_many_images(
    small_cnn: CnnParams,
) -> None:
    section = cnn_params(small_cnn, flip_tta=True, tta_shift=0.1)  # 10 views
    tta = CNN.inference_model(CNN.build(RGB_SHAPE, NUM_CLASSES, section), section)
    pixels = random_pixels((7, *RGB_SHAPE), seed=8)
    whole = tta.predict(pixels, verbose=0)
    sizes: list[int] = []
    predict_on_batch = tta.predict_on_batch

    def counting(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return predict_on_batch(batch)

    tta.predict_on_batch = counting
    np.testing.assert_allclose(CNN.predict_proba(tta, pixels, 30), whole, rtol=1e-5, atol=1e-6)
    assert sizes == [3, 3, 1]  # 30 views a pass: 3 images
    sizes.clear()
    CNN.predict_proba(tta, pixels, 4)  # fewer than one image's views: one image a pass
    assert sizes == [1] * 7


def test_a_model_saved_with_the_earlier_flip_averaging_still_loads_and_predicts(
    small_cnn: CnnParams, tmp_path: Path
) -> None:
    """Registered models saved before TestTimeViews: the net twice, on the images and on
    MirrorLeftRight's, into an Average layer."""
    from imgpipe.models.cnn import custom_layers

    base = CNN.build(RGB_SHAPE, NUM_CLASSES, small_cnn)
    inputs = keras.Input(shape=RGB_SHAPE, dtype="uint8", name="pixels")
    mirrored = custom_layers()["MirrorLeftRight"](name="mirror")(inputs)
    average = layers.Average(name="flip_average", dtype="float32")
    earlier = keras.Model(inputs, average([base(inputs), base(mirrored)]), name="cnn_flip_tta")
    CNN.save(earlier, tmp_path / "model.keras")
    pixels = random_pixels((5, *RGB_SHAPE), seed=6)
    expected = (base.predict(pixels, verbose=0) + base.predict(pixels[:, :, ::-1], verbose=0)) / 2
    loaded = CNN.load(tmp_path / "model.keras")
    np.testing.assert_allclose(CNN.predict_proba(loaded, pixels, 4), expected, rtol=1e-5, atol=1e-6)


def test_a_shift_rounding_to_nothing_still_moves_the_images_by_a_pixel(
    small_cnn: CnnParams,
) -> None:
    section = cnn_params(small_cnn, flip_tta=False, tta_shift=0.01)  # 0.16 of 16 pixels
    views = CNN.inference_model(CNN.build(RGB_SHAPE, NUM_CLASSES, section), section)
    pixels = random_pixels((2, *RGB_SHAPE), seed=4)
    batch = np.asarray(views.get_layer("views")(pixels))
    expected = [pixels] + [shifted(pixels, axis, s) for axis in (1, 2) for s in (-1, 1)]
    np.testing.assert_array_equal(batch, np.concatenate(expected))


def test_without_test_time_augmentation_the_trained_model_is_saved(
    small_cnn: CnnParams,
) -> None:
    section = cnn_params(small_cnn, flip_tta=False, tta_shift=0.0)
    base = CNN.build(RGB_SHAPE, NUM_CLASSES, section)
    assert CNN.inference_model(base, section) is base


def test_the_registry_finds_every_model_module() -> None:
    types = model_types()
    assert list(types) == sorted(["cnn", "dense", "logreg", "numpy_mlp", "pretrained"])
    for entry in types.values():
        assert isinstance(entry, ModelType)
        assert entry.weights_file
    assert model_type("dense").build(GRAY_SHAPE, NUM_CLASSES, params_of("dense")).name == "dense"


@pytest.mark.parametrize("name", ["resnet", "Dense", ""])
def test_model_type_rejects_unknown_names_listing_the_known_ones(name: str) -> None:
    with pytest.raises(KeyError, match="unknown") as raised:
        model_type(name)
    message = str(raised.value)
    assert repr(name) in message
    for known in model_types():
        assert known in message


def params_of(name: str) -> object:
    """A model's section of the repository's params.yaml."""
    return load_params(ROOT / "params.yaml").model_section(name)


# --------------------------------------------------------------------------- optimizers


def current_lr(optimizer: keras.optimizers.Optimizer, step: int) -> float:
    """The learning rate the optimizer applies at a given update step."""
    optimizer.iterations.assign(step)
    return float(optimizer.learning_rate)


def optimizer_section(name: str, **update: object) -> DenseParams:
    """The repository's dense section with another optimizer and schedule."""
    return params_of("dense").model_copy(update={"optimizer": name, **update})


@pytest.mark.parametrize(
    ("name", "optimizer_class"),
    [
        ("adam", keras.optimizers.Adam),
        ("adamw", keras.optimizers.AdamW),
        ("adamax", keras.optimizers.Adamax),
        ("rmsprop", keras.optimizers.RMSprop),
        ("sgd", keras.optimizers.SGD),
    ],
)
def test_build_optimizer_returns_the_named_class_with_decay(
    name: str, optimizer_class: type
) -> None:
    learning_rate, decay_steps, decay_rate = 0.01, 100, 0.5
    section = optimizer_section(
        name,
        learning_rate=learning_rate,
        decay_steps=decay_steps,
        decay_rate=decay_rate,
        schedule="exponential",
    )
    optimizer = build_optimizer(section, total_steps=1000)
    assert type(optimizer) is optimizer_class
    assert current_lr(optimizer, 0) == pytest.approx(learning_rate)
    # continuous exponential decay: lr * rate ** (step / decay_steps)
    assert current_lr(optimizer, 2 * decay_steps) == pytest.approx(learning_rate * decay_rate**2)
    assert current_lr(optimizer, 50) == pytest.approx(learning_rate * decay_rate**0.5)


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_build_optimizer_cosine_goes_from_lr_to_zero_over_total_steps(name: str) -> None:
    section = optimizer_section(name, learning_rate=0.01, schedule="cosine")
    optimizer = build_optimizer(section, total_steps=100)
    assert current_lr(optimizer, 0) == pytest.approx(0.01)
    assert current_lr(optimizer, 50) == pytest.approx(0.005)
    assert current_lr(optimizer, 100) == pytest.approx(0.0, abs=1e-9)
    assert current_lr(optimizer, 150) == pytest.approx(0.0, abs=1e-9)


def test_build_optimizer_warms_up_linearly_then_follows_the_cosine() -> None:
    # 10 epochs of 100 steps, 2 of them warm-up: 0 -> lr over 200 steps, then cosine to 0
    section = optimizer_section(
        "adam", learning_rate=0.01, schedule="cosine", epochs=10, warmup_epochs=2.0
    )
    optimizer = build_optimizer(section, total_steps=1000)
    assert current_lr(optimizer, 0) == pytest.approx(0.0, abs=1e-9)
    assert current_lr(optimizer, 100) == pytest.approx(0.005)
    assert current_lr(optimizer, 200) == pytest.approx(0.01)
    assert current_lr(optimizer, 600) == pytest.approx(0.005)  # half-way through the 800 left
    assert current_lr(optimizer, 1000) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("name", "weight_decay", "expected"),
    [("adamw", 5e-4, 5e-4), ("adamw", 0.0, None), ("adam", 1e-3, 1e-3), ("adam", 0.0, None)],
)
def test_build_optimizer_decays_weights_only_as_asked(
    name: str, weight_decay: float, expected: float | None
) -> None:
    optimizer = build_optimizer(optimizer_section(name, weight_decay=weight_decay), 100)
    # Keras' AdamW would decay by 0.004 if not told: weight_decay 0 means none, for it too
    assert (optimizer.weight_decay or None) == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"schedule": "exponential", "warmup_epochs": 1.0}, "needs schedule: cosine"),
        ({"schedule": "cosine", "epochs": 3, "warmup_epochs": 3.0}, "less than epochs"),
    ],
)
def test_warmup_must_fit_a_cosine_run(update: dict, message: str) -> None:
    values = {**params_of("dense").model_dump(), **update}
    with pytest.raises(ValueError, match=message):
        DenseParams.model_validate(values)


def test_label_smoothing_trains_on_smoothed_one_hot_targets(small_cnn: CnnParams) -> None:
    labels = np.array([0, 3, 4])
    plain = cnn_params(small_cnn, label_smoothing=0.0)
    np.testing.assert_array_equal(CNN.targets(plain, labels, NUM_CLASSES), labels)
    smoothed = cnn_params(small_cnn, label_smoothing=0.2)
    one_hot = CNN.targets(smoothed, labels, NUM_CLASSES)
    np.testing.assert_array_equal(one_hot, np.eye(NUM_CLASSES)[labels])

    model = CNN.compiled_model(smoothed, RGB_SHAPE, NUM_CLASSES, train_size=10, precision="float32")
    proba = np.full((3, NUM_CLASSES), 0.1, dtype=np.float32)
    proba[np.arange(3), labels] = 0.6
    # cross-entropy against 1 - s + s/K for the true class and s/K for the others
    target = one_hot * (1 - 0.2) + 0.2 / NUM_CLASSES
    expected = float(np.mean(-(target * np.log(proba)).sum(axis=1)))
    assert float(model.loss(one_hot, proba)) == pytest.approx(expected, rel=1e-5)


def test_in_memory_batches_train_exactly_as_fit_on_the_arrays(small_cnn: CnnParams) -> None:
    """The training input's own pipeline changes threads, not batches: the same weights."""
    pixels = random_pixels((20, *RGB_SHAPE), seed=4)
    targets = CNN.targets(small_cnn, np.arange(20) % NUM_CLASSES, NUM_CLASSES)
    batches = in_memory_batches(pixels, targets, 8)
    assert [len(x) for x, _ in batches] == [8, 8, 4]  # in order, the last one smaller
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), pixels)

    weights = []
    for fed in ("arrays", "batches"):
        seed_everything(5)
        model = CNN.compiled_model(
            small_cnn, RGB_SHAPE, NUM_CLASSES, train_size=20, precision="float32"
        )
        if fed == "arrays":
            model.fit(pixels, targets, batch_size=8, shuffle=False, epochs=2, verbose=0)
        else:
            model.fit(in_memory_batches(pixels, targets, 8), shuffle=False, epochs=2, verbose=0)
        weights.append(model.get_weights())
    assert len(weights[0]) == len(weights[1])
    for from_arrays, from_batches in zip(*weights, strict=True):
        np.testing.assert_array_equal(from_arrays, from_batches)
    # and training moved them: the comparison is not between two untrained models
    seed_everything(5)
    untrained = CNN.compiled_model(
        small_cnn, RGB_SHAPE, NUM_CLASSES, train_size=20, precision="float32"
    ).get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(untrained, weights[0], strict=True))


@pytest.mark.parametrize("name", ["adam", "adamax", "rmsprop", "sgd"])
def test_build_optimizer_keeps_the_rate_constant_when_decay_rate_is_one(name: str) -> None:
    section = optimizer_section(
        name, learning_rate=0.003, decay_steps=10, decay_rate=1.0, schedule="exponential"
    )
    optimizer = build_optimizer(section, total_steps=1000)
    assert current_lr(optimizer, 0) == pytest.approx(0.003)
    assert current_lr(optimizer, 10_000) == pytest.approx(0.003)


def test_every_optimizer_name_in_params_is_a_keras_optimizer() -> None:
    for name, class_name in OPTIMIZERS.items():
        assert isinstance(
            build_optimizer(optimizer_section(name), 10), getattr(keras.optimizers, class_name)
        )
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_section("lion").model_validate(
            {**optimizer_section("adam").model_dump(), "optimizer": "lion"}
        )


# --------------------------------------------------------------------------- training


class EpochRecorder:
    """An on_epoch_end callback that remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []

    def __call__(self, epoch: int, logs: dict[str, float]) -> None:
        self.calls.append((epoch, dict(logs)))


def check_history(history: dict[str, list[float]], epochs: int) -> None:
    """Every history key is present, in HISTORY_KEYS' order (history.csv's columns), with one
    finite value per epoch."""
    assert list(history) == list(HISTORY_KEYS)
    for key, values in history.items():
        assert len(values) == epochs, key
        assert all(np.isfinite(values)), key


def check_callback(recorder: EpochRecorder, history: dict[str, list[float]], epochs: int) -> None:
    """on_epoch_end ran once per epoch, in order, with the epoch's history values."""
    assert [epoch for epoch, _ in recorder.calls] == list(range(epochs))
    for epoch, logs in recorder.calls:
        assert set(logs) == set(HISTORY_KEYS)
        for key in HISTORY_KEYS:
            assert logs[key] == pytest.approx(history[key][epoch], rel=1e-6)


def check_learned(history: dict[str, list[float]]) -> None:
    """The loss went down and the model beats guessing by far on held-out digits."""
    assert history["loss"][-1] < history["loss"][0]
    assert history["val_accuracy"][-1] > MIN_VAL_ACCURACY


@pytest.fixture(scope="module")
def dense_digits(params: Params, digits: dict[str, np.ndarray]) -> dict:
    """The dense model trained twice on digits with the same seed."""
    section = params.dense.model_copy(
        update={
            "hidden_units": [64],
            "dropout": 0.1,
            "optimizer": "adam",
            "learning_rate": 0.01,
            "decay_steps": 100,
            "decay_rate": 0.9,
            "batch_size": 32,
            "epochs": 3,
        }
    )
    runs = []
    for _ in range(2):
        recorder = EpochRecorder()
        result = fit("dense", section, **digits, num_classes=10, seed=7, on_epoch_end=recorder)
        runs.append((result, recorder))
    return {"section": section, "runs": runs}


@pytest.mark.slow
def test_train_keras_dense_learns_digits(dense_digits: dict, digits: dict[str, np.ndarray]) -> None:
    section = dense_digits["section"]
    result, recorder = dense_digits["runs"][0]
    check_history(result.history, section.epochs)
    check_callback(recorder, result.history, section.epochs)
    check_learned(result.history)

    model = result.model
    assert isinstance(model, keras.Model)
    assert model.compiled
    assert result.parameters == model.count_params()
    assert result.seconds > 0
    assert result.images_per_second > 0
    # the reported val accuracy is the model's own accuracy on the val set
    predicted = model.predict(digits["x_val"], verbose=0).argmax(axis=1)
    accuracy = float(np.mean(predicted == digits["y_val"]))
    assert accuracy == pytest.approx(result.history["val_accuracy"][-1], abs=1e-6)


@pytest.mark.slow
def test_train_keras_is_deterministic_for_a_seed(dense_digits: dict) -> None:
    (first, _), (second, _) = dense_digits["runs"]
    assert first.history == second.history
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_train_keras_cnn_in_mixed_precision_restores_the_global_policy(
    small_cnn: CnnParams, digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    section = cnn_params(
        small_cnn, filters=[4], batch_size=32, epochs=1, precision="mixed_bfloat16"
    )
    subset = {key: value[:96] for key, value in digits.items()}
    result = fit("cnn", section, **subset, num_classes=10, seed=0)
    check_history(result.history, 1)
    assert keras.config.dtype_policy().name == "float32"
    # the softmax output stays float32 whatever the compute precision
    proba = result.model.predict(subset["x_val"][:4], verbose=0)
    assert proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-2)
    # and the mixed-precision model loads back in safe mode, predicting the same
    result.model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(subset["x_val"][:4], verbose=0), proba)


@pytest.fixture(scope="module")
def small_numpy_mlp(params: Params) -> NumpyMlpParams:
    """The repo's numpy_mlp section with a small, fast net."""
    return params.numpy_mlp.model_copy(
        update={
            "hidden_units": [32],
            "optimizer": "adam",
            "learning_rate": 0.005,
            "decay_steps": 100,
            "decay_rate": 0.9,
            "batch_size": 32,
            "epochs": 3,
        }
    )


def test_train_numpy_mlp_learns_digits(
    small_numpy_mlp: NumpyMlpParams,
    digits: dict[str, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    recorder = EpochRecorder()
    result = fit(
        "numpy_mlp", small_numpy_mlp, **digits, num_classes=10, seed=3, on_epoch_end=recorder
    )
    epochs = small_numpy_mlp.epochs
    check_history(result.history, epochs)
    check_callback(recorder, result.history, epochs)
    check_learned(result.history)

    model = result.model
    assert isinstance(model, NumpyMLP)
    assert model.layer_sizes == (8 * 8 * 1, *small_numpy_mlp.hidden_units, 10)
    assert result.parameters == model.count_params()
    assert capsys.readouterr().out == ""  # the train stage reports epochs, not the model

    again = fit("numpy_mlp", small_numpy_mlp, **digits, num_classes=10, seed=3)
    assert again.history == result.history


def test_train_numpy_mlp_sigmoid_trains_two_classes(
    small_numpy_mlp: NumpyMlpParams, digits: dict[str, np.ndarray]
) -> None:
    def only_zeros_and_ones(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = y < 2
        return x[keep], y[keep]

    x_train, y_train = only_zeros_and_ones(digits["x_train"], digits["y_train"])
    x_val, y_val = only_zeros_and_ones(digits["x_val"], digits["y_val"])
    section = small_numpy_mlp.model_copy(update={"output": "sigmoid"})
    result = fit("numpy_mlp", section, x_train, y_train, x_val, y_val, num_classes=2, seed=0)
    assert result.model.layer_sizes[-1] == 1
    assert result.history["val_accuracy"][-1] > 0.9


def test_train_numpy_mlp_sigmoid_refuses_more_than_two_classes(
    small_numpy_mlp: NumpyMlpParams, digits: dict[str, np.ndarray]
) -> None:
    section = small_numpy_mlp.model_copy(update={"output": "sigmoid"})
    with pytest.raises(StageError, match="softmax") as raised:
        fit("numpy_mlp", section, **digits, num_classes=10, seed=0)
    assert "10" in str(raised.value)


def test_logreg_learns_digits_and_round_trips_through_its_file(
    digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    section = params_of("logreg")
    recorder = EpochRecorder()
    result = fit("logreg", section, **digits, num_classes=10, seed=0, on_epoch_end=recorder)
    check_history(result.history, 1)
    check_callback(recorder, result.history, 1)
    assert result.history["val_accuracy"][0] > MIN_VAL_ACCURACY  # digits are nearly linear
    assert result.parameters == 8 * 8 * 10 + 10
    logreg = model_type("logreg")
    logreg.save(result.model, tmp_path / logreg.weights_file)
    loaded = logreg.load(tmp_path / logreg.weights_file)
    proba = logreg.predict_proba(loaded, digits["x_val"], batch_size=100)
    np.testing.assert_allclose(
        proba, logreg.predict_proba(result.model, digits["x_val"], batch_size=7), rtol=1e-5
    )
    accuracy = float(np.mean(proba.argmax(axis=1) == digits["y_val"]))
    assert accuracy == pytest.approx(result.history["val_accuracy"][0], abs=1e-9)
    again = fit("logreg", section, **digits, num_classes=10, seed=0)
    assert again.history == result.history  # deterministic


def test_logreg_warns_when_lbfgs_stops_early(
    digits: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    section = params_of("logreg").model_copy(update={"max_iter": 2})
    fit("logreg", section, **digits, num_classes=10, seed=0)
    assert "logreg.max_iter" in caplog.text


# --------------------------------------------------------------------------- precision: auto


def test_auto_precision_is_float32_untimed_where_bfloat16_would_be_emulated(
    small_cnn: CnnParams, digits: dict[str, np.ndarray]
) -> None:
    data = TrainingData(**digits, num_classes=10)
    auto = cnn_params(small_cnn, precision="auto")
    choice = choose_precision(CNN, auto, data, hardware=None)
    assert choice.precision == "float32"
    assert choice.step_seconds == {}  # nothing was timed
    assert "emulated" in choice.reason and "avx512_bf16" in choice.reason
    fixed = cnn_params(small_cnn, precision="mixed_bfloat16")
    assert choose_precision(CNN, fixed, data, hardware="a GPU").precision == "mixed_bfloat16"


def test_bfloat16_hardware_follows_the_cpu_flags() -> None:
    import tensorflow as tf

    native = cpu_flags() & {"avx512_bf16", "amx_bf16"}
    expected_none = not native and not tf.config.list_physical_devices("GPU")
    assert (bfloat16_hardware() is None) == expected_none


@pytest.mark.slow
def test_auto_precision_times_both_and_takes_the_faster(
    small_cnn: CnnParams, digits: dict[str, np.ndarray]
) -> None:
    data = TrainingData(**digits, num_classes=10)
    section = cnn_params(small_cnn, filters=[4], batch_size=32, precision="auto")
    choice = choose_precision(CNN, section, data, hardware="the test's pretend hardware")
    assert set(choice.step_seconds) == {"float32", "mixed_bfloat16"}
    assert all(seconds > 0 for seconds in choice.step_seconds.values())
    assert choice.precision == min(choice.step_seconds, key=choice.step_seconds.__getitem__)
    assert "pretend hardware" in choice.reason


@pytest.mark.slow
def test_a_resumed_run_keeps_the_precision_of_the_interrupted_one(
    small_cnn: CnnParams, digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    subset = {key: value[:96] for key, value in digits.items()}
    checkpoint = TrainingCheckpoint(tmp_path / "checkpoint", "same params and data")
    first = cnn_params(small_cnn, filters=[4], batch_size=32, epochs=1, precision="mixed_bfloat16")
    fit("cnn", first, **subset, num_classes=10, seed=0, checkpoint=checkpoint)
    # the same run resumed, now asked for auto: whatever auto would pick, it goes on in bfloat16
    again = first.model_copy(update={"epochs": 2, "precision": "auto"})
    resumed = fit("cnn", again, **subset, num_classes=10, seed=0, checkpoint=checkpoint)
    assert resumed.resumed_from_epoch == 1
    assert resumed.choices["precision"] == "mixed_bfloat16"
    assert "interrupted" in resumed.choices["precision_reason"]


@pytest.mark.slow
def test_residual_cnn_with_the_new_recipe_resumes_to_exactly_the_uninterrupted_run(
    small_cnn: CnnParams, digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """Stem, residual blocks, AdamW with warm-up, label smoothing, progressive resizing,
    CutMix, a weight average and flip averaging: a run stopped after its first epoch and
    resumed (in the small images' phase) ends exactly where a straight run does."""
    subset = {key: value[:192] for key, value in digits.items()}
    section = cnn_params(
        small_cnn,
        stem="conv3x3",  # (8x8 digits at half size leave no room for a stride-2 stem)
        residual=True,
        convs_per_block=2,
        filters=[4, 8],
        head_units=0,
        optimizer="adamw",
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=1.0,
        label_smoothing=0.1,
        flip_tta=True,
        ema=0.9,
        progressive=ProgressiveParams(fraction=0.6, scale=0.5),  # 2 of 3 epochs
        cutmix=0.5,
        batch_size=32,
        epochs=3,
        precision="float32",
    )

    def stop_after_first(epoch: int, logs: dict[str, float]) -> None:
        if epoch == 1:
            # before epoch 2's checkpoint: as a kill would
            raise KeyboardInterrupt("stopped after epoch 1")

    checkpoint = TrainingCheckpoint(tmp_path / "checkpoint", "same params and data")
    with pytest.raises(KeyboardInterrupt, match="stopped after epoch 1"):
        fit(
            "cnn",
            section,
            **subset,
            num_classes=10,
            seed=3,
            on_epoch_end=stop_after_first,
            checkpoint=checkpoint,
        )
    resumed = fit("cnn", section, **subset, num_classes=10, seed=3, checkpoint=checkpoint)
    straight = fit("cnn", section, **subset, num_classes=10, seed=3)

    assert resumed.resumed_from_epoch == 1
    check_history(straight.history, 3)
    assert resumed.history == straight.history
    assert resumed.model.name == straight.model.name == "cnn_tta"
    for a, b in zip(resumed.model.get_weights(), straight.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_ema_ends_with_the_averaged_weights_and_their_own_batch_norm_statistics(
    small_cnn: CnnParams, digits: dict[str, np.ndarray]
) -> None:
    subset = {key: value[:192] for key, value in digits.items()}
    section = cnn_params(
        small_cnn,
        filters=[4, 8],
        flip_tta=False,
        tta_shift=0.0,
        batch_size=32,
        epochs=2,
        precision="float32",
    )
    last = fit("cnn", section.model_copy(update={"ema": 0.0}), **subset, num_classes=10, seed=5)
    averaged = fit("cnn", section.model_copy(update={"ema": 0.9}), **subset, num_classes=10, seed=5)

    # the average does not steer training: every epoch's figures are the same
    assert averaged.history == last.history
    # the model ends with the optimizer's averages, which are not the last step's weights
    model = averaged.model
    averages = model.optimizer._model_variables_moving_average
    for weight, average in zip(model.trainable_variables, averages, strict=True):
        np.testing.assert_array_equal(np.asarray(weight), np.asarray(average))
    changed = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(model.trainable_variables, last.model.trainable_variables, strict=True)
    ]
    assert all(changed)
    # and batch norm's moving statistics were measured again for them
    moving = [v for v in model.non_trainable_variables if "moving" in v.path]
    before = [v for v in last.model.non_trainable_variables if "moving" in v.path]
    assert moving and all(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(moving, before, strict=True)
    )
    for key in ("val_accuracy_averaged", "val_accuracy_last_weights"):
        assert 0.0 <= averaged.choices[key] <= 1.0
    assert averaged.choices["val_accuracy_last_weights"] == pytest.approx(
        last.history["val_accuracy"][-1]
    )
    assert "val_accuracy_averaged" not in last.choices


def test_a_progressively_resized_cnn_survives_save_and_safe_load(
    small_cnn: CnnParams, tmp_path: Path
) -> None:
    section = cnn_params(small_cnn, progressive=ProgressiveParams(fraction=0.5, scale=0.5))
    model = CNN.build(RGB_SHAPE, NUM_CLASSES, section)
    CNN.prepare_epoch(model, section, 0, train_size=64)  # set to half size for training
    model.save(tmp_path / "model.keras")
    loaded = CNN.load(tmp_path / "model.keras")

    assert loaded.get_layer("progressive_resize").height == 0  # the full view, always
    pixels = random_pixels((4, *RGB_SHAPE), seed=2)
    np.testing.assert_array_equal(
        loaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0)
    )


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_progressive_resizing_trains_small_first_and_predicts_on_the_full_view(
    small_cnn: CnnParams, precision: str
) -> None:
    section = cnn_params(
        small_cnn,
        stem="conv3x3",
        progressive=ProgressiveParams(fraction=0.5, scale=0.5),  # 2 of 3 (rounded up)
        epochs=3,
        precision=precision,
    )
    model = CNN.compiled_model(section, RGB_SHAPE, NUM_CLASSES, train_size=64, precision=precision)
    to_stem = keras.Model(model.input, model.get_layer("stem").output)
    pixels = random_pixels((2, *RGB_SHAPE))
    sizes = []
    for epoch in range(3):
        CNN.prepare_epoch(model, section, epoch, train_size=64)
        sizes.append(tuple(to_stem(pixels, training=True).shape[1:3]))
        assert tuple(to_stem(pixels, training=False).shape[1:3]) == (16, 16)
    assert sizes == [(8, 8), (8, 8), (16, 16)]
    model.fit(pixels, np.eye(NUM_CLASSES)[[0, 1]], epochs=1, verbose=0)  # trains at either size


def test_in_memory_batches_gather_the_rows_in_the_order_given() -> None:
    pixels = random_pixels((20, *RGB_SHAPE), seed=6)
    labels = np.arange(20) % NUM_CLASSES
    order = epoch_order(20, seed=1, epoch=3)
    batches = list(in_memory_batches(pixels, labels, 8, order))
    assert [len(x) for x, _ in batches] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), pixels[order])
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels[order])


def test_progressive_resizing_feeds_a_table_resized_once_then_the_full_view(
    small_cnn: CnnParams,
) -> None:
    """A table in memory: its smaller images are resized once, as the layer would resize each
    batch, and fed to a model that takes them; the full view's epochs free them."""
    section = cnn_params(
        small_cnn,
        stem="conv3x3",
        progressive=ProgressiveParams(fraction=0.5, scale=0.5),  # 2 of 3 (rounded up)
        epochs=3,
        precision="float32",
    )
    pixels = random_pixels((20, *RGB_SHAPE), seed=7)
    labels = np.arange(20) % NUM_CLASSES
    data = TrainingData(pixels, labels, pixels[:4], labels[:4], NUM_CLASSES)
    targets = (CNN.targets(section, labels, NUM_CLASSES), CNN.targets(section, labels[:4], 5))
    model = CNN.compiled_model(section, RGB_SHAPE, NUM_CLASSES, train_size=20, precision="float32")

    small = resized_table(pixels, (8, 8), chunk=3)  # chunks change nothing
    np.testing.assert_array_equal(small, np.asarray(resize_images(pixels, (8, 8))))
    assert small.dtype == np.uint8
    fed_shapes, taken_shapes = [], []
    for epoch in range(3):
        CNN.prepare_epoch(model, section, epoch, train_size=20)
        taken_shapes.append(model.input_spec[0].shape)
        fed = CNN.epoch_input(section, data, targets, seed=0, epoch=epoch)
        batches = list(fed["x"])
        fed_shapes.append(tuple(batches[0][0].shape[1:3]))
        if epoch < 2:
            order = epoch_order(20, 0, epoch)
            np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), small[order])
            assert SMALL_IMAGES in data.derived
        model.fit(**fed, verbose=0)  # takes the batches of either size
    assert fed_shapes == [(8, 8), (8, 8), (16, 16)]
    # any size while small, then the full view only, as the saved model takes
    assert taken_shapes == [(None, None, None, 3)] * 2 + [(None, 16, 16, 3)]
    assert SMALL_IMAGES not in data.derived  # freed when the full view's epochs began


@pytest.mark.parametrize(
    ("stem", "side"),
    [
        ("none", 3),
        ("none", 4),
        ("conv3x3_stride2", 6),
        ("conv3x3_stride2", 7),
        ("conv3x3_stride2_pool", 14),
        ("conv3x3_stride2_pool", 16),
        ("patch3", 9),
        ("patch3", 10),
        ("patch4", 12),
        ("patch4", 13),
    ],
)
def test_a_view_too_small_for_the_stem_and_blocks_is_named_before_keras_fails(
    small_cnn: CnnParams, stem: str, side: int
) -> None:
    """section_problem's arithmetic against Keras itself: two blocks need maps of 4 after the
    stem; where it finds none, the net builds and trains a step, and where it finds one, Keras
    fails."""
    section = cnn_params(small_cnn, stem=stem)  # filters [4, 8]: two blocks
    problem = CNN.section_problem(section, (side, side, 3))

    def one_step() -> None:
        model = CNN.compiled_model(
            section, (side, side, 3), NUM_CLASSES, train_size=4, precision="float32"
        )
        targets = CNN.targets(section, np.arange(4) % NUM_CLASSES, NUM_CLASSES)
        model.train_on_batch(random_pixels((4, side, side, 3)), targets)

    if problem is None:
        one_step()
    else:
        assert f"the {stem} stem" in problem and "cnn.stem: conv3x3_stride2" in problem
        with pytest.raises(ValueError, match=r"Negative dimension|incompatible|size"):
            one_step()


def test_progressive_resizings_smaller_images_are_checked_when_training_starts(
    small_cnn: CnnParams, digits: dict[str, np.ndarray]
) -> None:
    section = cnn_params(
        small_cnn, stem="patch4", progressive=ProgressiveParams(fraction=0.5, scale=0.5)
    )
    whole = section.model_copy(update={"progressive": ProgressiveParams(fraction=0.0, scale=0.5)})
    assert CNN.section_problem(whole, (16, 16, 3)) is None
    problem = CNN.section_problem(section, (16, 16, 3))
    assert problem is not None
    assert problem.startswith("progressive resizing's smaller images are 8 pixels")
    assert problem.endswith("or cnn.progressive.fraction: 0")

    # train stops with it, before an epoch: 8x8 digits, patch2 leaves 4, 2 blocks need 4: the
    # view itself passes, its half does not
    epochs: list[int] = []
    with pytest.raises(StageError, match="progressive resizing's smaller images are 4 pixels"):
        fit(
            "cnn",
            section.model_copy(update={"stem": "patch2", "epochs": 2}),
            **{key: value[:64] for key, value in digits.items()},
            num_classes=10,
            seed=0,
            on_epoch_end=lambda epoch, logs: epochs.append(epoch),
        )
    assert epochs == []


def test_cutmix_pastes_a_box_of_the_next_image_and_mixes_targets_by_its_area() -> None:
    n, height, width = 6, 12, 10
    # image i is filled with the value i, so each output pixel says which image it came from
    pixels = np.broadcast_to(
        np.arange(n, dtype=np.uint8)[:, None, None, None], (n, height, width, 3)
    )
    targets = np.eye(n, dtype=np.float32)
    batches = in_memory_batches(np.ascontiguousarray(pixels), targets, n)  # one batch

    def run(share: float, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        ((mixed, mixed_targets),) = list(cutmix_batches(batches, share, seed=3, epoch=epoch))
        return np.asarray(mixed), np.asarray(mixed_targets)

    boxes = set()
    for epoch in range(8):
        mixed, mixed_targets = run(1.0, epoch)
        for i in range(n):
            partner = (i + 1) % n
            from_partner = mixed[i, :, :, 0] == partner
            assert np.all(from_partner | (mixed[i, :, :, 0] == i))
            assert np.all(mixed[i] == mixed[i, :, :, :1])  # channels move together
            rows, cols = np.nonzero(from_partner)
            if len(rows):  # one filled box
                box = (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
                assert from_partner[box[0] : box[1], box[2] : box[3]].all()
                boxes.add(box)
            area = from_partner.mean()
            expected = (1 - area) * targets[i] + area * targets[partner]
            np.testing.assert_allclose(mixed_targets[i], expected, rtol=1e-6)
        # every image of a batch gets the same box
        assert len({tuple(np.nonzero(mixed[i, :, :, 0] != i)[0]) for i in range(n)}) == 1
    assert len(boxes) > 3  # drawn anew for each epoch
    # reproducible for (seed, epoch); share 0 mixes nothing
    np.testing.assert_array_equal(run(1.0, 5)[0], run(1.0, 5)[0])
    unmixed, unmixed_targets = run(0.0, 5)
    np.testing.assert_array_equal(unmixed, pixels)
    np.testing.assert_array_equal(unmixed_targets, targets)


def test_cutmix_trains_on_one_hot_targets(
    small_cnn: CnnParams,
) -> None:
    section = cnn_params(small_cnn, cutmix=1.0, label_smoothing=0.0, epochs=1, warmup_epochs=0.0)
    assert (
        section.one_hot_targets and not cnn_params(small_cnn, label_smoothing=0.0).one_hot_targets
    )
    pixels = random_pixels((16, *RGB_SHAPE), seed=8)
    labels = np.arange(16) % NUM_CLASSES
    data = TrainingData(pixels, labels, pixels[:4], labels[:4], NUM_CLASSES)
    targets = CNN.targets(section, labels, NUM_CLASSES)
    assert targets.shape == (16, NUM_CLASSES)
    model = CNN.compiled_model(section, RGB_SHAPE, NUM_CLASSES, train_size=16, precision="float32")
    fed = CNN.epoch_input(section, data, (targets, targets[:4]), seed=0, epoch=0)
    before = [np.copy(w) for w in model.get_weights()]
    model.fit(**fed, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


@pytest.mark.parametrize(
    ("epochs", "fraction", "small"), [(22, 0.5, 11), (3, 0.5, 2), (3, 0.9, 2), (1, 0.5, 0)]
)
def test_progressive_resizing_rounds_its_share_and_ends_on_the_full_view(
    small_cnn: CnnParams, epochs: int, fraction: float, small: int
) -> None:
    progressive = {"fraction": fraction, "scale": 0.5}
    update = {"epochs": epochs, "warmup_epochs": 0.0, "progressive": progressive}
    section = CnnParams(**{**small_cnn.model_dump(), **update})
    assert section.small_epochs == small


def test_progressive_resizing_needs_a_pooled_head(small_cnn: CnnParams) -> None:
    progressive = {"fraction": 0.5, "scale": 0.5}
    with pytest.raises(ValueError, match="global_average"):
        CnnParams(**{**small_cnn.model_dump(), "pooling": "flatten", "progressive": progressive})
