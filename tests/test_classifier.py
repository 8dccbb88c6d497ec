"""Tests for saved models and the Classifier: save/load round trips, input checks, image bytes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from imgpipe.classifier import Classifier
from imgpipe.model_folder import META_FILE, ModelMeta
from imgpipe.numpy_net import NumpyMLP
from imgpipe.params import load_params
from imgpipe.registry import model_type
from imgpipe.runtime import StageError
from tests.support import fit

KERAS_FILE = model_type("dense").weights_file
NUMPY_FILE = model_type("numpy_mlp").weights_file

CLASS_NAMES = ["cat", "dog", "fish"]
# height != width, so that a transposed view would be caught
GRAY_VIEW = {"view": "gray10x12", "height": 10, "width": 12, "color": "grayscale"}
RGB_VIEW = {"view": "rgb10x12", "height": 10, "width": 12, "color": "rgb"}
CLASSIFIER_KINDS = ("numpy_classifier", "keras_classifier")


def view_shape(view: dict) -> tuple[int, int, int]:
    """(H, W, C) of a view dict."""
    return (view["height"], view["width"], 1 if view["color"] == "grayscale" else 3)


def random_pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Seeded random uint8 pixels."""
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_meta(folder: Path, *, model: str, view: dict) -> ModelMeta:
    """Write meta.json as the train stage does, and return it."""
    meta = ModelMeta(model=model, class_names=list(CLASS_NAMES), **view)
    (folder / META_FILE).write_text(json.dumps(meta.to_json()))
    return meta


def encoded(pixels: np.ndarray, image_format: str, mode: str | None = None) -> bytes:
    """Encode an (H, W[, C]) uint8 array in memory."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    image.save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def numpy_model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, NumpyMLP]:
    """A model folder holding an untrained NumpyMLP on a grayscale view, and the model."""
    folder = tmp_path_factory.mktemp("numpy_model")
    n_inputs = int(np.prod(view_shape(GRAY_VIEW)))
    model = NumpyMLP([n_inputs, 8, len(CLASS_NAMES)], output="softmax", init="he", seed=0)
    model.save(folder / NUMPY_FILE)
    write_meta(folder, model="numpy_mlp", view=GRAY_VIEW)
    return folder, model


@pytest.fixture(scope="module")
def keras_model_dir(
    tmp_path_factory: pytest.TempPathFactory, repo_root: Path
) -> tuple[Path, keras.Model]:
    """A model folder holding a dense Keras model trained one epoch on an RGB view."""
    folder = tmp_path_factory.mktemp("keras_model")
    section = load_params(repo_root / "params.yaml").dense.model_copy(
        update={"hidden_units": [8], "epochs": 1, "batch_size": 16}
    )
    shape = view_shape(RGB_VIEW)
    x = random_pixels((48, *shape), seed=1)
    y = np.arange(48) % len(CLASS_NAMES)
    result = fit(
        "dense", section, x[:40], y[:40], x[40:], y[40:], num_classes=len(CLASS_NAMES), seed=0
    )
    result.model.save(folder / KERAS_FILE)
    write_meta(folder, model="dense", view=RGB_VIEW)
    return folder, result.model


@pytest.fixture(scope="module")
def numpy_classifier(numpy_model_dir: tuple[Path, NumpyMLP]) -> Classifier:
    """Classifier.load of the NumPy model folder."""
    return Classifier.load(numpy_model_dir[0])


@pytest.fixture(scope="module")
def keras_classifier(keras_model_dir: tuple[Path, keras.Model]) -> Classifier:
    """Classifier.load of the Keras model folder."""
    return Classifier.load(keras_model_dir[0])


@pytest.fixture(params=CLASSIFIER_KINDS)
def classifier(request: pytest.FixtureRequest) -> Classifier:
    """Each kind of loaded classifier in turn."""
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------- round trips


def test_model_meta_survives_json(tmp_path: Path) -> None:
    meta = write_meta(tmp_path, model="cnn", view=RGB_VIEW)
    assert ModelMeta.read(tmp_path / META_FILE) == meta
    # meta.json files from before the registry also name a `kind`: still readable
    (tmp_path / "old.json").write_text(json.dumps({**meta.to_json(), "kind": "keras"}))
    assert ModelMeta.read(tmp_path / "old.json") == meta


def test_keras_model_round_trip_in_safe_mode(
    keras_model_dir: tuple[Path, keras.Model], tmp_path: Path
) -> None:
    folder, model = keras_model_dir
    pixels = random_pixels((9, *view_shape(RGB_VIEW)), seed=2)
    loaded = keras.saving.load_model(folder / KERAS_FILE, safe_mode=True)

    assert loaded.inputs[0].dtype == "uint8"
    expected = model.predict(pixels, verbose=0)
    np.testing.assert_array_equal(loaded.predict(pixels, verbose=0), expected)
    # a loaded model can be saved again and still predicts the same
    loaded.save(tmp_path / KERAS_FILE)
    reloaded = keras.saving.load_model(tmp_path / KERAS_FILE, safe_mode=True)
    np.testing.assert_array_equal(reloaded.predict(pixels, verbose=0), expected)


def test_classifier_loads_a_keras_model_folder(
    keras_model_dir: tuple[Path, keras.Model], keras_classifier: Classifier
) -> None:
    _, model = keras_model_dir
    assert keras_classifier.meta == ModelMeta(model="dense", class_names=CLASS_NAMES, **RGB_VIEW)
    pixels = random_pixels((5, *view_shape(RGB_VIEW)), seed=3)
    np.testing.assert_array_equal(
        keras_classifier.predict_proba(pixels), model.predict(pixels, verbose=0)
    )


def test_classifier_loads_a_numpy_model_folder(
    numpy_model_dir: tuple[Path, NumpyMLP], numpy_classifier: Classifier
) -> None:
    _, model = numpy_model_dir
    assert numpy_classifier.meta.model == "numpy_mlp"
    assert numpy_classifier.meta.class_names == CLASS_NAMES
    pixels = random_pixels((6, *view_shape(GRAY_VIEW)), seed=4)
    np.testing.assert_array_equal(
        numpy_classifier.predict_proba(pixels), model.predict_proba(pixels, batch_size=4)
    )


def test_load_without_meta_json_says_to_run_dvc_repro(
    tmp_path: Path, numpy_model_dir: tuple[Path, NumpyMLP]
) -> None:
    (tmp_path / NUMPY_FILE).write_bytes((numpy_model_dir[0] / NUMPY_FILE).read_bytes())
    with pytest.raises(StageError, match=r"dvc repro") as raised:
        Classifier.load(tmp_path)
    assert META_FILE in str(raised.value)
    with pytest.raises(StageError, match=r"dvc repro"):
        Classifier.load(tmp_path / "no-such-folder")


def test_load_refuses_an_unknown_model_type_naming_the_known_ones(tmp_path: Path) -> None:
    write_meta(tmp_path, model="onnx", view=GRAY_VIEW)
    with pytest.raises(StageError, match=r"'onnx' is unknown.*cnn, dense, logreg, numpy_mlp"):
        Classifier.load(tmp_path)


# --------------------------------------------------------------------------- predict_proba


def bad_pixels(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Inputs that are not a uint8 batch of this (H, W, C) view."""
    height, width, channels = shape
    other_channels = 3 if channels == 1 else 1
    return {
        "float pixels": np.zeros((2, *shape), dtype=np.float32),
        "int64 pixels": np.zeros((2, *shape), dtype=np.int64),
        "transposed": np.zeros((2, width, height, channels), dtype=np.uint8),
        "other channels": np.zeros((2, height, width, other_channels), dtype=np.uint8),
        "no channel axis": np.zeros((2, height, width), dtype=np.uint8),
        "no batch axis": np.zeros(shape, dtype=np.uint8),
        "flat": np.zeros((2, height * width * channels), dtype=np.uint8),
    }


def test_predict_proba_rejects_wrong_dtype_or_shape(classifier: Classifier) -> None:
    meta = classifier.meta
    shape = view_shape({"height": meta.height, "width": meta.width, "color": meta.color})
    for problem, pixels in bad_pixels(shape).items():
        with pytest.raises(ValueError, match="expected uint8 pixels") as raised:
            classifier.predict_proba(pixels)
        message = str(raised.value)
        assert str(pixels.shape) in message, problem
        assert str(shape) in message, problem


def test_predict_proba_gives_a_distribution_per_image(classifier: Classifier) -> None:
    meta = classifier.meta
    shape = view_shape({"height": meta.height, "width": meta.width, "color": meta.color})
    proba = classifier.predict_proba(random_pixels((7, *shape), seed=5), batch_size=3)
    assert proba.shape == (7, len(CLASS_NAMES))
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert classifier.predict_proba(np.zeros((0, *shape), dtype=np.uint8)).shape == (
        0,
        len(CLASS_NAMES),
    )


# --------------------------------------------------------------------------- classify_bytes


def check_classified(classifier: Classifier, data: bytes, result: object) -> None:
    """A (label, probability) pair that agrees with predict_proba on the decoded view."""
    assert isinstance(result, tuple), result
    label, probability = result
    proba = classifier.predict_proba(classifier.decode(data)[None])[0]  # (K,)
    assert label == CLASS_NAMES[int(proba.argmax())]
    assert isinstance(probability, float)
    assert probability == pytest.approx(float(proba.max()), rel=1e-5)
    assert 1 / len(CLASS_NAMES) <= probability <= 1


def test_classify_bytes_reads_images_of_any_size_and_mode(
    classifier: Classifier, image_bytes: dict[str, bytes]
) -> None:
    extra = {
        "one pixel.png": encoded(random_pixels((1, 1, 3)), "PNG"),
        "large.jpg": encoded(random_pixels((300, 451, 3), seed=6), "JPEG"),
        "tall gray.jpg": encoded(random_pixels((97, 5), seed=7), "JPEG"),
        "bilevel.png": encoded(random_pixels((20, 30), seed=8), "PNG", mode="1"),
    }
    images = {**image_bytes, **extra}
    results = classifier.classify_bytes(list(images.values()))
    assert len(results) == len(images)
    for (name, data), result in zip(images.items(), results, strict=True):
        assert isinstance(result, tuple), f"{name}: {result}"
        check_classified(classifier, data, result)


def test_classify_bytes_reports_unreadable_images_without_raising(
    classifier: Classifier, corrupt_bytes: dict[str, bytes], image_bytes: dict[str, bytes]
) -> None:
    bad = {
        **corrupt_bytes,
        "random bytes": random_pixels((500,), seed=9).tobytes(),
        "png header only": image_bytes["gray.png"][:40],
    }
    assert {"truncated.jpg", "empty.jpg", "notes.jpg"} <= set(bad)
    good = image_bytes["rgb.jpg"]
    payloads = [good, *bad.values(), good]

    results = classifier.classify_bytes(payloads)

    assert len(results) == len(payloads)
    check_classified(classifier, good, results[0])
    check_classified(classifier, good, results[-1])
    for name, result in zip(bad, results[1:-1], strict=True):
        assert isinstance(result, str), name
        assert result.strip(), name
    assert "empty" in results[1 + list(bad).index("empty.jpg")]


def test_classify_bytes_of_nothing_but_bad_images(
    classifier: Classifier, corrupt_bytes: dict[str, bytes]
) -> None:
    results = classifier.classify_bytes(list(corrupt_bytes.values()))
    assert all(isinstance(result, str) and result for result in results)
    assert classifier.classify_bytes([]) == []
