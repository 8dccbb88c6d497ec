"""Where a stage logs and whether it can: the tracking URI, the server and login checks, and
open_store, which runs them before any work starts.

What is here decides where runs are logged and stops a stage that could not log; it shapes no
model, metric or plot, so tests/test_dvc_deps.py leaves it out of the stages' deps and a message
edited here retrains nothing. (Its one trace in an output is the tracking URI that
models/<model>/mlflow_run.json records beside the run id.)
"""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.tracking import MlflowClient

from imgpipe.runtime import StageError

if TYPE_CHECKING:
    from imgpipe.params import TrackingParams
    from imgpipe.tracking.runs import Store

log = logging.getLogger("imgpipe.tracking")


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
    # deferred: runs imports this module (its Store raises TrackingLoginError)
    from imgpipe.tracking.runs import Store

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
