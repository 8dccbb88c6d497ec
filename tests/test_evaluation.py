"""Tests for the pure evaluation helpers (metrics, their 95 % intervals, per-image answers, model
cards and figures) on tiny in-memory arrays."""

from __future__ import annotations

import math
from collections import Counter
from io import BytesIO

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from imgpipe import metrics as metrics_module
from imgpipe.cards import DESCRIPTION_LIMIT, CardData, ModelCard, description
from imgpipe.figures import confusion_png, history_png, prediction_grid_png, roc_png
from imgpipe.metrics import (
    Z95,
    answer_rows,
    class_scores,
    classification_metrics,
    confusion_rows,
    metric_intervals,
    micro_roc_rows,
    resample_counts,
    roc_rows,
    weighted_auc,
    weighted_confusion,
    wilson_interval,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BINARY_NAMES = ("cat", "dog")
TERNARY_NAMES = ("cat", "dog", "fox")


def _decoded_png(data: bytes) -> Image.Image:
    assert isinstance(data, bytes)
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def _binary_proba(p_positive: list[float]) -> np.ndarray:
    p = np.asarray(p_positive, dtype=float)
    return np.stack([1.0 - p, p], axis=1)  # (N, 2)


@pytest.fixture
def binary_case() -> tuple[np.ndarray, np.ndarray]:
    y_true = np.array([0, 0, 0, 1, 1, 1, 1, 0, 0])
    proba = _binary_proba([0.1, 0.4, 0.7, 0.8, 0.6, 0.3, 0.9, 0.2, 0.55])
    return y_true, proba


# --- classification_metrics -------------------------------------------------------------------


def test_perfect_binary_predictions_score_one() -> None:
    y_true = np.array([0, 1, 1, 0, 1])
    proba = _binary_proba([0.05, 0.9, 0.8, 0.2, 0.99])
    result = classification_metrics(y_true, proba, BINARY_NAMES)
    assert result["accuracy"] == 1.0
    assert result["precision"] == 1.0
    assert result["recall"] == 1.0
    assert result["f1"] == 1.0
    assert result["roc_auc"] == 1.0
    assert result["n_test"] == 5


def test_binary_precision_recall_by_hand(binary_case: tuple[np.ndarray, np.ndarray]) -> None:
    y_true, proba = binary_case
    # Predicted positive (p > 0.5) at indices 2, 3, 4, 6, 8; actual positives at 3, 4, 5, 6.
    # tp = {3, 4, 6}, fp = {2, 8}, fn = {5}, tn = {0, 1, 7}: asymmetric, so pos_label matters.
    tp, fp, fn = 3, 2, 1
    expected_precision = tp / (tp + fp)
    expected_recall = tp / (tp + fn)
    expected_f1 = 2 * expected_precision * expected_recall / (expected_precision + expected_recall)
    result = classification_metrics(y_true, proba, BINARY_NAMES)
    assert result["accuracy"] == pytest.approx(6 / 9)
    assert result["precision"] == pytest.approx(expected_precision)
    assert result["recall"] == pytest.approx(expected_recall)
    assert result["f1"] == pytest.approx(expected_f1)


def test_binary_roc_auc_counts_correctly_ordered_pairs(
    binary_case: tuple[np.ndarray, np.ndarray],
) -> None:
    y_true, proba = binary_case
    positives = proba[y_true == 1, 1]
    negatives = proba[y_true == 0, 1]
    ordered_pairs = sum(float(p > n) + 0.5 * float(p == n) for p in positives for n in negatives)
    expected_auc = ordered_pairs / (len(positives) * len(negatives))
    result = classification_metrics(y_true, proba, BINARY_NAMES)
    assert result["roc_auc"] == pytest.approx(expected_auc)


def test_positive_class_is_index_one() -> None:
    # Class 1 is never predicted, so its precision/recall are 0 although class 0 is perfect.
    y_true = np.array([0, 0, 0, 1])
    proba = _binary_proba([0.1, 0.2, 0.3, 0.4])
    result = classification_metrics(y_true, proba, BINARY_NAMES)
    assert result["recall"] == 0.0
    assert result["precision"] == 0.0
    assert result["accuracy"] == pytest.approx(3 / 4)


def test_ternary_macro_average_by_hand() -> None:
    # Unequal supports (4, 2, 2), so a support-weighted average would differ from macro.
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    proba = np.full((8, 3), 0.1)
    proba[np.arange(8), y_pred] = 0.8
    # Per class (tp, fp, fn): cat (3, 1, 1), dog (2, 1, 0), fox (1, 0, 1).
    per_class_precision = [3 / 4, 2 / 3, 1 / 1]
    per_class_recall = [3 / 4, 2 / 2, 1 / 2]
    per_class_f1 = [
        2 * p * r / (p + r) for p, r in zip(per_class_precision, per_class_recall, strict=True)
    ]
    result = classification_metrics(y_true, proba, TERNARY_NAMES)
    assert result["accuracy"] == pytest.approx(6 / 8)
    assert result["precision"] == pytest.approx(sum(per_class_precision) / 3)
    assert result["recall"] == pytest.approx(sum(per_class_recall) / 3)
    assert result["f1"] == pytest.approx(sum(per_class_f1) / 3)
    assert "roc_auc" not in result
    assert result["n_test"] == 8


def test_loss_is_mean_negative_log_probability_of_true_class() -> None:
    y_true = np.array([0, 2, 1, 2])
    proba = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.1, 0.3, 0.6],
            [0.5, 0.25, 0.25],
            [0.2, 0.2, 0.6],
        ]
    )
    expected = -(math.log(0.7) + math.log(0.6) + math.log(0.25) + math.log(0.6)) / 4
    result = classification_metrics(y_true, proba, TERNARY_NAMES)
    assert result["loss"] == pytest.approx(expected)


def test_loss_stays_finite_when_true_class_gets_zero_probability() -> None:
    y_true = np.array([0, 1])
    proba = np.array([[0.0, 1.0], [0.0, 1.0]])
    result = classification_metrics(y_true, proba, BINARY_NAMES)
    assert math.isfinite(result["loss"])
    assert result["loss"] > 0


def test_roc_auc_omitted_when_only_one_class_present() -> None:
    y_true = np.array([1, 1, 1])
    proba = _binary_proba([0.9, 0.6, 0.3])
    result = classification_metrics(y_true, proba, BINARY_NAMES)
    assert "roc_auc" not in result


def test_metrics_are_json_ready_and_limited_to_documented_keys(
    binary_case: tuple[np.ndarray, np.ndarray],
) -> None:
    y_true, proba = binary_case
    result = classification_metrics(y_true, proba, BINARY_NAMES)
    assert set(result) == {"accuracy", "loss", "precision", "recall", "f1", "roc_auc", "n_test"}
    assert type(result["n_test"]) is int
    for key, value in result.items():
        if key != "n_test":
            assert type(value) is float, key


@pytest.mark.parametrize(
    ("y_true", "proba", "names", "error"),
    [
        (np.array([0, 1]), _binary_proba([0.2, 0.8]), TERNARY_NAMES, "3 class_names for 2 "),
        (np.array([0, 1, 1]), _binary_proba([0.2, 0.8]), BINARY_NAMES, "has 3 samples but proba"),
        (np.array([0, 2]), _binary_proba([0.2, 0.8]), BINARY_NAMES, r"outside 0\.\.1 "),
        (np.array([0, 1]), np.array([0.2, 0.8]), BINARY_NAMES, r"must have shape \(N, K\)"),
        (
            np.array([0, 1]),
            np.array([[2.0, -1.0], [-0.5, 1.5]]),  # logits
            BINARY_NAMES,
            "must be probabilities summing to 1",
        ),
    ],
)
def test_metrics_reject_inconsistent_inputs(
    y_true: np.ndarray, proba: np.ndarray, names: tuple[str, ...], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        classification_metrics(y_true, proba, names)


# --- confusion_rows / roc_rows ----------------------------------------------------------------


def test_confusion_rows_match_crosstab() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, size=40)
    y_pred = rng.integers(0, 3, size=40)
    rows = confusion_rows(y_true, y_pred, TERNARY_NAMES)
    assert len(rows) == len(y_true)
    assert all(set(row) == {"actual", "predicted"} for row in rows)
    counts = Counter((row["actual"], row["predicted"]) for row in rows)
    for actual in range(3):
        for predicted in range(3):
            expected = int(np.sum((y_true == actual) & (y_pred == predicted)))
            assert counts[(TERNARY_NAMES[actual], TERNARY_NAMES[predicted])] == expected


def test_confusion_rows_keep_sample_order() -> None:
    rows = confusion_rows(np.array([1, 0]), np.array([0, 0]), BINARY_NAMES)
    assert rows == [
        {"actual": "dog", "predicted": "cat"},
        {"actual": "cat", "predicted": "cat"},
    ]


def test_roc_rows_are_finite_and_monotone(binary_case: tuple[np.ndarray, np.ndarray]) -> None:
    y_true, proba = binary_case
    rows = roc_rows(y_true, proba)
    assert len(rows) >= 2
    assert all(set(row) == {"fpr", "tpr", "threshold"} for row in rows)
    fpr = np.array([row["fpr"] for row in rows])
    tpr = np.array([row["tpr"] for row in rows])
    thresholds = np.array([row["threshold"] for row in rows])
    assert np.all(np.isfinite(fpr)) and np.all(np.isfinite(tpr)) and np.all(np.isfinite(thresholds))
    assert np.all(np.diff(fpr) >= 0)
    assert np.all(np.diff(tpr) >= 0)
    assert np.all((thresholds >= 0) & (thresholds <= 1))
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)


def test_roc_rows_reject_multiclass() -> None:
    proba = np.full((3, 3), 1 / 3)
    with pytest.raises(ValueError, match="K == 2"):
        roc_rows(np.array([0, 1, 2]), proba)


# --- PNG figures ------------------------------------------------------------------------------


def test_history_png_decodes() -> None:
    history = {
        "loss": [0.9, 0.6, 0.45, 0.4],
        "val_loss": [1.0, 0.7, 0.6, 0.62],
        "accuracy": [0.55, 0.7, 0.8, 0.83],
        "val_accuracy": [0.5, 0.65, 0.72, 0.71],
    }
    image = _decoded_png(history_png(history, "training history"))
    assert image.width > image.height > 200  # two panels side by side


def test_history_png_tolerates_missing_validation_keys() -> None:
    history = {"loss": [0.9, 0.5], "accuracy": [0.6, 0.8]}
    image = _decoded_png(history_png(history, "no validation"))
    assert image.width > image.height > 200


def test_confusion_png_decodes() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0, 2])
    image = _decoded_png(confusion_png(y_true, y_pred, TERNARY_NAMES, "confusion"))
    assert min(image.size) > 200


def test_roc_png_decodes(binary_case: tuple[np.ndarray, np.ndarray]) -> None:
    y_true, proba = binary_case
    image = _decoded_png(roc_png(y_true, proba, "ROC"))
    assert min(image.size) > 200


@pytest.mark.parametrize("channels", [1, 3])
def test_prediction_grid_png_decodes(channels: int) -> None:
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, size=(5, 24, 32, channels), dtype=np.uint8)  # (N, H, W, C)
    true_labels = ["cat", "dog", "cat", "dog", "cat"]
    pred_labels = ["cat", "cat", "cat", "dog", "dog"]
    probabilities = [0.93, 0.51, 0.77, 0.99, 0.6]
    png = prediction_grid_png(images, true_labels, pred_labels, probabilities, columns=3)
    image = _decoded_png(png)
    # Three columns by two rows of cells.
    assert image.width > image.height > 200
    if channels == 1:
        # Single-channel images are drawn in gray, not through a colour map; titles are coloured.
        pixels = np.asarray(image.convert("RGB")).astype(int)  # (H, W, 3)
        colourful = np.abs(pixels - pixels.mean(axis=-1, keepdims=True)).max(axis=-1) > 8
        assert colourful.mean() < 0.02


@pytest.mark.parametrize(("predicted", "expect_green"), [("cat", True), ("dog", False)])
def test_prediction_grid_titles_are_green_when_right_and_red_when_wrong(
    predicted: str, expect_green: bool
) -> None:
    images = np.full((2, 16, 16, 1), 128, dtype=np.uint8)  # gray, so only titles carry colour
    png = prediction_grid_png(images, ["cat", "cat"], [predicted] * 2, [0.9, 0.8], columns=2)
    pixels = np.asarray(_decoded_png(png).convert("RGB")).astype(int)  # (H, W, 3)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    has_green = bool(np.any((green > red + 60) & (green > blue + 40)))
    has_red = bool(np.any((red > green + 60) & (red > blue + 60)))
    assert has_green == expect_green
    assert has_red == (not expect_green)


def test_prediction_grid_png_rejects_mismatched_lengths() -> None:
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="2 images but 1 true labels, 2 predicted labels"):
        prediction_grid_png(images, ["cat"], ["cat", "dog"], [0.9, 0.8], columns=2)


def test_micro_roc_rows_for_many_classes_are_a_valid_curve() -> None:
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 4, 60)
    logits = rng.normal(size=(60, 4)) + 3 * np.eye(4)[y_true]  # informative scores
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    rows = micro_roc_rows(y_true, proba)
    fpr = np.array([r["fpr"] for r in rows])
    tpr = np.array([r["tpr"] for r in rows])
    assert fpr[0] == 0.0 and fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # informative scores: the area under the micro curve beats chance
    assert np.trapezoid(tpr, fpr) > 0.7


# --- 95 % intervals ---------------------------------------------------------------------------


def _softmax_case(n: int, num_classes: int, signal: float, seed: int) -> tuple[np.ndarray, ...]:
    """Labels and softmax rows of an informative but imperfect classifier."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)) + signal * np.eye(num_classes)[y_true]
    return y_true, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", table I
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605)],
)
def test_wilson_interval_matches_published_values(
    successes: int, trials: int, low: float, high: float
) -> None:
    assert wilson_interval(successes, trials) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_at_the_edges_has_its_closed_form() -> None:
    n, z2 = 10, Z95 * Z95
    assert wilson_interval(0, n) == pytest.approx((0.0, z2 / (n + z2)))
    assert wilson_interval(n, n) == pytest.approx((n / (n + z2), 1.0))


@pytest.mark.parametrize(("successes", "trials"), [(3, 0), (-1, 5), (6, 5)])
def test_wilson_interval_rejects_impossible_counts(successes: int, trials: int) -> None:
    with pytest.raises(ValueError, match="need 0 <= successes <= trials and trials > 0"):
        wilson_interval(successes, trials)


def test_resample_counts_are_reproducible_and_independent_of_the_chunk_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    whole = np.concatenate(list(resample_counts(50, 40, seed=7)))
    assert whole.shape == (40, 50)
    assert np.all(whole.sum(axis=1) == 50)  # each resample draws n images
    assert np.array_equal(whole, np.concatenate(list(resample_counts(50, 40, seed=7))))
    assert not np.array_equal(whole, np.concatenate(list(resample_counts(50, 40, seed=8))))
    monkeypatch.setattr(metrics_module, "_BOOTSTRAP_CELLS", 50 * 3)  # chunks of 3 resamples
    chunks = list(resample_counts(50, 40, seed=7))
    assert len(chunks) == 14
    assert np.array_equal(np.concatenate(chunks), whole)


def test_weighted_figures_equal_scikit_learn_on_the_resampled_images() -> None:
    y_true, proba = _softmax_case(120, 2, 1.0, seed=1)
    scores = np.round(proba[:, 1], 1)  # ties, which count half
    y_pred = proba.argmax(axis=1)
    counts = next(resample_counts(120, 3, seed=0))  # (3, 120)
    aucs = weighted_auc(counts, y_true, scores)
    per_class = class_scores(weighted_confusion(counts, y_true, y_pred, 2))
    for row, weights in enumerate(counts.astype(int)):
        drawn = np.repeat(np.arange(120), weights)  # the resample as images
        assert aucs[row] == pytest.approx(skm.roc_auc_score(y_true[drawn], scores[drawn]))
        expected = skm.precision_recall_fscore_support(
            y_true[drawn], y_pred[drawn], labels=[0, 1], zero_division=0
        )
        for key, values in zip(("precision", "recall", "f1"), expected[:3], strict=True):
            assert per_class[key][row] == pytest.approx(values)


def test_weighted_auc_is_undefined_without_both_classes() -> None:
    weights = np.array([[1.0, 1.0, 0.0, 0.0]])
    assert np.isnan(weighted_auc(weights, np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_every_interval_contains_its_estimate(num_classes: int) -> None:
    y_true, proba = _softmax_case(400, num_classes, 1.5, seed=num_classes)
    point = classification_metrics(y_true, proba, ["a", "b", "c"][:num_classes])
    found = metric_intervals(y_true, proba, ["a", "b", "c"][:num_classes], resamples=300, seed=42)
    expected = {"accuracy", "loss", "precision", "recall", "f1"} | (
        {"roc_auc"} if num_classes == 2 else set()
    )
    assert {key[: -len("_ci95")] for key in found if key.endswith("_ci95")} == expected
    for key in expected:
        low, high = found[f"{key}_ci95"]
        assert low < point[key] < high, key
        assert (found[f"{key}_ci95_low"], found[f"{key}_ci95_high"]) == (low, high)
        assert high - low < 0.2, key  # 400 images: a few points either side, not the whole range
    assert found["accuracy_ci95"] == list(wilson_interval(round(point["accuracy"] * 400), 400))


def test_intervals_are_reproducible_for_a_seed() -> None:
    y_true, proba = _softmax_case(200, 3, 1.0, seed=5)
    names = ["a", "b", "c"]
    first = metric_intervals(y_true, proba, names, resamples=200, seed=1)
    assert metric_intervals(y_true, proba, names, resamples=200, seed=1) == first
    other = metric_intervals(y_true, proba, names, resamples=200, seed=2)
    assert other["f1_ci95"] != first["f1_ci95"]
    assert other["accuracy_ci95"] == first["accuracy_ci95"]  # Wilson's needs no resampling


def test_per_class_figures_equal_scikit_learn_and_lie_in_their_intervals() -> None:
    y_true, proba = _softmax_case(300, 3, 1.2, seed=9)
    names = ["cat", "dog", "fox"]
    per_class = metric_intervals(y_true, proba, names, resamples=300, seed=0)["per_class"]
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, proba.argmax(axis=1), labels=[0, 1, 2], zero_division=0
    )
    assert list(per_class) == names
    for index, name in enumerate(names):
        row = per_class[name]
        assert row["support"] == support[index]
        for key, values in (("precision", precision), ("recall", recall), ("f1", f1)):
            assert row[key] == pytest.approx(values[index])
            low, high = row[f"{key}_ci95"]
            assert low <= row[key] <= high


def test_one_class_precision_and_recall_get_wilson_intervals_on_their_denominators() -> None:
    # cat: 3 of 4 cat images found (recall), 3 of 3 images called cat right (precision)
    y_true = np.array([0, 0, 0, 0, 1, 1, 1])
    proba = _binary_proba([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9])
    found = metric_intervals(y_true, proba, BINARY_NAMES, resamples=200, seed=0)
    cat, dog = found["per_class"]["cat"], found["per_class"]["dog"]
    assert cat["recall_ci95"] == list(wilson_interval(3, 4))
    assert cat["precision_ci95"] == list(wilson_interval(3, 3))
    assert cat["precision_ci95"][0] < 0.5  # 3 of 3 is no proof of perfection
    assert dog["precision_ci95"] == list(wilson_interval(3, 4))
    # two classes: the headline figures are the positive class's (index 1), intervals too
    assert found["precision_ci95"] == dog["precision_ci95"]
    assert found["recall_ci95"] == dog["recall_ci95"] == list(wilson_interval(3, 3))


def test_a_class_never_predicted_has_no_precision_interval() -> None:
    y_true = np.array([0, 0, 1, 1, 2])
    proba = np.full((5, 3), 0.1)
    proba[np.arange(5), [0, 0, 1, 1, 1]] = 0.8  # fox (2) is never predicted
    fox = metric_intervals(y_true, proba, TERNARY_NAMES, resamples=100, seed=0)["per_class"]["fox"]
    assert fox["precision"] == 0.0 and fox["precision_ci95"] is None
    assert fox["recall_ci95"] == list(wilson_interval(0, 1))


def test_answer_rows_name_each_image_and_whether_it_was_right() -> None:
    y_true = np.array([0, 1, 1])
    proba = _binary_proba([0.2, 0.3, 0.9])
    rows = answer_rows(
        ["test/cat/a.jpg", "test/dog/b.jpg", "test/dog/c.jpg"], y_true, proba, BINARY_NAMES
    )
    assert rows == [
        {
            "source": "test/cat/a.jpg",
            "label": "cat",
            "predicted": "cat",
            "probability": 0.8,
            "correct": 1,
        },
        {
            "source": "test/dog/b.jpg",
            "label": "dog",
            "predicted": "cat",
            "probability": 0.7,
            "correct": 0,
        },
        {
            "source": "test/dog/c.jpg",
            "label": "dog",
            "predicted": "dog",
            "probability": 0.9,
            "correct": 1,
        },
    ]
    with pytest.raises(ValueError, match="2 sources for 3 test images"):
        answer_rows(["a", "b"], y_true, proba, BINARY_NAMES)


# --- model cards ------------------------------------------------------------------------------


def _card(class_names: list[str], y_true: np.ndarray, proba: np.ndarray) -> ModelCard:
    """A card for the given test answers, with made-up data and training facts."""
    metrics = {
        **classification_metrics(y_true, proba, class_names),
        **metric_intervals(y_true, proba, class_names, resamples=200, seed=3),
    }
    k = len(class_names)
    confusion = weighted_confusion(np.ones((1, len(y_true))), y_true, proba.argmax(1), k)[0]
    data = CardData(
        source="data/raw/train.zip",
        view="rgb64",
        height=64,
        width=64,
        color="rgb",
        class_names=class_names,
        counts={
            "train": [800] * k,
            "val": [100] * k,
            "test": np.bincount(y_true, minlength=k).tolist(),
        },
        data_hash="0123456789abcdef",
        test_hash="fedcba9876543210",
    )
    training = {"train_seconds": 12.5, "train_images_per_second": 640.0, "parameters": 1234}
    return ModelCard(
        model="cnn",
        run_id="abc123",
        data=data,
        params={"cnn": {"epochs": 3}},
        metrics=metrics,
        confusion=confusion.astype(int).tolist(),
        training=training,
        resamples=200,
        seed=3,
    )


def _markdown_table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells, header included) of the first table under a `## heading` line."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [
        [cell.strip() for cell in line.strip("|").split(" | ")]
        for line in lines
        if "---" not in line
    ]


def test_card_shows_the_metrics_and_the_confusion_matrix() -> None:
    y_true, proba = _softmax_case(300, 2, 1.5, seed=4)
    card = _card(["cat", "dog"], y_true, proba)
    text = card.markdown()
    assert text.startswith("# Model card: cnn\n\n" + card.summary() + "\n\n## Data")
    results = {row[0]: row[1:] for row in _markdown_table(text, "Test results")[1:]}
    metrics = card.metrics
    assert results["accuracy"] == [
        f"{metrics['accuracy']:.4f}",
        f"{metrics['accuracy_ci95'][0]:.4f} – {metrics['accuracy_ci95'][1]:.4f}",
    ]
    assert results["ROC AUC"][0] == f"{metrics['roc_auc']:.4f}"
    confusion = _markdown_table(text, "Confusion matrix")
    assert confusion[0] == ["actual \\ predicted", "cat", "dog"]
    assert sum(int(c) for row in confusion[1:] for c in row[1:]) == 300
    assert "Machine: not recorded" in text  # a model trained before machines were recorded
    assert "class `dog` as the positive class" in text
    assert "Weakest class:" in card.summary()


def test_card_keeps_odd_class_names_inside_their_cells() -> None:
    y_true, proba = _softmax_case(90, 3, 2.0, seed=2)
    text = _card(["a|b", "c\nd", "e"], y_true, proba).markdown()
    confusion = _markdown_table(text, "Confusion matrix")
    assert confusion[0] == ["actual \\ predicted", "a\\|b", "c d", "e"]
    assert all(len(row) == 4 for row in confusion)


def test_card_names_the_machine_and_the_choices_that_train_recorded() -> None:
    import dataclasses

    from imgpipe.precision import MACHINE_FLAGS, cpu_flags, machine
    from imgpipe.runtime import cpu_count

    here = machine()
    assert here["cores"] == cpu_count()
    assert set(here["cpu_flags"]) == cpu_flags() & set(MACHINE_FLAGS)
    y_true, proba = _softmax_case(60, 2, 2.0, seed=1)
    card = _card(["cat", "dog"], y_true, proba)
    choices = {"precision": "float32", "precision_reason": "no bfloat16 hardware"}
    training = {**card.training, "machine": here, "choices": {**choices, "devices": "/cpu:0"}}
    text = dataclasses.replace(card, training=training).markdown()
    assert f"- Machine: {here['cpu']}, {here['cores']} cores, {here['memory_gib']} GiB" in text
    assert "- Precision: float32 (no bfloat16 hardware)\n- Devices: /cpu:0\n" in text


def test_description_is_cut_to_mlflows_bound() -> None:
    assert description("short") == "short"
    cut = description("x" * 6000)
    assert len(cut) == DESCRIPTION_LIMIT and cut.endswith("…")
    exact = "y" * DESCRIPTION_LIMIT
    assert description(exact) == exact
