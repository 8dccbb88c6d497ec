"""Stage `train@<model>`: fit one model on its view's tables; save it, its history and run id."""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

from imgpipe.classifier import KERAS_FILE, META_FILE, NUMPY_FILE, ModelMeta
from imgpipe.params import MODEL_NAMES, ParamsError, load_params
from imgpipe.runtime import atomic_directory, setup_logging, write_bytes_atomic, write_json_atomic
from imgpipe.tables import read_table

RUN_FILE = "mlflow_run.json"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"


def history_csv(history: dict[str, list[float]]) -> str:
    """Per-epoch history as CSV with an `epoch` column counted from 1 (for `dvc plots`)."""
    keys = list(history)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for epoch in range(len(history[keys[0]]) if keys else 0):
        writer.writerow([epoch + 1, *(f"{history[k][epoch]:.6f}" for k in keys)])
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    """Train the model named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--tables", required=True, type=Path, help="data/tables/<view>")
    parser.add_argument("--out", required=True, type=Path, help="output folder (models/<model>)")
    args = parser.parse_args(argv)
    log = setup_logging(f"train@{args.model}")
    started = time.perf_counter()
    try:
        params = load_params()
        section = params.model_section(args.model)
        view = params.view_of(args.model)
    except ParamsError as error:
        raise SystemExit(f"[train@{args.model}] {error}") from None
    view_name = params.models[args.model]

    from imgpipe import tracking  # deferred: importing mlflow is slow and needs no params

    train_path, val_path = args.tables / "train.parquet", args.tables / "val.parquet"
    train = read_table(train_path, with_sources=False)
    val = read_table(val_path, with_sources=False)
    if tuple(train.pixels.shape[1:]) != view.shape:
        raise SystemExit(
            f"[train@{args.model}] {train_path} holds {train.pixels.shape[1:]} images but view "
            f"{view_name} is {view.shape}: run `dvc repro tabulate` first"
        )
    num_classes = len(train.class_names)
    dataset = Path(params.data.raw).name
    log.info(
        "dataset %s: %d train and %d val images of %s %s, %d classes",
        dataset,
        len(train.labels),
        len(val.labels),
        view_name,
        "x".join(map(str, view.shape)),
        num_classes,
    )

    run = tracking.Run.start(
        uri=tracking.tracking_uri(params.tracking.uri),
        experiment=params.tracking.experiment,
        model_name=args.model,
        dataset=dataset,
        data_hash=tracking.files_digest([train_path, val_path]),
        params={
            "model": args.model,
            "data": params.data.model_dump(),
            "split": params.split.model_dump(),
            "view": {"name": view_name, **view.model_dump()},
            "tabulate": params.tabulate.model_dump(),
            "train": params.train.model_dump(),
            args.model: section.model_dump(),
            "n_train": len(train.labels),
            "n_val": len(val.labels),
            "classes": ",".join(train.class_names),
        },
    )
    try:
        from imgpipe import training

        inputs = (train.pixels, train.labels, val.pixels, val.labels)
        options = {
            "num_classes": num_classes,
            "seed": params.train.seed,
            "on_epoch_end": run.log_epoch,
        }
        if args.model == "numpy_mlp":
            result = training.train_numpy_mlp(section, *inputs, **options)
        else:
            result = training.train_keras(args.model, section, *inputs, **options)
        meta = ModelMeta(
            model=args.model,
            kind="numpy" if args.model == "numpy_mlp" else "keras",
            view=view_name,
            height=view.height,
            width=view.width,
            color=view.color,
            class_names=list(train.class_names),
        )
        summary = {
            "train_seconds": round(result.seconds, 2),
            "train_images_per_second": round(result.images_per_second, 1),
            "parameters": result.parameters,
        }
        with atomic_directory(args.out) as staging:
            model_file = staging / (NUMPY_FILE if meta.kind == "numpy" else KERAS_FILE)
            result.model.save(model_file)
            write_json_atomic(staging / META_FILE, meta.to_json())
            write_json_atomic(staging / HISTORY_JSON, {**summary, "history": result.history})
            write_bytes_atomic(staging / HISTORY_CSV, history_csv(result.history).encode())
            write_json_atomic(staging / RUN_FILE, {"run_id": run.run_id})
        run.log_metrics(summary)
        run.log_file(args.out / HISTORY_CSV)
        run.log_model(args.out / model_file.name, args.out / META_FILE)
    except BaseException:
        run.finish("FAILED")
        raise
    final = {k: v[-1] for k, v in result.history.items()}
    log.info(
        "%d epochs in %.1f s (%.0f images/s), %s parameters; last epoch: %s; saved to %s",
        len(result.history.get("loss", [])),
        result.seconds,
        result.images_per_second,
        f"{result.parameters:,}",
        ", ".join(f"{k} {v:.4f}" for k, v in final.items()),
        args.out,
    )
    log.info(
        "read %s and %s; wrote %s/ (%s, %s, %s, %s); MLflow run %s; %.1f s",
        train_path,
        val_path,
        args.out,
        model_file.name,
        META_FILE,
        HISTORY_CSV,
        RUN_FILE,
        run.run_id,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
