"""Everything MLflow: where the store is, one run per model, and the model as an MLflow pyfunc.

This is the only module that imports mlflow. Nothing happens at import time: the tracking URI is
resolved and set when a stage opens a run.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient

from imgpipe.runtime import StageError

if TYPE_CHECKING:
    from imgpipe.params import TrackingParams

log = logging.getLogger("imgpipe.tracking")
MODEL_ID_TAG = "imgpipe.model_id"  # the run's MLflow LoggedModel, which register_model uses


def repo_root() -> Path:
    """The project root, also inside `dvc exp run --temp/--queue` copies (DVC sets DVC_ROOT)."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def local_uri() -> str:
    """The local store: sqlite:///<repo root>/mlflow.db."""
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def tracking_uri(configured: str | None) -> str:
    """MLFLOW_TRACKING_URI, else params' tracking.uri, else the local store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or local_uri()


class TrackingUnavailableError(StageError):
    """The MLflow tracking server cannot be reached."""


def configure_mlflow() -> None:
    """Bound how long one call to an unreachable server waits (MLflow retries 7 times with
    exponential backoff by default: minutes per call), and keep MLflow's own progress bars and
    start-up notes out of the stage's output. Explicit environment settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # "Creating initial MLflow database tables...": a new local store, nothing to act on
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


class TrackingLoginError(StageError):
    """The MLflow tracking server refused this user's login or permission."""


def credentials_header() -> dict[str, str]:
    """The Authorization header the MLflow client sends, from the same environment variables
    (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, else MLFLOW_TRACKING_TOKEN)."""
    username = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if username and password:
        pair = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {pair}"}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def unreachable_reason(uri: str, timeout: float = 5.0) -> str | None:
    """Why an http(s) tracking server does not answer its /health endpoint, or None if it does.

    The request carries the user's credentials (a proxy in front of the server may ask for them);
    a login it refuses (401, 403) counts as reachable: login_problem says what is wrong. Other
    stores (sqlite, file) are local and always count as reachable.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    request = urllib.request.Request(f"{uri.rstrip('/')}/health", headers=credentials_header())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status >= 400:
                return f"/health answered HTTP {response.status}"
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return None
        return f"/health answered HTTP {error.code}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        return str(getattr(error, "reason", error))
    return None


LOGIN_HELP = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on that server "
    "(its admin creates accounts and resets passwords)"
)


def login_problem(uri: str) -> str | None:
    """Why an http(s) tracking server refuses this user (a one-line message that says what to
    do), or None when it accepts the login or asks for none."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            return None  # not a login problem: the calls that log report it
        username = os.environ.get("MLFLOW_TRACKING_USERNAME")
        status = error.get_http_status_code()
        if not (username and os.environ.get("MLFLOW_TRACKING_PASSWORD")):
            return (
                f"MLflow server {uri} asks for a login (HTTP {status}) and "
                f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not both set: "
                f"{LOGIN_HELP}"
            )
        return (
            f"MLflow server {uri} refused the login of user {username!r} (HTTP {status}: wrong "
            f"password, or no such user): {LOGIN_HELP}"
        )
    return None


def open_store(tracking: TrackingParams) -> Store:
    """The store a stage logs to (params' `tracking:`), checked before any work starts.

    An unreachable server stops the stage at once (on_unreachable "fail") or is replaced by the
    local sqlite store with a warning (on_unreachable "local"). A server that refuses the user's
    login stops the stage, with what to set.
    """
    configure_mlflow()
    uri = tracking_uri(tracking.uri)
    reason = unreachable_reason(uri)
    if reason is None:
        problem = login_problem(uri)  # a wrong password is no reason to log elsewhere
        if problem is not None:
            raise TrackingLoginError(f"{problem}; nothing was done.")
        prepare_sqlite_store(uri)
        return Store(uri, tracking.experiment)
    local = local_uri()
    if tracking.on_unreachable == "local":
        prepare_sqlite_store(local)
        log.warning(
            "MLflow server %s is unreachable (%s): logging into the local store %s instead "
            "(tracking.on_unreachable: local)",
            uri,
            reason,
            local,
        )
        return Store(local, tracking.experiment)
    raise TrackingUnavailableError(
        f"MLflow server {uri} is unreachable ({reason}); nothing was done. Start the server, "
        "or point MLFLOW_TRACKING_URI / tracking.uri at one that runs, or run with "
        f"`-S tracking.on_unreachable=local` to log into {local} instead."
    )


def prepare_sqlite_store(uri: str) -> None:
    """Create (or upgrade) a SQLite store's tables while holding an exclusive lock on its file.

    Parallel stages (`dvc queue start -j 2`) that open a new store at once would otherwise both
    run MLflow's migrations, and one fails ("Online migration expected to match one row").
    SQLite's own locks are fcntl locks, which a flock on the same file does not touch.
    """
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:  # an empty file is an empty SQLite database
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
        log.info("MLflow run %s (%s) in %s", run_name, run.run_id, self.uri)
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
            f"MLflow server {self.uri} does not let user {username!r} {what} (HTTP 403): ask the "
            "server's admin for EDIT permission on it, or set tracking.experiment to an "
            "experiment of yours; nothing was logged."
        )


class Run:
    """An MLflow run for one model, created by train and resumed by evaluate."""

    def __init__(self, run_id: str, store: Store) -> None:
        self.run_id = run_id
        self.uri = store.uri
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
            self.failure = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            self.unlogged.append(what)
            log.warning(
                "MLflow logging to %s failed (%s): going on without it; "
                "everything not logged will be listed at the end",
                self.uri,
                self.failure,
            )
            return False
        return True

    def report(self) -> dict[str, Any]:
        """Where this run logs and what could not be logged (empty when all went well)."""
        return {
            "run_id": self.run_id,
            "tracking_uri": self.uri,
            "logging_error": self.failure,
            "unlogged": list(self.unlogged),
        }

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

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add or replace tags."""
        for key, value in tags.items():
            self._attempt(
                f"tag {key}",
                lambda key=key, value=value: self.client.set_tag(self.run_id, key, value),
            )

    def log_model(self, model_file: Path, meta_file: Path) -> None:
        """Log the model in MLflow's pyfunc format: predicts on uint8 pixels or encoded images."""

        def log() -> None:
            with mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
                # its warning that a Python object is pickled is about loading models from
                # strangers; this one is ours, and its weights are in their own files
                pyfunc_log = logging.getLogger("mlflow.pyfunc")
                level = pyfunc_log.level
                pyfunc_log.setLevel(logging.ERROR)
                try:
                    info = _log_pyfunc_model(model_file, meta_file)
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


def _log_pyfunc_model(model_file: Path, meta_file: Path) -> ModelInfo:
    """mlflow.pyfunc.log_model into the active run: the classifier wrapper, its files, and the
    imgpipe package itself, so that `mlflow models serve` and load_model work wherever keras,
    tensorflow, scikit-learn and mlflow are installed."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=ImageClassifierModel(),
        artifacts={"model": str(model_file), "meta": str(meta_file)},
        pip_requirements=_requirements(),
        code_paths=[str(Path(__file__).resolve().parent)],
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = [
        "imgpipe",
        "keras",
        "tensorflow",
        "numpy",
        "pandas",
        "pillow",
        "scikit-learn",
        "mlflow",
    ]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except Exception:  # not installed as a distribution: leave it to the environment
            continue
    return pins


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around imgpipe.classifier.Classifier.

    Input: a uint8 array (N, H, W, C) in the model's view, or a DataFrame with an `image`
    column of encoded image bytes (or base64 text, as in a JSON serving request). Output: for
    arrays, `label`, `probability` and one `p_<class>` column per class; for images, `label`,
    `probability` and `error`, one row per input row (see imgpipe.serving). Concurrent calls
    (a server's request threads) share forward passes.
    """

    # MLflow wraps predict() for type-hint validation and warns when it has no hints; its input
    # is an array or a DataFrame, and a hint would make MLflow enforce one of them
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the weights and meta.json from the logged artifacts."""
        from imgpipe.classifier import Classifier
        from imgpipe.serving import BatchedPredictor

        self.classifier = Classifier.from_files(
            context.artifacts["model"], context.artifacts["meta"]
        )
        self.batched = BatchedPredictor(self.classifier.predict_proba)
        # TensorFlow traces the forward pass for the first two batch sizes it meets (0.4 to
        # 0.5 s each), then for any size: done here, not in the first requests' answer times
        for count in (1, 2):
            self.classifier.predict_proba(np.zeros((count, *self.classifier.input_shape), np.uint8))

    # No type hints here: MLflow would turn them into a strict input schema.
    def predict(self, context, model_input, params=None):
        """Classify a batch of images."""
        from imgpipe.serving import answer_rows

        names = self.classifier.meta.class_names
        if isinstance(model_input, np.ndarray):
            proba = self.classifier.predict_proba(model_input)
            frame = pd.DataFrame(proba, columns=[f"p_{n}" for n in names])
            frame.insert(0, "label", [names[i] for i in proba.argmax(axis=1)])
            frame.insert(1, "probability", proba.max(axis=1))
            return frame
        return answer_rows(
            pd.DataFrame(model_input),
            decode=self.classifier.decode,
            predict=self.batched,
            class_names=names,
        )
