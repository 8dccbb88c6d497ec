"""Stage `evaluate@<model>`: test metrics and plots for one model, for DVC and its MLflow run."""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from imgpipe import evaluation
from imgpipe.classifier import Classifier
from imgpipe.params import MODEL_NAMES, ParamsError, load_params
from imgpipe.runtime import setup_logging, write_bytes_atomic, write_json_atomic
from imgpipe.tables import read_table

RUN_FILE = "mlflow_run.json"


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


def main(argv: list[str] | None = None) -> None:
    """Evaluate the model named on the command line on the test table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--tables", required=True, type=Path, help="data/tables/<view>")
    parser.add_argument("--model-dir", required=True, type=Path, help="models/<model>")
    parser.add_argument("--metrics", required=True, type=Path, help="metrics/<model>.json")
    parser.add_argument("--plots", required=True, type=Path, help="plots/<model>/")
    args = parser.parse_args(argv)
    log = setup_logging(f"evaluate@{args.model}")
    started = time.perf_counter()
    try:
        params = load_params()
    except ParamsError as error:
        raise SystemExit(f"[evaluate@{args.model}] {error}") from None

    from imgpipe import tracking  # deferred: importing mlflow is slow

    try:  # before any work: an unreachable server stops the stage now
        uri = tracking.open_store(params.tracking.uri, params.tracking.on_unreachable)
    except tracking.TrackingUnavailableError as error:
        raise SystemExit(f"[evaluate@{args.model}] {error}") from None

    test = read_table(args.tables / "test.parquet")
    classifier = Classifier.load(args.model_dir)
    if classifier.meta.class_names != test.class_names:
        raise SystemExit(
            f"[evaluate@{args.model}] the model knows classes {classifier.meta.class_names} but "
            f"the test table has {test.class_names}: run `dvc repro` to retrain"
        )
    proba = classifier.predict_proba(test.pixels, batch_size=params.evaluate.batch_size)
    predicted = proba.argmax(axis=1)
    names = test.class_names
    metrics = evaluation.classification_metrics(test.labels, proba, names)
    history = json.loads((args.model_dir / "history.json").read_text())
    for key in ("train_seconds", "train_images_per_second", "parameters"):
        metrics[key] = history[key]
    metrics["dataset"] = Path(params.data.raw).name

    plots = args.plots
    plot_files = {
        "confusion.csv": rows_csv(evaluation.confusion_rows(test.labels, predicted, names)),
        "confusion.png": evaluation.confusion_png(
            test.labels, predicted, names, f"{args.model}: test confusion matrix"
        ),
        "history.png": evaluation.history_png(history["history"], f"{args.model}: training"),
    }
    both_present = len(np.unique(test.labels)) == len(names)
    if len(names) == 2 and both_present:
        plot_files["roc.csv"] = rows_csv(evaluation.roc_rows(test.labels, proba))
        plot_files["roc.png"] = evaluation.roc_png(test.labels, proba, f"{args.model}: ROC")
    else:  # one curve for many classes: micro-average over one-vs-rest problems
        plot_files["roc.csv"] = rows_csv(evaluation.micro_roc_rows(test.labels, proba))
    chosen = grid_sample(test.labels, params.evaluate.grid_images, params.train.seed)
    plot_files["predictions.png"] = evaluation.prediction_grid_png(
        test.pixels[chosen],
        [names[i] for i in test.labels[chosen]],
        [names[i] for i in predicted[chosen]],
        [float(proba[i, predicted[i]]) for i in chosen],
        columns=4,
    )
    for name, data in plot_files.items():
        write_bytes_atomic(plots / name, data)
    write_json_atomic(args.metrics, metrics)

    run_id = json.loads((args.model_dir / RUN_FILE).read_text())["run_id"]
    run = tracking.Run.resume(run_id, uri)
    resumed = run is not None
    if run is None:
        log.warning(
            "MLflow run %s (from %s) is not in %s: logging the test results to a new run",
            run_id,
            args.model_dir / RUN_FILE,
            uri,
        )
        run = tracking.Run.start(
            uri=uri,
            experiment=params.tracking.experiment,
            model_name=args.model,
            dataset=metrics["dataset"],
            data_hash=tracking.files_digest([args.tables / "test.parquet"]),
            params={"model": args.model, args.model: params.model_section(args.model).model_dump()},
        )
    test_metrics = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    run.log_metrics(test_metrics)
    for name in plot_files:
        run.log_file(plots / name, "plots")
    run.log_file(args.metrics, "metrics")
    registered = "not registered (the run that holds the model is in another store)"
    if resumed:  # only the train stage's run holds the model
        version = run.register_model(
            registered_model_name(params.tracking.experiment, args.model),
            tags={**test_metrics, "dataset": metrics["dataset"], "n_test": len(test.labels)},
            description=(
                f"{args.model} on {metrics['dataset']}: test accuracy {metrics['accuracy']:.4f}, "
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
            args.metrics,
            plots,
            args.model,
        )
    log.info(
        "%s on %d test images: accuracy %.4f, loss %.4f, f1 %.4f",
        args.model,
        len(test.labels),
        metrics["accuracy"],
        metrics["loss"],
        metrics["f1"],
    )
    log.info(
        "read %s and %s; wrote %s and %d files to %s/; MLflow run %s %s; %.1f s",
        args.model_dir,
        args.tables / "test.parquet",
        args.metrics,
        len(plot_files),
        plots,
        run.run_id,
        registered,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
