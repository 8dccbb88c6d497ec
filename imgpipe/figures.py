"""The evaluate stage's PNG figures (matplotlib, no display needed): training curves, confusion
matrix, ROC curve and a grid of test predictions, each returned as PNG bytes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from io import BytesIO

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as skm

from imgpipe.metrics import check_binary, check_labels

_DPI = 110
_CORRECT_COLOR = "#1a7f37"
_WRONG_COLOR = "#cf222e"


def _png_bytes(fig: Figure) -> bytes:
    """The figure rendered as PNG bytes at the figures' common DPI."""
    FigureCanvasAgg(fig)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def history_png(history: Mapping[str, Sequence[float]], title: str) -> bytes:
    """Plot loss and accuracy per epoch (training and, when present, validation) side by side."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    fig.suptitle(title, fontsize=14)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        plotted = False
        for key, label, style in ((metric, "train", "-o"), (f"val_{metric}", "validation", "-s")):
            values = history.get(key)
            if values is None or len(values) == 0:
                continue
            epochs = np.arange(1, len(values) + 1)
            ax.plot(epochs, np.asarray(values, dtype=float), style, label=label, markersize=4)
            plotted = True
        ax.set_title(metric, fontsize=12)
        ax.set_xlabel("epoch", fontsize=11)
        ax.set_ylabel(metric, fontsize=11)
        ax.grid(True, alpha=0.3)
        if plotted:
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=10)
        else:
            ax.text(0.5, 0.5, f"no {metric} recorded", ha="center", va="center", fontsize=11)
    return _png_bytes(fig)


def confusion_png(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], title: str
) -> bytes:
    """Plot the confusion matrix as a heatmap annotated with counts (rows: actual)."""
    num_classes = len(class_names)
    y_true = check_labels(y_true, num_classes, "y_true")
    y_pred = check_labels(y_pred, num_classes, "y_pred")
    counts = skm.confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))  # (K, K)
    side = max(4.5, 1.0 + 0.8 * num_classes)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks, labels=[str(name) for name in class_names], rotation=45, ha="right")
    ax.set_yticks(ticks, labels=[str(name) for name in class_names])
    ax.set_xlabel("predicted", fontsize=11)
    ax.set_ylabel("actual", fontsize=11)
    ax.set_title(title, fontsize=13)
    # Dark cells get white text so every count stays legible.
    threshold = counts.max() / 2 if counts.size else 0
    for row in range(num_classes):
        for col in range(num_classes):
            value = counts[row, col]
            color = "white" if value > threshold else "black"
            ax.text(col, row, str(value), ha="center", va="center", color=color, fontsize=12)
    return _png_bytes(fig)


def roc_png(y_true: np.ndarray, proba: np.ndarray, title: str) -> bytes:
    """Plot the binary ROC curve on proba[:, 1] with its AUC and the chance diagonal."""
    y_true, proba = check_binary(y_true, proba)
    fpr, tpr, _ = skm.roc_curve(y_true, proba[:, 1], pos_label=1)
    auc = skm.auc(fpr, tpr)
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot(fpr, tpr, linewidth=2, label=f"ROC (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate", fontsize=11)
    ax.set_ylabel("true positive rate", fontsize=11)
    ax.set_title(title, fontsize=13)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=10)
    return _png_bytes(fig)


def prediction_grid_png(
    images: np.ndarray,
    true_labels: Sequence[str],
    pred_labels: Sequence[str],
    probabilities: Sequence[float],
    *,
    columns: int,
) -> bytes:
    """Plot images in a grid titled with predicted/true labels, green when right, red when wrong."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must have shape (N, H, W, C) with C in {{1, 3}}, got {images.shape}"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got dtype {images.dtype}")
    num_images = len(images)
    if num_images == 0:
        raise ValueError("no images to plot")
    if not len(true_labels) == len(pred_labels) == len(probabilities) == num_images:
        raise ValueError(
            f"{num_images} images but {len(true_labels)} true labels, "
            f"{len(pred_labels)} predicted labels and {len(probabilities)} probabilities"
        )
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    columns = min(columns, num_images)
    rows = math.ceil(num_images / columns)
    fig = Figure(figsize=(2.4 * columns, 2.7 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for index, ax in enumerate(axes):
        ax.set_axis_off()
        if index >= num_images:
            continue
        image = images[index]  # (H, W, C)
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image)
        predicted, actual = str(pred_labels[index]), str(true_labels[index])
        color = _CORRECT_COLOR if predicted == actual else _WRONG_COLOR
        ax.set_title(
            f"pred: {predicted} ({float(probabilities[index]):.2f})\ntrue: {actual}",
            color=color,
            fontsize=10,
        )
    return _png_bytes(fig)
