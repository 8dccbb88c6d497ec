"""The train stage's core: read a view's tables, train one model type from the registry, write
models/<model>/ whole, and log the run to MLflow."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgpipe.checkpoints import TrainingCheckpoint, fingerprint
from imgpipe.model_folder import ModelFolder, ModelMeta
from imgpipe.registry import EpochCallback, TrainingData, TrainResult, model_type
from imgpipe.runtime import StageError
from imgpipe.tables import read_table

if TYPE_CHECKING:
    from imgpipe.params import Params
    from imgpipe.tracking import Run

log = logging.getLogger("imgpipe.training")


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
    interrupted run resumes from it (in the same MLflow run). The MLflow store is checked before
    anything else: an unreachable server stops training before it starts.
    """
    from imgpipe import tracking  # deferred: importing mlflow takes seconds

    entry = model_type(model_name)
    section = params.model_section(model_name)
    view = params.view_of(model_name)  # a model not under `models:` stops here, with the list
    view_name = params.models[model_name]
    store = tracking.open_store(params.tracking)

    train_path, val_path = tables_dir / "train.parquet", tables_dir / "val.parquet"
    train = read_table(train_path, with_sources=False)
    val = read_table(val_path, with_sources=False)
    if tuple(train.pixels.shape[1:]) != view.shape:
        raise StageError(
            f"{train_path} holds {train.pixels.shape[1:]} images but view {view_name} is "
            f"{view.shape}: run `dvc repro tabulate` first"
        )
    data = TrainingData(
        train.pixels, train.labels, val.pixels, val.labels, num_classes=len(train.class_names)
    )
    dataset = Path(params.data.raw).name
    log.info(
        "dataset %s: %d train and %d val images of %s %s, %d classes",
        dataset,
        len(train.labels),
        len(val.labels),
        view_name,
        "x".join(map(str, view.shape)),
        data.num_classes,
    )

    data_hash = tracking.files_digest([train_path, val_path])
    logged_params = {
        **run_params(model_name, params, len(train.labels), len(val.labels)),
        "classes": ",".join(train.class_names),
    }
    checkpoint = None
    if checkpoint_dir is not None and entry.resumable:
        checkpoint = TrainingCheckpoint(
            checkpoint_dir, fingerprint({**logged_params, "data_hash": data_hash})
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

    folder = ModelFolder(out_dir)
    try:
        result = entry.train(
            section,
            data,
            seed=params.train.seed,
            on_epoch_end=_epoch_reporter(run, epochs=entry.planned_epochs(section)),
            checkpoint=checkpoint,
        )
        meta = ModelMeta(
            model=model_name,
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
        folder.write(
            meta,
            result.model,
            summary={**summary, "choices": result.choices},
            history=result.history,
            run_report=run.report(),
        )
        if checkpoint is not None:
            checkpoint.clear()  # the model is saved: a rerun must train afresh, not resume
        run.log_metrics(summary)
        # what the model type decided (e.g. the precision `auto` chose): text as params
        # (`chosen.precision`), timings as metrics
        run.log_params({"chosen": {k: v for k, v in result.choices.items() if isinstance(v, str)}})
        run.log_metrics({k: v for k, v in result.choices.items() if not isinstance(v, str)})
        run.log_file(folder.history_csv)
        run.log_model(folder.weights_path(meta), folder.meta_path)
    except BaseException:
        run.finish("FAILED")
        raise
    if run.unlogged:  # the model is complete; say exactly what MLflow is missing
        folder.write_run_report(run.report())
        log.warning(
            "MLflow run %s in %s is missing %d item(s) because logging failed (%s); the model "
            "and its files are complete. Missing: %s. They are listed in %s; rerun "
            "`dvc repro -f train@%s` once the server is back to log everything.",
            run.run_id,
            run.uri,
            len(run.unlogged),
            run.failure,
            "; ".join(run.unlogged),
            folder.run_file,
            model_name,
        )
    return TrainOutcome(result, folder, entry.weights_file, run.run_id, (train_path, val_path))
