"""The evaluate stage's core: evaluate_model applies a trained model to its test table, writes the
metrics and plots (from imgpipe.metrics and imgpipe.figures), and completes the model's MLflow
run with them, registering the model."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgpipe.classifier import Classifier
from imgpipe.figures import confusion_png, history_png, prediction_grid_png, roc_png
from imgpipe.metrics import classification_metrics, confusion_rows, micro_roc_rows, roc_rows
from imgpipe.model_folder import ModelFolder
from imgpipe.runtime import StageError, write_bytes_atomic, write_json_atomic
from imgpipe.tables import read_table

if TYPE_CHECKING:
    from imgpipe.params import Params
    from imgpipe.tracking.runs import Run, Store

log = logging.getLogger("imgpipe.evaluation")


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
    from imgpipe.tracking.connection import open_store  # deferred: importing mlflow takes seconds

    store = open_store(params.tracking)  # before any work: a server that is down stops
    test = read_table(test_table)
    names = test.class_names
    classifier = _trained_classifier(model_dir, names)
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

    run, resumed = _results_run(store, folder, model_name, params, metrics, test_table)
    test_metrics = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    run.log_metrics(test_metrics)
    for name in files:
        run.log_file(plots_dir / name, "plots")
    run.log_file(metrics_path, "metrics")
    registered = "not registered (the run that holds the model is in another store)"
    if resumed:  # only the train stage's run holds the model
        registry_name = registered_model_name(params.tracking.experiment, model_name)
        registered = _register(
            run, registry_name, model_name, metrics, test_metrics, len(test.labels)
        )
    run.finish()
    run.warn_unlogged(
        log,
        ": %s. %s and %s/ are complete; rerun `dvc repro -f evaluate@%s` once the server is back.",
        metrics_path,
        plots_dir,
        model_name,
    )
    return EvaluateOutcome(metrics, len(test.labels), list(files), run.run_id, registered)


def _trained_classifier(model_dir: Path, class_names: list[str]) -> Classifier:
    """The trained model, refused when it knows other classes than the test table holds."""
    classifier = Classifier.load(model_dir)
    if classifier.meta.class_names != class_names:
        raise StageError(
            f"the model knows classes {classifier.meta.class_names} but the test table has "
            f"{class_names}: run `dvc repro` to retrain"
        )
    return classifier


def _results_run(
    store: Store,
    folder: ModelFolder,
    model_name: str,
    params: Params,
    metrics: Mapping[str, Any],
    test_table: Path,
) -> tuple[Run, bool]:
    """The train stage's run of the model, resumed (True); or, when this store does not have
    it, a new run for the test results (False)."""
    from imgpipe.tracking.runs import files_digest

    run_id = folder.run_id()
    run = store.resume_run(run_id)
    if run is not None:
        return run, True
    log.warning(
        "MLflow run %s (from %s) is not in %s: logging the test results to a new run",
        run_id,
        folder.run_file,
        store.uri,
    )
    run = store.start_run(
        model_name=model_name,
        dataset=metrics["dataset"],
        data_hash=files_digest([test_table]),
        params={"model": model_name, model_name: params.model_section(model_name).model_dump()},
    )
    return run, False


def _register(
    run: Run,
    name: str,
    model_name: str,
    metrics: Mapping[str, Any],
    test_metrics: Mapping[str, float],
    n_test: int,
) -> str:
    """Register the run's model as a version of `name`, tagged with its test results; say how
    that went, for the stage's summary."""
    version = run.register_model(
        name,
        tags={**test_metrics, "dataset": metrics["dataset"], "n_test": n_test},
        description=(
            f"{model_name} on {metrics['dataset']}: test accuracy {metrics['accuracy']:.4f}, "
            f"f1 {metrics['f1']:.4f}, loss {metrics['loss']:.4f} on {n_test} images"
        ),
    )
    if version is None:
        return "not registered (the registry could not be reached: see above)"
    return f"registered as {version.name} version {version.version}"
