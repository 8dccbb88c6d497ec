"""A tracking server that asks for a login: the stages send MLflow's credentials (also with their
own /health check), and a refused login or permission stops a stage with one line that says what
to set, never with a stack trace or the password.

A stub HTTP server on 127.0.0.1 plays MLflow's basic-auth app (401 without the right login, 403
where the user lacks permission); tests/test_team_server.py runs the real one.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest

from imgpipe.params import TrackingParams
from imgpipe.tracking import connection
from imgpipe.tracking.runs import Run

USER, PASSWORD = "bob", "s3cret-pw"


class StubServer(ThreadingHTTPServer):
    """Records the Authorization header of each request; answers as configured."""

    health_needs_login = False
    deny_run_creation = False
    redirect_to: str | None = None  # answer every request with a 307 to this URL's same path

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.authorizations: list[tuple[str, str | None]] = []

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class StubHandler(BaseHTTPRequestHandler):
    """/health, experiments/search and get-by-name, runs/create: MLflow's answers, or 401/403."""

    server: StubServer

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass

    def answer(self, status: int, body: dict | str) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        sent = self.headers.get("Authorization")
        self.server.authorizations.append((self.path, sent))
        if self.server.redirect_to:
            self.send_response(307)
            self.send_header("Location", f"{self.server.redirect_to}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        logged_in = sent == expected
        if self.path == "/health" and not self.server.health_needs_login:
            return self.answer(200, "OK")
        if not logged_in:
            return self.answer(401, "You are not authenticated.")
        if self.path == "/health":
            return self.answer(200, "OK")
        if "experiments/search" in self.path:
            return self.answer(200, {"experiments": []})
        if "experiments/get-by-name" in self.path:
            experiment = {"experiment_id": "1", "name": "imgpipe-test", "lifecycle_stage": "active"}
            return self.answer(200, {"experiment": experiment})
        if "runs/create" in self.path and self.server.deny_run_creation:
            return self.answer(403, {"error_code": "PERMISSION_DENIED", "message": "Denied"})
        return self.answer(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": self.path})

    def do_GET(self) -> None:  # http.server calls it by this name
        self.handle_any()

    def do_POST(self) -> None:
        self.handle_any()


@contextmanager
def running(server: StubServer) -> Iterator[StubServer]:
    """Serve on a thread; always shut down."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubServer]:
    server = StubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # empty counts as unset; always undone
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        mlflow.set_tracking_uri(None)  # Store.start_run set it to this stub


def login(monkeypatch: pytest.MonkeyPatch, user: str, password: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def params(uri: str, on_unreachable: str = "fail") -> TrackingParams:
    return TrackingParams(experiment="imgpipe-test", uri=uri, on_unreachable=on_unreachable)


def test_credentials_header_follows_mlflows_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert connection.credentials_header() == {}
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
    assert connection.credentials_header() == {"Authorization": "Bearer tok"}
    login(monkeypatch, USER, PASSWORD)  # a username and password win over a token, as in MLflow
    (value,) = connection.credentials_header().values()
    assert base64.b64decode(value.removeprefix("Basic ")) == f"{USER}:{PASSWORD}".encode()


def test_the_health_check_sends_the_login_and_a_refused_one_is_no_outage(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub.health_needs_login = True  # e.g. a proxy in front of the server
    login(monkeypatch, USER, PASSWORD)
    assert connection.unreachable_reason(stub.uri) is None
    assert stub.authorizations[-1][1] is not None
    login(monkeypatch, USER, "wrong")
    assert connection.unreachable_reason(stub.uri) is None  # reachable: login_problem says why


def test_open_store_accepts_the_right_login(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    login(monkeypatch, USER, PASSWORD)
    assert connection.open_store(params(stub.uri)).uri == stub.uri


@pytest.mark.parametrize("on_unreachable", ["fail", "local"])
def test_a_wrong_password_stops_the_stage_with_one_line_and_no_password(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch, on_unreachable: str
) -> None:
    login(monkeypatch, USER, "wrong-pw")
    refused = re.escape(f"refused the login of user '{USER}' (HTTP 401")
    with pytest.raises(connection.TrackingLoginError, match=refused) as caught:
        connection.open_store(params(stub.uri, on_unreachable))  # never falls back to local
    message = str(caught.value)
    assert "\n" not in message
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in message
    assert "wrong-pw" not in message


def test_no_login_at_all_says_which_variables_to_set(stub: StubServer) -> None:
    with pytest.raises(
        connection.TrackingLoginError, match=r"asks for a login \(HTTP 401\)"
    ) as caught:
        connection.open_store(params(stub.uri))
    message = str(caught.value)
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not both set" in message


def test_no_permission_to_log_runs_says_whom_to_ask(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub.deny_run_creation = True
    login(monkeypatch, USER, PASSWORD)
    store = connection.open_store(params(stub.uri))
    denied = f"does not let user '{USER}' log runs into experiment 'imgpipe-test'"
    with pytest.raises(connection.TrackingLoginError, match=denied) as caught:
        store.start_run(model_name="dense", dataset="digits", data_hash="0" * 16, params={})
    message = str(caught.value)
    assert "\n" not in message
    assert "EDIT permission" in message and PASSWORD not in message


def test_no_login_goes_to_the_target_of_a_redirect(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    login(monkeypatch, USER, PASSWORD)
    sent = connection.credentials_header()["Authorization"]
    with running(StubServer()) as other:
        port = other.server_address[1]
        for target in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):  # port, host
            stub.redirect_to = target
            stub.authorizations.clear()
            other.authorizations.clear()
            assert connection.unreachable_reason(stub.uri) is None  # followed: /health is OK
            # MLflow's own client (requests) must not forward it either
            connection.login_problem(stub.uri)
            with pytest.raises(mlflow.exceptions.MlflowException):
                connection.MlflowClient(tracking_uri=stub.uri).get_run("0" * 32)
            assert stub.authorizations[0] == ("/health", sent)  # the server asked for gets it
            assert len(stub.authorizations) == 3 and {a for _, a in stub.authorizations} == {sent}
            assert other.authorizations[0] == ("/health", None)
            assert len(other.authorizations) >= 3, other.authorizations
            assert {a for _, a in other.authorizations} == {None}, other.authorizations


def test_a_password_in_the_uri_is_used_but_never_shown(
    stub: StubServer, caplog: pytest.LogCaptureFixture
) -> None:
    uri = stub.uri.replace("http://", f"http://{USER}:{PASSWORD}@")
    shown = stub.uri.replace("http://", f"http://{USER}:***@")
    assert connection.redact(f"at {uri}/api and {uri}") == f"at {shown}/api and {shown}"
    assert connection.redact("https://alice@host/ and sqlite:///x.db") == (
        "https://alice@host/ and sqlite:///x.db"  # no password: nothing to hide
    )
    with caplog.at_level(logging.INFO):
        store = connection.open_store(params(uri))  # the stub checks the URI's login
        assert stub.authorizations[0][1] is not None
        run = Run("0" * 32, store)
        run._attempt(
            "a metric", lambda: (_ for _ in ()).throw(OSError(f"no answer from {uri}/api"))
        )
    report = run.report()
    assert report["tracking_uri"] == shown
    assert report["logging_error"] == f"OSError: no answer from {shown}/api"
    assert PASSWORD not in caplog.text and shown in caplog.text
    problem = connection.login_problem(uri.replace(PASSWORD, "not-his-pw"))
    assert "refused the login of user 'bob'" in problem and f"{USER}:***@" in problem
    assert "not-his-pw" not in problem
