"""Where a stage logs and whether it can: the tracking URI, the server and login checks, and
open_store, which runs them before any work starts.

What is here decides where runs are logged and stops a stage that could not log; it shapes no
model, metric or plot, so tests/test_dvc_deps.py leaves it out of the stages' deps and a message
edited here retrains nothing. (Its one trace in an output is the tracking URI that
models/<model>/mlflow_run.json records beside the run id, without any password: see redact.)

Logins go only where they are meant to: https servers are verified as MLflow's client verifies
them (MLFLOW_TRACKING_SERVER_CERT_PATH, else the system's CAs), and the /health check's
Authorization header is never sent on to a redirect's target.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import re
import ssl
import urllib.error
import urllib.parse
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


class TrackingCertificateError(StageError):
    """An https tracking server's certificate could not be verified: no login is sent to it."""


# `scheme://user:password@`: the password part of a URI's userinfo, wherever a URI is in a text
_PASSWORD_IN_URI = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):[^/\s@]*@")


def redact(text: str) -> str:
    """text with the password of every `scheme://user:password@host` in it as `***`: what
    goes into a log, a message or mlflow_run.json (a DVC output, pushed to the remote)."""
    return _PASSWORD_IN_URI.sub(r"\1:***@", text)


def split_login(uri: str) -> tuple[str, str | None, str | None]:
    """The URI without its `user:password@` part, and that user and password (unquoted)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    bare = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
    unquote = urllib.parse.unquote
    password = unquote(parts.password) if parts.password is not None else None
    return urllib.parse.urlunsplit(bare), unquote(parts.username or ""), password


def credentials_header(uri: str = "") -> dict[str, str]:
    """The Authorization header the MLflow client sends, from the same environment variables
    (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, else MLFLOW_TRACKING_TOKEN), else
    from the URI's `user:password@`."""
    _, uri_user, uri_password = split_login(uri)
    username = os.environ.get("MLFLOW_TRACKING_USERNAME") or uri_user
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or uri_password
    if username and password:
        pair = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {pair}"}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def tls_context() -> ssl.SSLContext:
    """Verification as MLflow's client does it: against MLFLOW_TRACKING_SERVER_CERT_PATH when
    set, else the system's CAs (MLFLOW_TRACKING_INSECURE_TLS is not honoured here)."""
    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    try:
        return ssl.create_default_context(cafile=cert or None)
    except (OSError, ssl.SSLError) as error:
        raise TrackingCertificateError(
            f"MLFLOW_TRACKING_SERVER_CERT_PATH={cert} is not a readable PEM certificate "
            f"({error}): set it to a copy of the server's certificate; nothing was done."
        ) from None


def certificate_refused(uri: str, error: ssl.SSLCertVerificationError) -> str:
    """A one-line message for an https server whose certificate could not be verified."""
    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    against = (
        f"the certificate in MLFLOW_TRACKING_SERVER_CERT_PATH ({cert})"
        if cert
        else "this machine's trusted CAs (MLFLOW_TRACKING_SERVER_CERT_PATH is not set)"
    )
    return (
        f"MLflow server {redact(uri)} could not be verified against {against}: "
        f"{error.verify_message or error}. Set MLFLOW_TRACKING_SERVER_CERT_PATH to a copy of "
        "the server's certificate (its admin has it: FOLDER/tls/cert.pem of "
        "scripts/team-server) and use a host name it names; no login was sent; nothing was done."
    )


def unreachable_reason(uri: str, timeout: float = 5.0) -> str | None:
    """Why an http(s) tracking server does not answer its /health endpoint, or None if it does.

    The request carries the user's credentials (a proxy in front of the server may ask for them),
    to this URL only: a redirect's target never gets them. A login it refuses (401, 403) counts
    as reachable: login_problem says what is wrong. An https server whose certificate cannot be
    verified raises TrackingCertificateError (it is no outage, and gets no login). Other stores
    (sqlite, file) are local and always count as reachable.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    bare, _, _ = split_login(uri)
    request = urllib.request.Request(f"{bare.rstrip('/')}/health")
    for name, value in credentials_header(uri).items():
        # urllib copies a request's headers to wherever a redirect points, other hosts too;
        # unredirected headers stay with this one request
        request.add_unredirected_header(name, value)
    handlers = (
        [urllib.request.HTTPSHandler(context=tls_context())] if bare.startswith("https:") else []
    )
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as response:
            if response.status >= 400:
                return f"/health answered HTTP {response.status}"
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return None
        return f"/health answered HTTP {error.code}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise TrackingCertificateError(certificate_refused(uri, reason)) from None
        return redact(str(reason))
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
        _, uri_user, uri_password = split_login(uri)
        username = os.environ.get("MLFLOW_TRACKING_USERNAME") or uri_user
        status = error.get_http_status_code()
        if not (username and (os.environ.get("MLFLOW_TRACKING_PASSWORD") or uri_password)):
            return (
                f"MLflow server {redact(uri)} asks for a login (HTTP {status}) and "
                f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not both set: "
                f"{LOGIN_HELP}"
            )
        return (
            f"MLflow server {redact(uri)} refused the login of user {username!r} (HTTP "
            f"{status}: wrong password, or no such user): {LOGIN_HELP}"
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
    if split_login(uri)[2] is not None:  # MLflow prints "View run ... at: <URI>" otherwise
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
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
            redact(uri),
            reason,
            local,
        )
        return Store(local, tracking.experiment)
    raise TrackingUnavailableError(
        f"MLflow server {redact(uri)} is unreachable ({reason}); nothing was done. Start the "
        "server, or point MLFLOW_TRACKING_URI / tracking.uri at one that runs, or run with "
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
