"""Classification metrics and DVC plot rows of a model's test predictions: pure functions of the
true labels and the predicted probabilities, checked before use."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

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


# --- 95 % intervals ---------------------------------------------------------------------------

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: two-sided 95 % intervals
_BOOTSTRAP_CELLS = 1 << 22  # resampled images held at once (bounds the bootstrap's memory)
_PER_CLASS = ("precision", "recall", "f1")


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of the binomial proportion successes / trials."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    p, z2 = successes / trials, Z95 * Z95
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = Z95 * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def resample_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples of n items as (B, n) counts (how often each item was drawn), in
    chunks of bounded size; the same seed gives the same resamples."""
    if n <= 0 or resamples <= 0:
        raise ValueError(f"need items and resamples, got n={n}, resamples={resamples}")
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOTSTRAP_CELLS // n)
    for start in range(0, resamples, rows):
        size = min(rows, resamples - start)
        picks = rng.integers(0, n, size=(size, n)) + np.arange(size)[:, None] * n  # (B, n)
        yield np.bincount(picks.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)


def weighted_confusion(
    weights: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, num_classes: int
) -> np.ndarray:
    """(B, K, K) confusion counts [actual, predicted] of each row of (B, N) image weights."""
    cells = num_classes * num_classes
    codes = y_true * num_classes + y_pred  # (N,)
    flat = (codes[None, :] + np.arange(len(weights))[:, None] * cells).ravel()
    counts = np.bincount(flat, weights=weights.ravel(), minlength=len(weights) * cells)
    return counts.reshape(len(weights), num_classes, num_classes)


def class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall and F1 (B, K) of (B, K, K) confusion counts; 0 where a
    denominator is 0, as scikit-learn's zero_division=0."""
    tp = np.diagonal(confusion, axis1=1, axis2=2)  # (B, K)
    actual, predicted = confusion.sum(axis=2), confusion.sum(axis=1)  # (B, K) each

    def ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
        return np.divide(top, bottom, out=np.zeros_like(top), where=bottom > 0)

    return {
        "precision": ratio(tp, predicted),
        "recall": ratio(tp, actual),
        "f1": ratio(2 * tp, actual + predicted),
    }


def weighted_auc(weights: np.ndarray, y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Binary ROC AUC (B,) of each row of (B, N) image weights: the weighted share of
    (positive, negative) pairs in the right order, ties counting half; NaN without both."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tie groups
    w = weights[:, order]  # (B, N)
    positive = y_true[order] == 1
    pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)  # (B, groups)
    neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored lower than each group
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    ordered = (pos * (below + 0.5 * neg)).sum(axis=1)
    return np.divide(ordered, pairs, out=np.full(len(weights), np.nan), where=pairs > 0)


def _percentiles(samples: np.ndarray) -> np.ndarray:
    """2.5 and 97.5 percentiles along axis 0, ignoring NaN (resamples where it is undefined)."""
    with np.errstate(all="ignore"):
        return np.nanquantile(samples, [0.025, 0.975], axis=0)


def _interval(bounds: np.ndarray) -> list[float] | None:
    """[low, high] as plain floats, or None when no resample defined it."""
    low, high = (float(b) for b in bounds)
    return None if math.isnan(low) else [low, high]


def bootstrap_samples(
    y_true: np.ndarray, proba: np.ndarray, *, resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Each metric on each bootstrap resample of the test images: per-class precision, recall
    and F1 (B, K), the loss (B,) and, for two classes, the ROC AUC (B,)."""
    y_true, proba = check_proba(y_true, proba)
    n, num_classes = proba.shape
    y_pred = proba.argmax(axis=1)
    losses = -np.log(np.clip(proba[np.arange(n), y_true], _PROBA_EPSILON, 1.0))  # (N,)
    binary = num_classes == 2 and np.unique(y_true).size == 2
    chunks: dict[str, list[np.ndarray]] = {}
    for weights in resample_counts(n, resamples, seed):
        found = class_scores(weighted_confusion(weights, y_true, y_pred, num_classes))
        found["loss"] = weights @ losses / n
        if binary:
            found["roc_auc"] = weighted_auc(weights, y_true, proba[:, 1])
        for key, value in found.items():
            chunks.setdefault(key, []).append(value)
    return {key: np.concatenate(parts) for key, parts in chunks.items()}


def metric_intervals(
    y_true: np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    *,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """95 % intervals of classification_metrics' figures, as `<metric>_ci95: [low, high]` and
    as `<metric>_ci95_low` and `_high` scalars, then `per_class` figures with theirs.

    Proportions get Wilson score intervals: accuracy, and one class's precision and recall
    (per class, and the headline ones for two classes, where class index 1 is the positive
    class). Everything else (F1, macro averages, loss, ROC AUC) gets the percentile bootstrap
    over the test images. A figure that is undefined (no image predicted as a class, one class
    only for ROC AUC) gets no interval (None).
    """
    y_true, proba = check_proba(y_true, proba)
    num_classes = proba.shape[1]
    correct = int((proba.argmax(axis=1) == y_true).sum())
    samples = bootstrap_samples(y_true, proba, resamples=resamples, seed=seed)
    per_class = per_class_metrics(y_true, proba, class_names, samples)
    intervals: dict[str, Any] = {"accuracy_ci95": list(wilson_interval(correct, len(y_true)))}
    positive = per_class[str(class_names[1])] if num_classes == 2 else None
    for key in ("loss", *_PER_CLASS, "roc_auc"):
        if positive is not None and key in _PER_CLASS:
            bounds = positive[f"{key}_ci95"]
        elif key in _PER_CLASS:  # the macro average
            bounds = _interval(_percentiles(samples[key].mean(axis=1)))
        else:
            bounds = _interval(_percentiles(samples[key])) if key in samples else None
        if bounds is not None:
            intervals[f"{key}_ci95"] = bounds
    intervals.update(interval_scalars(intervals))
    intervals["per_class"] = per_class
    return intervals


def per_class_metrics(
    y_true: np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    samples: Mapping[str, np.ndarray],
) -> dict[str, dict[str, Any]]:
    """{class: {support, precision, recall, f1, <each>_ci95}} on the test images: Wilson
    intervals for precision (of the images predicted as the class) and recall (of the class's
    images), the percentile bootstrap's for F1."""
    num_classes = proba.shape[1]
    ones = np.ones((1, len(y_true)))
    confusion = weighted_confusion(ones, y_true, proba.argmax(axis=1), num_classes)[0]  # (K, K)
    scores = class_scores(confusion[None])
    f1_bounds = _percentiles(samples["f1"])  # (2, K)
    table: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(class_names):
        hits = int(confusion[index, index])
        actual, predicted = int(confusion[index].sum()), int(confusion[:, index].sum())
        table[str(name)] = {
            "support": actual,
            "precision": float(scores["precision"][0, index]),
            "precision_ci95": list(wilson_interval(hits, predicted)) if predicted else None,
            "recall": float(scores["recall"][0, index]),
            "recall_ci95": list(wilson_interval(hits, actual)) if actual else None,
            "f1": float(scores["f1"][0, index]),
            "f1_ci95": _interval(f1_bounds[:, index]),
        }
    return table


def interval_scalars(intervals: Mapping[str, Any]) -> dict[str, float]:
    """Each top-level `<metric>_ci95: [low, high]` also as `<metric>_ci95_low` and `_high`:
    `dvc metrics show` and `dvc exp show` leave lists out."""
    scalars: dict[str, float] = {}
    for key, value in intervals.items():
        if key.endswith("_ci95") and isinstance(value, list):
            scalars[f"{key}_low"], scalars[f"{key}_high"] = value
    return scalars


def answer_rows(
    sources: Sequence[str], y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per test image: {source, label, predicted, probability (of the predicted class),
    correct (0 or 1)}, in the order given."""
    y_true, proba = check_proba(y_true, proba)
    if len(sources) != len(y_true):
        raise ValueError(f"{len(sources)} sources for {len(y_true)} test images")
    y_pred = proba.argmax(axis=1)
    names = [str(name) for name in class_names]
    return [
        {
            "source": source,
            "label": names[actual],
            "predicted": names[predicted],
            "probability": round(float(proba[row, predicted]), 6),
            "correct": int(actual == predicted),
        }
        for row, (source, actual, predicted) in enumerate(
            zip(sources, y_true.tolist(), y_pred.tolist(), strict=True)
        )
    ]
