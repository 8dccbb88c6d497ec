"""Tests for the pure evaluation helpers (metrics and figures) on tiny in-memory arrays."""

from __future__ import annotations

import math
from collections import Counter
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from imgpipe.figures import confusion_png, history_png, prediction_grid_png, roc_png
from imgpipe.metrics import classification_metrics, confusion_rows, micro_roc_rows, roc_rows

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
