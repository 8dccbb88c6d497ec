"""MLflow runs: Store opens a model's run (train) or finds it again (evaluate); Run logs into it,
and lists what it could not log instead of stopping the stage. Plus the provenance a run
records: the git commit, a digest of the data, params as flat names.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import os
import subprocess
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from imgpipe.tracking.connection import TrackingLoginError, redact
from imgpipe.tracking.pyfunc import log_pyfunc_model

log = logging.getLogger("imgpipe.tracking")
MODEL_ID_TAG = "imgpipe.model_id"  # the run's MLflow LoggedModel, which register_model uses


def git_commit() -> str:
    """HEAD of the project's git repository, or 'unknown' outside one."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def files_digest(paths: Iterable[str | Path]) -> str:
    """A short content hash of files: ties a run to the exact data it saw."""
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(Path(p) for p in paths):
        digest.update(f"{path.name}:{path.stat().st_size}:".encode())  # file boundaries count
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def run_user() -> str:
    """Who logs: the login name on a team server (MLFLOW_TRACKING_USERNAME), else the OS user."""
    if name := os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (some containers)
        return "unknown"


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested params as MLflow's flat `section.key` names."""
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return flat
    return {prefix: value}


class Store:
    """One MLflow tracking store and experiment: opens new runs and finds earlier ones."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.where = redact(uri)  # for logs, messages and mlflow_run.json: no password
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=uri)

    def start_run(
        self, *, model_name: str, dataset: str, data_hash: str, params: Mapping[str, Any]
    ) -> Run:
        """Open a new run named after the model and, when DVC runs an experiment, its name."""
        mlflow.set_tracking_uri(self.uri)
        experiment_id = self._experiment_id()
        exp_name = os.environ.get("DVC_EXP_NAME")
        commit = git_commit()
        tags = {
            "model": model_name,
            "dataset": dataset,
            "data_hash": data_hash,
            "git_commit": commit,
            "mlflow.source.git.commit": commit,
            "stage": f"train@{model_name}",
            "mlflow.user": run_user(),  # the UI's User column: the member who ran it
        }
        if exp_name:
            tags["dvc_experiment"] = exp_name
        run_name = f"{model_name}-{exp_name}" if exp_name else f"{model_name}-{commit[:7]}"
        try:
            created = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code != "PERMISSION_DENIED":
                raise
            denied = self._denied(f"log runs into experiment {self.experiment!r}")
            raise TrackingLoginError(denied) from None
        run = Run(created.info.run_id, self)
        run.log_params(params)
        log.info("MLflow run %s (%s) in %s", run_name, run.run_id, self.where)
        return run

    def resume_run(self, run_id: str) -> Run | None:
        """The run with this id, or None when this store does not have it."""
        try:
            self.client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            return None
        mlflow.set_tracking_uri(self.uri)
        return Run(run_id, self)

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code == "PERMISSION_DENIED":
                raise TrackingLoginError(
                    self._denied(f"create experiment {self.experiment!r}")
                ) from None
            # created meanwhile by a parallel stage
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def _denied(self, what: str) -> str:
        """A one-line message for a server that does not let this user do `what`."""
        username = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(no MLFLOW_TRACKING_USERNAME)"
        return (
            f"MLflow server {self.where} does not let user {username!r} {what} (HTTP 403): ask the "
            "server's admin for EDIT permission on it, or set tracking.experiment to an "
            "experiment of yours; nothing was logged."
        )


class Run:
    """An MLflow run for one model, created by train and resumed by evaluate."""

    def __init__(self, run_id: str, store: Store) -> None:
        self.run_id = run_id
        self.uri = store.uri
        self.where = store.where
        self.client = store.client
        # Once a call fails (e.g. the server went away), later ones are not attempted: each would
        # wait for its retries. What was not logged is listed here for the stage to report.
        self.failure: str | None = None
        self.unlogged: list[str] = []

    def _attempt(self, what: str, action: Callable[[], object]) -> bool:
        """Run one logging call; a failure is recorded and reported, never raised."""
        if self.failure is not None:
            self.unlogged.append(what)
            return False
        try:
            action()
        except Exception as error:  # any failure to log must not stop training or evaluation
            self.failure = redact(f"{type(error).__name__}: {error}".splitlines()[0])[:300]
            self.unlogged.append(what)
            log.warning(
                "MLflow logging to %s failed (%s): going on without it; "
                "everything not logged will be listed at the end",
                self.where,
                self.failure,
            )
            return False
        return True

    def report(self) -> dict[str, Any]:
        """Where this run logs and what could not be logged (empty when all went well)."""
        return {
            "run_id": self.run_id,
            "tracking_uri": self.where,
            "logging_error": self.failure,
            "unlogged": list(self.unlogged),
        }

    def warn_unlogged(self, stage_log: logging.Logger, then: str, *args: object) -> None:
        """When some logging failed, warn once through the stage's logger: which run in which
        store lacks how many items and why, then `then`, whose first %s is the list of what is
        missing, followed by `args` (what is complete, what to rerun)."""
        if not self.unlogged:
            return
        stage_log.warning(
            "MLflow run %s in %s is missing %d item(s) because logging failed (%s)" + then,
            self.run_id,
            self.where,
            len(self.unlogged),
            self.failure,
            "; ".join(self.unlogged),
            *args,
        )

    def reopen(self) -> None:
        """Mark a run RUNNING again: an interrupted training run continues in it."""
        self._attempt("run status RUNNING", lambda: self.client.update_run(self.run_id, "RUNNING"))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested mappings are flattened); MLflow keeps values as strings."""
        flat = flatten("", params)
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flat.items()]
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            self._attempt(
                f"params {', '.join(p.key for p in chunk)}",
                lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk),
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics at an optional step (the epoch)."""
        now = int(mlflow.utils.time.get_current_time_millis())
        batch = [
            mlflow.entities.Metric(key, float(value), now, step or 0)
            for key, value in metrics.items()
            if value is not None and np.isfinite(value)
        ]
        if batch:
            where = f" at step {step}" if step is not None else ""
            self._attempt(
                f"metrics {', '.join(m.key for m in batch)}{where}",
                lambda: self.client.log_batch(self.run_id, metrics=batch),
            )

    def log_epoch(self, epoch: int, logs: Mapping[str, float]) -> None:
        """Per-epoch training metrics, with the epoch (from 0) as the step."""
        self.log_metrics(logs, step=epoch)

    def log_file(self, path: str | Path, artifact_dir: str | None = None) -> None:
        """Copy a file into the run's artifacts."""
        name = f"{artifact_dir}/{Path(path).name}" if artifact_dir else Path(path).name
        self._attempt(
            f"artifact {name}",
            lambda: self.client.log_artifact(self.run_id, str(path), artifact_dir),
        )

    def log_text_file(self, path: str | Path, artifact_file: str) -> None:
        """Copy a UTF-8 text file into the run's artifacts under another name, e.g.
        answers/cnn.csv as evaluation/answers.csv."""
        self._attempt(
            f"artifact {artifact_file}",
            lambda: self.client.log_text(
                self.run_id, Path(path).read_text(encoding="utf-8"), artifact_file
            ),
        )

    def log_table(self, path: str | Path, *, name: str, context: str) -> None:
        """Log a table file as an MLflow dataset input (the UI's Datasets column): its path and
        the file's hash as digest, no pixels read; context is training, validation or test."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        def log() -> None:
            with warnings.catch_warnings():  # MLflow registers its local source twice, and says so
                warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
                source = resolve_dataset_source(str(Path(path).resolve()))
            dataset = MetaDataset(source, name=name, digest=files_digest([path]))
            context_tag = InputTag(key="mlflow.data.context", value=context)
            entry = DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[context_tag])
            self.client.log_inputs(self.run_id, datasets=[entry])

        self._attempt(f"dataset {name} ({context})", log)

    @contextlib.contextmanager
    def system_metrics(self) -> Iterator[None]:
        """Sample CPU, memory, disk and network into the run's `system/*` metrics (MLflow's
        monitor, every 10 s or MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) while the block runs."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop notes
        monitor: list[SystemMetricsMonitor] = []
        self._attempt(
            "system metrics",
            lambda: monitor.append(SystemMetricsMonitor(self.run_id, tracking_uri=self.uri)),
        )
        if monitor:
            monitor[0].start()
        try:
            yield
        finally:
            if monitor:
                monitor[0].finish()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add or replace tags."""
        for key, value in tags.items():
            self._attempt(
                f"tag {key}",
                lambda key=key, value=value: self.client.set_tag(self.run_id, key, value),
            )

    def log_model(self, model_file: Path, meta_file: Path) -> None:
        """Log the model in MLflow's pyfunc format, as a model from code (no pickle), with its
        signature and input example: base64 image files in an `image` column."""

        def log() -> None:
            with mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
                # its notes (the input example checked against the signature) are MLflow's
                # housekeeping, not the stage's news; errors still show
                pyfunc_log = logging.getLogger("mlflow.pyfunc")
                level = pyfunc_log.level
                pyfunc_log.setLevel(logging.ERROR)
                try:
                    info = log_pyfunc_model(model_file, meta_file)
                finally:
                    pyfunc_log.setLevel(level)
            # MLflow 3 keeps the model as a LoggedModel of its own: register_model needs its id
            self.client.set_tag(self.run_id, MODEL_ID_TAG, info.model_id)

        if not self._attempt("model (MLflow pyfunc)", log) and mlflow.active_run() is not None:
            # forget the half-opened fluent run locally; ending it remotely may fail too
            with contextlib.suppress(Exception):
                mlflow.end_run("FAILED")

    def register_model(
        self, name: str, *, tags: Mapping[str, Any], description: str
    ) -> ModelVersion | None:
        """Register this run's model as a version of `name` (created on first use), tagged.

        A run registers once: evaluating the same run again updates its version's tags and
        description instead of adding a version. Returns None when the registry could not be
        reached: like every other logging call, that is reported, never raised.
        """
        text_tags = {key: str(value) for key, value in tags.items()}
        registered: list[ModelVersion] = []

        def register() -> None:
            query = f"name = '{name}' and run_id = '{self.run_id}'"
            existing = self.client.search_model_versions(query)
            if existing:
                version = existing[0]
                for key, value in text_tags.items():
                    self.client.set_model_version_tag(name, version.version, key, value)
            else:
                version = self._new_version(name, text_tags)
            self.client.update_model_version(name, version.version, description=description)
            self.client.set_tag(self.run_id, "registered_model", f"{name}/{version.version}")
            registered.append(version)

        if not self._attempt(f"model registry version of {name}", register):
            return None
        return registered[0]

    def _new_version(self, name: str, tags: Mapping[str, str]) -> ModelVersion:
        """A new version of `name` (created on first use) from this run's logged model."""
        model_id = self.client.get_run(self.run_id).data.tags.get(MODEL_ID_TAG)
        if model_id is None:  # a run logged before the tag existed: let MLflow look it up
            return mlflow.register_model(f"runs:/{self.run_id}/model", name, tags=dict(tags))
        try:
            self.client.create_registered_model(name)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        return self.client.create_model_version(
            name, f"models:/{model_id}", run_id=self.run_id, tags=dict(tags), model_id=model_id
        )

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run."""
        self._attempt(
            f"run status {status}",
            lambda: self.client.set_terminated(self.run_id, status=status),
        )
