"""The evaluate stage: classification metrics, DVC plot rows and PNG figures (pure helpers), and
evaluate_model, which applies them to a trained model and its test table."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as skm

from imgpipe.classifier import Classifier
from imgpipe.model_folder import ModelFolder
from imgpipe.runtime import StageError, write_bytes_atomic, write_json_atomic
from imgpipe.tables import read_table

if TYPE_CHECKING:
    from imgpipe.params import Params

log = logging.getLogger("imgpipe.evaluation")

# Same clipping as Keras' categorical cross-entropy, so the reported test loss is comparable
# with the training history's val_loss.
_PROBA_EPSILON = 1e-7
_DPI = 110
_CORRECT_COLOR = "#1a7f37"
_WRONG_COLOR = "#cf222e"


def _check_labels(y: np.ndarray, num_classes: int, name: str) -> np.ndarray:
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


def _check_proba(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] < 2:
        raise ValueError(f"proba must have shape (N, K) with K >= 2, got {proba.shape}")
    y_true = _check_labels(y_true, proba.shape[1], "y_true")
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


def _check_binary(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, proba = _check_proba(y_true, proba)
    if proba.shape[1] != 2:
        raise ValueError(f"ROC needs a binary problem (K == 2), got K == {proba.shape[1]}")
    if np.unique(y_true).size < 2:
        raise ValueError("ROC is undefined when y_true holds only one class")
    return y_true, proba


def _png_bytes(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]
) -> dict[str, float]:
    """Return accuracy, cross-entropy loss, precision/recall/f1, binary ROC AUC and n_test."""
    y_true, proba = _check_proba(y_true, proba)
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
    y_true = _check_labels(y_true, len(class_names), "y_true")
    y_pred = _check_labels(y_pred, len(class_names), "y_pred")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} samples but y_pred has {len(y_pred)}")
    names = [str(name) for name in class_names]
    return [
        {"actual": names[actual], "predicted": names[predicted]}
        for actual, predicted in zip(y_true.tolist(), y_pred.tolist(), strict=True)
    ]


def roc_rows(y_true: np.ndarray, proba: np.ndarray) -> list[dict[str, float]]:
    """Return {"fpr", "tpr", "threshold"} rows of the binary ROC curve on proba[:, 1]."""
    y_true, proba = _check_binary(y_true, proba)
    fpr, tpr, thresholds = skm.roc_curve(y_true, proba[:, 1], pos_label=1)
    # sklearn's first threshold is +inf (or max + 1 in old versions), which is not valid JSON.
    thresholds = np.minimum(thresholds, 1.0)
    return [
        {"fpr": float(f), "tpr": float(t), "threshold": float(th)}
        for f, t, th in zip(fpr, tpr, thresholds, strict=True)
    ]


def micro_roc_rows(y_true: np.ndarray, proba: np.ndarray) -> list[dict[str, float]]:
    """ROC rows micro-averaged over one-vs-rest problems: one curve for any number of classes."""
    y_true, proba = _check_proba(y_true, proba)
    one_hot = np.eye(proba.shape[1], dtype=np.int8)[y_true]  # (N, K)
    fpr, tpr, thresholds = skm.roc_curve(one_hot.ravel(), proba.ravel())
    thresholds = np.minimum(thresholds, 1.0)
    return [
        {"fpr": float(f), "tpr": float(t), "threshold": float(th)}
        for f, t, th in zip(fpr, tpr, thresholds, strict=True)
    ]


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
    y_true = _check_labels(y_true, num_classes, "y_true")
    y_pred = _check_labels(y_pred, num_classes, "y_pred")
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
    y_true, proba = _check_binary(y_true, proba)
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


def rows_csv(rows: list[dict]) -> bytes:
    """A list of dicts as CSV bytes (header from the first row)."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue().encode()


def grid_sample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of up to `count` test images for the prediction grid, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(labels), size=min(count, len(labels)), replace=False))


def registered_model_name(experiment: str, model: str) -> str:
    """The MLflow registry name of a model: `<experiment>-<model>`, e.g. imgpipe-cnn."""
    return f"{experiment}-{model}"


def plot_files(
    model_name: str,
    labels: np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    history: Mapping[str, Sequence[float]],
    grid: tuple[np.ndarray, np.ndarray],
) -> dict[str, bytes]:
    """Every file of plots/<model>/ by name: confusion matrix, curves, ROC, prediction grid.

    grid is (indices of the test images to show, their uint8 pixels (G, H, W, C)).
    """
    predicted = proba.argmax(axis=1)
    files = {
        "confusion.csv": rows_csv(confusion_rows(labels, predicted, class_names)),
        "confusion.png": confusion_png(
            labels, predicted, class_names, f"{model_name}: test confusion matrix"
        ),
        "history.png": history_png(history, f"{model_name}: training"),
    }
    if len(class_names) == 2 and len(np.unique(labels)) == 2:
        files["roc.csv"] = rows_csv(roc_rows(labels, proba))
        files["roc.png"] = roc_png(labels, proba, f"{model_name}: ROC")
    else:  # one curve for many classes: micro-average over one-vs-rest problems
        files["roc.csv"] = rows_csv(micro_roc_rows(labels, proba))
    chosen, pixels = grid
    files["predictions.png"] = prediction_grid_png(
        pixels,
        [class_names[i] for i in labels[chosen]],
        [class_names[i] for i in predicted[chosen]],
        [float(proba[i, predicted[i]]) for i in chosen],
        columns=4,
    )
    return files


@dataclass(frozen=True)
class EvaluateOutcome:
    """What evaluate_model did, for the stage's summary."""

    metrics: dict[str, Any]
    n_test: int
    plot_names: list[str]
    run_id: str
    registered: str  # "registered as imgpipe-cnn version 3", or why not


def evaluate_model(
    model_name: str,
    params: Params,
    *,
    test_table: Path,
    model_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
) -> EvaluateOutcome:
    """Test metrics and plots of a trained model; completes its MLflow run and registers it."""
    from imgpipe import tracking  # deferred: importing mlflow takes seconds

    store = tracking.open_store(params.tracking)  # before any work: a server that is down stops
    test = read_table(test_table)
    classifier = Classifier.load(model_dir)
    names = test.class_names
    if classifier.meta.class_names != names:
        raise StageError(
            f"the model knows classes {classifier.meta.class_names} but the test table has "
            f"{names}: run `dvc repro` to retrain"
        )
    proba = classifier.predict_proba(test.pixels, batch_size=params.evaluate.batch_size)
    metrics = classification_metrics(test.labels, proba, names)
    folder = ModelFolder(model_dir)
    trained = folder.history()
    for key in ("train_seconds", "train_images_per_second", "parameters"):
        metrics[key] = trained[key]
    metrics["dataset"] = Path(params.data.raw).name
    chosen = grid_sample(test.labels, params.evaluate.grid_images, params.train.seed)
    files = plot_files(
        model_name, test.labels, proba, names, trained["history"], (chosen, test.pixels[chosen])
    )
    for name, data in files.items():
        write_bytes_atomic(plots_dir / name, data)
    write_json_atomic(metrics_path, metrics)

    run_id = folder.run_id()
    run = store.resume_run(run_id)
    resumed = run is not None
    if run is None:
        log.warning(
            "MLflow run %s (from %s) is not in %s: logging the test results to a new run",
            run_id,
            folder.run_file,
            store.uri,
        )
        run = store.start_run(
            model_name=model_name,
            dataset=metrics["dataset"],
            data_hash=tracking.files_digest([test_table]),
            params={"model": model_name, model_name: params.model_section(model_name).model_dump()},
        )
    test_metrics = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    run.log_metrics(test_metrics)
    for name in files:
        run.log_file(plots_dir / name, "plots")
    run.log_file(metrics_path, "metrics")
    registered = "not registered (the run that holds the model is in another store)"
    if resumed:  # only the train stage's run holds the model
        version = run.register_model(
            registered_model_name(params.tracking.experiment, model_name),
            tags={**test_metrics, "dataset": metrics["dataset"], "n_test": len(test.labels)},
            description=(
                f"{model_name} on {metrics['dataset']}: test accuracy {metrics['accuracy']:.4f}, "
                f"f1 {metrics['f1']:.4f}, loss {metrics['loss']:.4f} on {len(test.labels)} images"
            ),
        )
        if version is not None:
            registered = f"registered as {version.name} version {version.version}"
        else:
            registered = "not registered (the registry could not be reached: see above)"
    run.finish()
    if run.unlogged:
        log.warning(
            "MLflow run %s in %s is missing %d item(s) because logging failed (%s): %s. "
            "%s and %s/ are complete; rerun `dvc repro -f evaluate@%s` once the server is back.",
            run.run_id,
            run.uri,
            len(run.unlogged),
            run.failure,
            "; ".join(run.unlogged),
            metrics_path,
            plots_dir,
            model_name,
        )
    return EvaluateOutcome(metrics, len(test.labels), list(files), run.run_id, registered)
