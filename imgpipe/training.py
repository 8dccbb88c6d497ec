"""The train stage's core: read a view's tables, train one model type from the registry, write
models/<model>/ whole, and log the run to MLflow."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgpipe.checkpoints import TrainingCheckpoint, code_digest, fingerprint
from imgpipe.model_folder import ModelFolder, ModelMeta
from imgpipe.precision import machine
from imgpipe.registry import EpochCallback, TrainingData, TrainResult, model_type
from imgpipe.runtime import StageError
from imgpipe.tables import TableStream, read_table, table_info

if TYPE_CHECKING:
    from imgpipe.params import Params, TrainParams, ViewParams
    from imgpipe.registry import ModelType
    from imgpipe.tracking.runs import Run, Store

log = logging.getLogger("imgpipe.training")
MB = 10**6  # train.stream_over_mb's unit


@dataclass(frozen=True)
class TrainOutcome:
    """What train_model did, for the stage's summary."""

    result: TrainResult
    folder: ModelFolder
    weights_file: str
    run_id: str
    inputs: tuple[Path, Path]  # the train and val tables read


def run_params(model_name: str, params: Params, n_train: int, n_val: int) -> dict[str, Any]:
    """Every value that shapes a trained model, as logged to MLflow (and fingerprinted for
    resuming): the model's own section, its view, and how its data was chosen and split.
    (`tabulate:` only says how fast the tables are made: they are the same for any value.)"""
    view_name = params.models[model_name]
    return {
        "model": model_name,
        "data": params.data.model_dump(),
        "split": params.split.model_dump(),
        "view": {"name": view_name, **params.views[view_name].model_dump()},
        "train": params.train.model_dump(),
        model_name: params.model_section(model_name).model_dump(),
        "n_train": n_train,
        "n_val": n_val,
    }


def pixel_megabytes(path: Path) -> float:
    """MB (10^6 bytes) of a table's pixels once read, from its footer: no pixels are read."""
    shape, _, _, rows = table_info(path)
    return rows * math.prod(shape) / MB


def _megabytes(value: float) -> str:
    """2,400 or 0.077: whole MB, or two significant digits below 10."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def training_data(
    train_path: Path, val_path: Path, *, streamed: dict[str, bool], shuffle_rows: int
) -> TrainingData:
    """The train and val tables as arrays, or as TableStreams where `streamed` says so."""
    arrays, streams = {}, {}
    for name, path in (("train", train_path), ("val", val_path)):
        if streamed[name]:
            streams[name] = TableStream(path, shuffle_rows=shuffle_rows)
            pixels = np.empty((0, *streams[name].shape), dtype=np.uint8)  # (0, H, W, C)
            arrays[name] = (pixels, np.empty(0, dtype=np.int64))
        else:
            table = read_table(path, with_sources=False)
            arrays[name] = (table.pixels, table.labels)
    _, class_names, _, _ = table_info(train_path)
    return TrainingData(
        *arrays["train"],
        *arrays["val"],
        num_classes=len(class_names),
        train_stream=streams.get("train"),
        val_stream=streams.get("val"),
    )


def _epoch_reporter(run: Run, *, epochs: int) -> EpochCallback:
    """An on_epoch_end that logs `epoch 3/20: loss ..., ... (4.1 s)` and the epoch to MLflow."""
    started = [time.perf_counter()]

    def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
        log.info(
            "epoch %d/%d: %s (%.1f s)",
            epoch + 1,
            epochs,
            ", ".join(f"{key} {value:.4f}" for key, value in logs.items()),
            time.perf_counter() - started[0],
        )
        started[0] = time.perf_counter()
        run.log_epoch(epoch, logs)

    return on_epoch_end


def train_model(
    model_name: str,
    params: Params,
    *,
    tables_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path | None,
) -> TrainOutcome:
    """Train `model_name` on tables_dir/{train,val}.parquet and write out_dir (models/<model>).

    With checkpoint_dir, a model type that trains epoch by epoch saves every epoch there, and an
    interrupted run resumes from it (in the same MLflow run). A table whose pixels exceed
    train.stream_over_mb is streamed by row group instead of read whole (decided from its
    footer). What training starts from (ModelType.starting_point) is checked first, then the
    MLflow store and the tables' footers: missing starting weights, an unreachable server, a
    wrong view or a table too big for a model type that cannot stream it stop training before
    any pixels are read."""
    from imgpipe.tracking.connection import open_store  # deferred: importing mlflow takes seconds

    entry = model_type(model_name)
    section = params.model_section(model_name)
    view = params.view_of(model_name)  # a model not under `models:` stops here, with the list
    view_name = params.models[model_name]
    start = entry.starting_point(section)  # weights that cannot be had stop it here, first
    store = open_store(params.tracking)
    paths = (tables_dir / "train.parquet", tables_dir / "val.parquet")  # train, val
    class_names = _class_names(paths[0], view_name, view)
    streamed = _streamed_tables(model_name, entry, params.train, *paths)
    data = training_data(*paths, streamed=streamed, shuffle_rows=params.train.shuffle_rows)
    dataset = Path(params.data.raw).name
    _log_dataset(dataset, data, view_name, view)
    logged_params = {
        **run_params(model_name, params, data.train_size, data.val_size),
        "classes": ",".join(class_names),
        **({"start": start} if start else {}),  # start.weights_sha256 (also fingerprinted)
    }
    resumable_dir = checkpoint_dir if entry.resumable else None
    run, checkpoint = _open_run(store, model_name, dataset, paths, logged_params, resumable_dir)
    for path, context in zip(paths, ("training", "validation"), strict=True):
        run.log_table(path, name=f"{view_name}/{path.stem}", context=context)

    folder = ModelFolder(out_dir)
    try:
        with run.system_metrics():  # CPU and memory while it trains: the run's system/* metrics
            result = entry.train(
                section,
                data,
                seed=params.train.seed,
                on_epoch_end=_epoch_reporter(run, epochs=entry.planned_epochs(section)),
                checkpoint=checkpoint,
                devices=params.train.devices,
            )
        meta = _model_meta(model_name, view_name, view, class_names, start)
        summary = _save_model(folder, meta, result, run, checkpoint)
        _log_trained_model(run, folder, meta, result, summary, streamed)
    except BaseException:
        run.finish("FAILED")
        raise
    _report_unlogged(run, folder, model_name)
    return TrainOutcome(result, folder, entry.weights_file, run.run_id, paths)


def _class_names(train_path: Path, view_name: str, view: ViewParams) -> list[str]:
    """The train table's classes, from its footer (no pixels read), once its images are
    checked to have the view's shape."""
    shape, class_names, _, _ = table_info(train_path)
    if tuple(shape) != view.shape:
        raise StageError(
            f"{train_path} holds {tuple(shape)} images but view {view_name} is "
            f"{view.shape}: run `dvc repro tabulate` first"
        )
    return class_names


def _streamed_tables(
    model_name: str, entry: ModelType, train: TrainParams, train_path: Path, val_path: Path
) -> dict[str, bool]:
    """Which tables ("train", "val") hold more pixels than train.stream_over_mb and are streamed,
    from their footers; a model type that cannot stream stops here, saying what to change."""
    bound = train.stream_over_mb
    sizes = {"train": pixel_megabytes(train_path), "val": pixel_megabytes(val_path)}
    streamed = {name: megabytes > bound for name, megabytes in sizes.items()}
    if any(streamed.values()) and not entry.streams:
        over = max(sizes.values())
        raise StageError(
            f"{model_name} cannot stream a table (it fits the whole training table at once), "
            f"and the {'train' if streamed['train'] else 'val'} table holds {_megabytes(over)} "
            f"MB of pixels > train.stream_over_mb {bound:,}: raise train.stream_over_mb to at "
            f"least {math.ceil(over):,} in params.yaml (the tables are then read whole, and "
            f"training needs about 5 times that much memory), or remove {model_name} from "
            "`models:`"
        )
    for name, megabytes in sizes.items():
        if streamed[name]:
            log.info(
                "%s table %s MB of pixels > train.stream_over_mb %s: streaming it by row group%s",
                name,
                _megabytes(megabytes),
                f"{bound:,}",
                f" through a {train.shuffle_rows:,}-row shuffle buffer"
                if name == "train"
                else ", in file order",
            )
    return streamed


def _log_dataset(dataset: str, data: TrainingData, view_name: str, view: ViewParams) -> None:
    """`dataset demo: 1200 train and 300 val images of gray8 8x8x1, 10 classes`."""
    log.info(
        "dataset %s: %d train and %d val images of %s %s, %d classes",
        dataset,
        data.train_size,
        data.val_size,
        view_name,
        "x".join(map(str, view.shape)),
        data.num_classes,
    )


def _open_run(
    store: Store,
    model_name: str,
    dataset: str,
    paths: tuple[Path, Path],
    logged_params: dict[str, Any],
    checkpoint_dir: Path | None,
) -> tuple[Run, TrainingCheckpoint | None]:
    """The MLflow run, and the checkpoint (with checkpoint_dir) that training saves every epoch.

    A checkpoint left by an interrupted training of the same params, data and code continues its
    run, reopened; else a new run starts. The checkpoint records the run's id, for a resumed
    training to continue it.
    """
    from imgpipe.tracking.runs import files_digest  # deferred: importing mlflow takes seconds

    data_hash = files_digest(list(paths))
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = TrainingCheckpoint(
            checkpoint_dir,
            fingerprint({**logged_params, "data_hash": data_hash}),
            code=code_digest(model_name),  # a checkpoint of other code is not resumed
        )
    resumed_run_id = (checkpoint.saved_extra() or {}).get("run_id") if checkpoint else None
    run = store.resume_run(resumed_run_id) if resumed_run_id else None
    if run is not None:
        run.reopen()
        log.info("continuing MLflow run %s of the interrupted training", run.run_id)
    else:
        run = store.start_run(
            model_name=model_name, dataset=dataset, data_hash=data_hash, params=logged_params
        )
    if checkpoint is not None:
        checkpoint.extra = {"run_id": run.run_id}
    return run, checkpoint


def _model_meta(
    model_name: str,
    view_name: str,
    view: ViewParams,
    class_names: list[str],
    start: dict[str, str],
) -> ModelMeta:
    """meta.json of the trained model: its type, its input view, its classes and what its
    training started from (ModelType.starting_point)."""
    return ModelMeta(
        model=model_name,
        view=view_name,
        height=view.height,
        width=view.width,
        color=view.color,
        class_names=list(class_names),
        start=dict(start),
    )


def _save_model(
    folder: ModelFolder,
    meta: ModelMeta,
    result: TrainResult,
    run: Run,
    checkpoint: TrainingCheckpoint | None,
) -> dict[str, Any]:
    """Write models/<model>/ whole, then drop the checkpoint; return the training summary
    (time, speed, size) that history.json holds and the run logs."""
    summary = {
        "train_seconds": round(result.seconds, 2),
        "train_images_per_second": round(result.images_per_second, 1),
        "parameters": result.parameters,
        "resumed_from_epoch": result.resumed_from_epoch,
    }
    folder.write(
        meta,
        result.model,
        summary={**summary, "choices": result.choices, "machine": machine()},
        history=result.history,
        run_report=run.report(),
    )
    if checkpoint is not None:
        checkpoint.clear()  # the model is saved: a rerun must train afresh, not resume
    return summary


def _log_trained_model(
    run: Run,
    folder: ModelFolder,
    meta: ModelMeta,
    result: TrainResult,
    summary: dict[str, Any],
    streamed: dict[str, bool],
) -> None:
    """Log the training's summary, its choices, history.csv and the model (as a pyfunc)."""
    run.log_metrics(summary)
    # what the model type decided (e.g. the precision `auto` chose): text as params
    # (`chosen.precision`), timings as metrics; and which tables were streamed
    chosen = {k: v for k, v in result.choices.items() if isinstance(v, str)}
    chosen["streamed"] = ", ".join(name for name, on in streamed.items() if on) or "none"
    run.log_params({"chosen": chosen})
    run.log_metrics({k: v for k, v in result.choices.items() if not isinstance(v, str)})
    run.log_file(folder.history_csv)
    run.log_model(folder.weights_path(meta), folder.meta_path)


def _report_unlogged(run: Run, folder: ModelFolder, model_name: str) -> None:
    """The model is complete: when MLflow lacks part of its run, list exactly what in
    mlflow_run.json, and warn."""
    if run.unlogged:
        folder.write_run_report(run.report())
    run.warn_unlogged(
        log,
        "; the model and its files are complete. Missing: %s. They are listed in %s; rerun "
        "`dvc repro -f train@%s` once the server is back to log everything.",
        folder.run_file,
        model_name,
    )
