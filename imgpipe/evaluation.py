"""The evaluate stage's core: evaluate_model applies a trained model to its test table, writes the
metrics with their 95 % intervals and the plots (from imgpipe.metrics and imgpipe.figures), the
per-image answers and the model card (imgpipe.cards), and completes the model's MLflow run with
them, registering the model with the card's summary as its description."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgpipe.cards import SPLITS, CardData, ModelCard, description
from imgpipe.classifier import Classifier
from imgpipe.figures import confusion_png, history_png, prediction_grid_png, roc_png
from imgpipe.metrics import (
    answer_rows,
    classification_metrics,
    confusion_rows,
    metric_intervals,
    micro_roc_rows,
    roc_rows,
    weighted_confusion,
)
from imgpipe.model_folder import ModelFolder
from imgpipe.runtime import StageError, write_bytes_atomic, write_json_atomic
from imgpipe.tables import label_counts, read_table

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


@dataclass(frozen=True)
class EvaluateOutputs:
    """Where evaluate writes (paths from dvc.yaml, through the stage's command line)."""

    metrics: Path  # metrics/<model>.json
    plots: Path  # plots/<model>/
    answers: Path  # answers/<model>.csv
    card: Path  # cards/<model>.md


def evaluate_model(
    model_name: str,
    params: Params,
    *,
    test_table: Path,
    model_dir: Path,
    outputs: EvaluateOutputs,
) -> EvaluateOutcome:
    """Test metrics with 95 % intervals, plots, per-image answers and the model card of a
    trained model; completes its MLflow run and registers it, the card's summary as the
    version's description."""
    from imgpipe.tracking.connection import open_store  # deferred: importing mlflow takes seconds

    store = open_store(params.tracking)  # before any work: a server that is down stops
    test = read_table(test_table, with_sources=True)
    names = test.class_names
    classifier = _trained_classifier(model_dir, names)
    proba = classifier.predict_proba(test.pixels, batch_size=params.evaluate.batch_size)
    folder = ModelFolder(model_dir)
    trained = folder.history()
    metrics = _test_metrics(params, test.labels, proba, names, trained)
    chosen = grid_sample(test.labels, params.evaluate.grid_images, params.train.seed)
    files = plot_files(
        model_name, test.labels, proba, names, trained["history"], (chosen, test.pixels[chosen])
    )
    for name, data in files.items():
        write_bytes_atomic(outputs.plots / name, data)
    write_json_atomic(outputs.metrics, metrics)
    # sources as paths under data/split: the table holds them under its own split's folder
    sources = [f"{test_table.stem}/{source}" for source in test.sources]
    write_bytes_atomic(outputs.answers, rows_csv(answer_rows(sources, test.labels, proba, names)))

    run, resumed = _results_run(store, folder, model_name, params, metrics, test_table)
    run.log_table(test_table, name=f"{params.models[model_name]}/test", context="test")
    confusion = weighted_confusion(
        np.ones((1, len(test.labels))), test.labels, proba.argmax(1), len(names)
    )
    card = _model_card(model_name, params, folder, test_table, metrics, confusion[0], run.run_id)
    write_bytes_atomic(outputs.card, card.markdown().encode())
    test_metrics = _log_results(run, outputs, list(files), metrics)
    registered = "not registered (the run that holds the model is in another store)"
    if resumed:  # only the train stage's run holds the model
        registry_name = registered_model_name(params.tracking.experiment, model_name)
        registered = _register(run, registry_name, card, test_metrics)
    run.finish()
    run.warn_unlogged(
        log,
        ": %s. %s, %s/, %s and %s are complete; rerun `dvc repro -f evaluate@%s` once the "
        "server is back.",
        outputs.metrics,
        outputs.plots,
        outputs.answers,
        outputs.card,
        model_name,
    )
    return EvaluateOutcome(metrics, len(test.labels), list(files), run.run_id, registered)


def _test_metrics(
    params: Params,
    labels: np.ndarray,
    proba: np.ndarray,
    class_names: list[str],
    trained: Mapping[str, Any],
) -> dict[str, Any]:
    """metrics/<model>.json: the test figures, the training's summary, the data set's name,
    then the figures' 95 % intervals and the per-class figures."""
    metrics: dict[str, Any] = classification_metrics(labels, proba, class_names)
    for key in ("train_seconds", "train_images_per_second", "parameters"):
        metrics[key] = trained[key]
    metrics["dataset"] = Path(params.data.raw).name
    intervals = metric_intervals(
        labels, proba, class_names, resamples=params.evaluate.bootstrap, seed=params.train.seed
    )
    return {**metrics, **intervals}


def mlflow_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """The run's test metrics: (the headline ones, `test_<metric>` with their interval bounds,
    which also tag the registered version; the per-class ones, `test_class_<class>_<metric>`)."""
    headline = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    per_class: dict[str, float] = {}
    for name, row in metrics["per_class"].items():
        safe = re.sub(r"[^\w\-. ]", "_", name)  # MLflow's allowed characters in a metric name
        for key, value in row.items():
            if isinstance(value, list):
                per_class[f"test_class_{safe}_{key}_low"] = value[0]
                per_class[f"test_class_{safe}_{key}_high"] = value[1]
            elif key in ("precision", "recall", "f1"):  # an undefined interval is None
                per_class[f"test_class_{safe}_{key}"] = value
    return headline, per_class


def _log_results(
    run: Run, outputs: EvaluateOutputs, plot_names: list[str], metrics: Mapping[str, Any]
) -> dict[str, float]:
    """Log the test metrics and every output file into the run; return the headline metrics."""
    headline, per_class = mlflow_metrics(metrics)
    run.log_metrics({**headline, **per_class})
    for name in plot_names:
        run.log_file(outputs.plots / name, "plots")
    run.log_file(outputs.metrics, "metrics")
    run.log_text_file(outputs.answers, "evaluation/answers.csv")
    run.log_text_file(outputs.card, "evaluation/card.md")
    return headline


def _model_card(
    model_name: str,
    params: Params,
    folder: ModelFolder,
    test_table: Path,
    metrics: dict[str, Any],
    confusion: np.ndarray,
    run_id: str,
) -> ModelCard:
    """The model card: the data (from the tables beside test_table), the params, the test
    figures and confusion matrix (K, K), the training's summary and machine."""
    from imgpipe.tracking.runs import files_digest

    meta = folder.meta()
    tables = {split: test_table.with_name(f"{split}.parquet") for split in SPLITS}
    data = CardData(
        source=str(params.data.raw),
        view=meta.view,
        height=meta.height,
        width=meta.width,
        color=meta.color,
        class_names=list(meta.class_names),
        counts={split: label_counts(path) for split, path in tables.items()},
        data_hash=files_digest([tables["train"], tables["val"]]),  # as train's data_hash tag
        test_hash=files_digest([test_table]),
    )
    return ModelCard(
        model=model_name,
        run_id=run_id,
        data=data,
        params={
            "data": params.data.model_dump(),
            "split": params.split.model_dump(),
            "train": params.train.model_dump(),
            model_name: params.model_section(model_name).model_dump(),
        },
        metrics=metrics,
        confusion=confusion.astype(int).tolist(),
        training={k: v for k, v in folder.history().items() if k != "history"},
        resamples=params.evaluate.bootstrap,
        seed=params.train.seed,
    )


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
        store.where,
    )
    run = store.start_run(
        model_name=model_name,
        dataset=metrics["dataset"],
        data_hash=files_digest([test_table]),
        params={"model": model_name, model_name: params.model_section(model_name).model_dump()},
    )
    return run, False


def _register(run: Run, name: str, card: ModelCard, test_metrics: Mapping[str, float]) -> str:
    """Register the run's model as a version of `name`, tagged with its test results and
    described by the card's summary; say how that went, for the stage's summary."""
    version = run.register_model(
        name,
        tags={**test_metrics, "dataset": card.metrics["dataset"], "n_test": card.metrics["n_test"]},
        description=description(card.summary()),
    )
    if version is None:
        return "not registered (the registry could not be reached: see above)"
    return f"registered as {version.name} version {version.version}"
