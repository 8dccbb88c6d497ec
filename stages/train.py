"""Stage `train@<model>`: fit one model on its view's tables; save it, its history and run id."""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

from imgpipe.checkpoints import TrainingCheckpoint, fingerprint
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
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="per-epoch checkpoint folder (checkpoints/<model>), kept outside the DVC output so "
        "that an interrupted run resumes; removed once the model is saved",
    )
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

    try:  # before any work: an unreachable server stops the stage now, not after training
        uri = tracking.open_store(params.tracking.uri, params.tracking.on_unreachable)
    except tracking.TrackingUnavailableError as error:
        raise SystemExit(f"[train@{args.model}] {error}") from None

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

    data_hash = tracking.files_digest([train_path, val_path])
    checkpoint = None
    if args.checkpoint is not None and args.model != "numpy_mlp":  # NumPy MLP: no resume yet
        checkpoint = TrainingCheckpoint(
            args.checkpoint,
            fingerprint(
                {
                    "model": args.model,
                    "section": section.model_dump(),
                    "view": view.model_dump(),
                    "train": params.train.model_dump(),
                    "data_hash": data_hash,
                    "classes": train.class_names,
                }
            ),
        )
    resumed_run_id = (checkpoint.saved_extra() or {}).get("run_id") if checkpoint else None
    run = tracking.Run.resume(resumed_run_id, uri) if resumed_run_id else None
    if run is not None:
        run.reopen()
        log.info("continuing MLflow run %s of the interrupted training", run.run_id)
    else:
        run = tracking.Run.start(
            uri=uri,
            experiment=params.tracking.experiment,
            model_name=args.model,
            dataset=dataset,
            data_hash=data_hash,
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
        if checkpoint is not None:
            checkpoint.extra = {"run_id": run.run_id}
        if args.model == "numpy_mlp":
            result = training.train_numpy_mlp(section, *inputs, **options)
        else:
            result = training.train_keras(
                args.model, section, *inputs, **options, checkpoint=checkpoint
            )
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
            "resumed_from_epoch": result.resumed_from_epoch,
        }
        with atomic_directory(args.out) as staging:
            model_file = staging / (NUMPY_FILE if meta.kind == "numpy" else KERAS_FILE)
            result.model.save(model_file)
            write_json_atomic(staging / META_FILE, meta.to_json())
            write_json_atomic(staging / HISTORY_JSON, {**summary, "history": result.history})
            write_bytes_atomic(staging / HISTORY_CSV, history_csv(result.history).encode())
            write_json_atomic(staging / RUN_FILE, run.report())
        if checkpoint is not None:
            checkpoint.clear()  # the model is saved: a rerun must train afresh, not resume
        run.log_metrics(summary)
        run.log_file(args.out / HISTORY_CSV)
        run.log_model(args.out / model_file.name, args.out / META_FILE)
    except BaseException:
        run.finish("FAILED")
        raise
    if run.unlogged:  # the model is complete; say exactly what MLflow is missing
        write_json_atomic(args.out / RUN_FILE, run.report())
        log.warning(
            "MLflow run %s in %s is missing %d item(s) because logging failed (%s); the model "
            "and its files are complete. Missing: %s. They are listed in %s; rerun "
            "`dvc repro -f train@%s` once the server is back to log everything.",
            run.run_id,
            run.uri,
            len(run.unlogged),
            run.failure,
            "; ".join(run.unlogged),
            args.out / RUN_FILE,
            args.model,
        )
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
