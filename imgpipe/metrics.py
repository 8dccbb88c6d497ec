"""Classification metrics and DVC plot rows of a model's test predictions: pure functions of the
true labels and the predicted probabilities, checked before use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

# Same clipping as Keras' categorical cross-entropy, so the reported test loss is comparable
# with the training history's val_loss.
_PROBA_EPSILON = 1e-7


def check_labels(y: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    """y as a 1-D array of class indices in 0..num_classes-1, or a ValueError naming `name`."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{name} holds class indices outside 0..{num_classes - 1} "
            f"(min {y.min()}, max {y.max()}); check class_names against the label encoding"
        )
    return y


def check_proba(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and (N, K) probability rows that match, as arrays, or a ValueError saying why."""
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] < 2:
        raise ValueError(f"proba must have shape (N, K) with K >= 2, got {proba.shape}")
    y_true = check_labels(y_true, proba.shape[1], "y_true")
    if len(y_true) != len(proba):
        raise ValueError(f"y_true has {len(y_true)} samples but proba has {len(proba)} rows")
    if len(y_true) == 0:
        raise ValueError("cannot evaluate an empty test set")
    # Loose tolerance: float32 softmax rows drift from 1 by ~1e-7; logits drift by far more.
    row_sums = proba.sum(axis=1)  # (N,)
    if proba.min() < 0 or proba.max() > 1 or not np.allclose(row_sums, 1.0, atol=1e-3):
        raise ValueError(
            "proba rows must be probabilities summing to 1 (softmax output, not logits); "
            f"row sums range {row_sums.min():.4g}..{row_sums.max():.4g}"
        )
    return y_true, proba


def check_binary(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """check_proba, and a ROC curve is defined: two classes, both present in y_true."""
    y_true, proba = check_proba(y_true, proba)
    if proba.shape[1] != 2:
        raise ValueError(f"ROC needs a binary problem (K == 2), got K == {proba.shape[1]}")
    if np.unique(y_true).size < 2:
        raise ValueError("ROC is undefined when y_true holds only one class")
    return y_true, proba


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]
) -> dict[str, float]:
    """Return accuracy, cross-entropy loss, precision/recall/f1, binary ROC AUC and n_test."""
    y_true, proba = check_proba(y_true, proba)
    num_classes = proba.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class_names for {num_classes} probability columns")
    y_pred = proba.argmax(axis=1)  # (N,)
    labels = list(range(num_classes))
    # Binary: class index 1 is the positive class; otherwise every class weighs the same.
    average = "binary" if num_classes == 2 else "macro"
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=average, pos_label=1, zero_division=0
    )
    p_true = np.clip(proba[np.arange(len(y_true)), y_true], _PROBA_EPSILON, 1.0)  # (N,)
    result: dict[str, float] = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "loss": float(-np.mean(np.log(p_true))),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
    if num_classes == 2 and np.unique(y_true).size == 2:
        result["roc_auc"] = float(skm.roc_auc_score(y_true, proba[:, 1]))
    result["n_test"] = len(y_true)
    return result


def confusion_rows(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, str]]:
    """Return one {"actual", "predicted"} row per sample for DVC's confusion plot template."""
    y_true = check_labels(y_true, len(class_names), "y_true")
    y_pred = check_labels(y_pred, len(class_names), "y_pred")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} samples but y_pred has {len(y_pred)}")
    names = [str(name) for name in class_names]
    return [
        {"actual": names[actual], "predicted": names[predicted]}
        for actual, predicted in zip(y_true.tolist(), y_pred.tolist(), strict=True)
    ]


def roc_rows(y_true: np.ndarray, proba: np.ndarray) -> list[dict[str, float]]:
    """Return {"fpr", "tpr", "threshold"} rows of the binary ROC curve on proba[:, 1]."""
    y_true, proba = check_binary(y_true, proba)
    fpr, tpr, thresholds = skm.roc_curve(y_true, proba[:, 1], pos_label=1)
    # sklearn's first threshold is +inf (or max + 1 in old versions), which is not valid JSON.
    thresholds = np.minimum(thresholds, 1.0)
    return [
        {"fpr": float(f), "tpr": float(t), "threshold": float(th)}
        for f, t, th in zip(fpr, tpr, thresholds, strict=True)
    ]


def micro_roc_rows(y_true: np.ndarray, proba: np.ndarray) -> list[dict[str, float]]:
    """ROC rows micro-averaged over one-vs-rest problems: one curve for any number of classes."""
    y_true, proba = check_proba(y_true, proba)
    one_hot = np.eye(proba.shape[1], dtype=np.int8)[y_true]  # (N, K)
    fpr, tpr, thresholds = skm.roc_curve(one_hot.ravel(), proba.ravel())
    thresholds = np.minimum(thresholds, 1.0)
    return [
        {"fpr": float(f), "tpr": float(t), "threshold": float(th)}
        for f, t, th in zip(fpr, tpr, thresholds, strict=True)
    ]
