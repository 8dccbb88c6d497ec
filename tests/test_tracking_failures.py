"""An MLflow server that is down at the start stops a stage at once (or, when params say so, the
stage logs locally); one that dies mid-run does not stop training, and what was lost is reported.

Real servers and ports only: a closed loopback port, and a real `mlflow server` killed with SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from imgpipe.params import TrackingParams
from imgpipe.tracking import connection, runs
from tests.support import (
    ROOT,
    checkpoint_epochs,
    free_port,
    load_repo_params,
    start_stage,
    train_command,
    train_here,
    write_digit_tables,
)


@pytest.fixture
def closed_port_uri(monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"http://127.0.0.1:{free_port()}"
    # empty counts as unset; setenv (unlike delenv of an absent name) is always undone, also
    # after mlflow.set_tracking_uri has written the variable
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    return uri


def tracking_params(uri: str, on_unreachable: str) -> TrackingParams:
    """params.yaml's `tracking:` pointed at uri."""
    return TrackingParams(experiment="imgpipe-test", uri=uri, on_unreachable=on_unreachable)


def write_params(folder: Path, **tracking_values: Any) -> None:
    params = load_repo_params()
    params["tracking"].update(tracking_values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


# --------------------------------------------------------------------------- down at the start


def test_unreachable_server_is_refused_with_what_to_do(closed_port_uri: str) -> None:
    started = time.monotonic()
    with pytest.raises(connection.TrackingUnavailableError, match="unreachable") as caught:
        connection.open_store(tracking_params(closed_port_uri, "fail"))
    assert time.monotonic() - started < 10  # at once, not after minutes of retries
    message = str(caught.value)
    assert closed_port_uri in message
    assert "tracking.on_unreachable=local" in message


def test_unreachable_server_falls_back_to_the_local_store_when_asked(
    closed_port_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    store = connection.open_store(tracking_params(closed_port_uri, "local"))
    assert store.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_local_stores_need_no_server(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert connection.unreachable_reason(uri) is None
    assert connection.open_store(tracking_params(uri, "fail")).uri == uri


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_stage_stops_before_any_work_when_the_server_is_down(
    stage: str, closed_port_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no tables exist: the stage must stop on the server check, before it reads anything
    # the stage as DVC runs it: its own process, its exit status and its message on stderr
    write_params(tmp_path, uri=closed_port_uri, on_unreachable="fail")
    if stage == "train":
        arguments = ["--model", "dense", "--tables", "tables/x", "--out", "models/dense"]
    else:
        arguments = [
            *("--model", "dense", "--tables", "tables/x", "--model-dir", "models/dense"),
            *("--metrics", "metrics/dense.json", "--plots", "plots/dense"),
            *("--answers", "answers/dense.csv", "--card", "cards/dense.md"),
        ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": ""}
    finished = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 1
    message = finished.stderr.strip().splitlines()[-1]
    assert message.startswith(f"[{stage}@dense]")
    assert closed_port_uri in message and "unreachable" in message
    assert "Traceback" not in finished.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_run_records_what_it_could_not_log(
    closed_port_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Run whose server is gone keeps going and lists every call that did not reach it."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # no need to wait for retries
    run = runs.Run("0" * 32, runs.Store(closed_port_uri, "imgpipe-test"))
    run.log_epoch(0, {"loss": 1.0})
    run.log_metrics({"train_seconds": 3.0})
    assert run.register_model("imgpipe-dense", tags={"test_accuracy": 0.9}, description="") is None
    run.finish()
    report = run.report()
    assert report["logging_error"]
    assert report["unlogged"] == [
        "metrics loss at step 0",
        "metrics train_seconds",
        "model registry version of imgpipe-dense",
        "run status FINISHED",
    ]


def test_run_warns_once_with_what_it_could_not_log(
    closed_port_uri: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Run.warn_unlogged, with which the train and evaluate stages end: silent when everything
    was logged, else one warning through the stage's logger naming the run, the store, why and
    what is missing, then the stage's own words."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # no need to wait for retries
    run = runs.Run("0" * 32, runs.Store(closed_port_uri, "imgpipe-test"))
    stage_log = logging.getLogger("imgpipe.test-stage")
    with caplog.at_level(logging.WARNING):
        run.warn_unlogged(stage_log, ": %s. Rerun %s.", "train@dense")
        assert not [r for r in caplog.records if r.name == stage_log.name]
        run.log_metrics({"train_seconds": 3.0})
        run.finish()
        run.warn_unlogged(stage_log, ": %s. Rerun %s.", "train@dense")
    (record,) = [r for r in caplog.records if r.name == stage_log.name]
    assert record.getMessage() == (
        f"MLflow run {'0' * 32} in {closed_port_uri} is missing 2 item(s) because logging "
        f"failed ({run.failure}): metrics train_seconds; run status FINISHED. Rerun train@dense."
    )


# --------------------------------------------------------------------------- dies mid-run


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real MLflow tracking server on a loopback port, in its own process group."""
    log_file = (folder / "server.log").open("wb")
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{folder / 'server.db'}"),
            *("--artifacts-destination", str(folder / "artifacts")),
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_healthy(uri: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail("mlflow server did not start in time")


@pytest.mark.slow
def test_server_killed_mid_training_loses_no_model_and_reports_the_gap(tmp_path: Path) -> None:
    write_digit_tables(tmp_path / "tables" / "gray8")
    params = load_repo_params()
    params["views"] = {"gray8": {"height": 8, "width": 8, "color": "grayscale"}}
    params["models"] = {"dense": "gray8"}
    params["dense"].update(hidden_units=[256, 128], epochs=8, learning_rate=0.005, batch_size=32)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    params["tracking"].update(uri=uri, on_unreachable="fail")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    server = start_mlflow_server(tmp_path, port)
    try:
        wait_healthy(uri, server, timeout=150)
        stage = start_stage(
            train_command("models/dense", "checkpoints/dense"), tmp_path, tmp_path / "train.log"
        )
        deadline = time.monotonic() + 240
        while checkpoint_epochs(tmp_path / "checkpoints" / "dense") < 2:
            assert stage.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.01)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-training
        server.wait(timeout=30)
    assert stage.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-4000:]
    output = (tmp_path / "train.log").read_text()

    model_dir = tmp_path / "models" / "dense"
    history = json.loads((model_dir / "history.json").read_text())["history"]
    assert len(history["val_loss"]) == 8  # training finished
    assert (model_dir / "model.keras").stat().st_size > 0
    assert (model_dir / "meta.json").is_file()
    report = json.loads((model_dir / "mlflow_run.json").read_text())
    assert report["tracking_uri"] == uri
    assert report["logging_error"]
    unlogged = report["unlogged"]
    assert "metrics loss, accuracy, val_loss, val_accuracy at step 7" in unlogged
    assert "artifact history.csv" in unlogged
    assert "model (MLflow pyfunc)" in unlogged
    assert "MLflow run" in output and "missing" in output and "dvc repro -f train@dense" in output
    assert not (tmp_path / "checkpoints" / "dense").exists()


@pytest.mark.slow
def test_stage_runs_into_the_local_store_when_told_to(
    tmp_path: Path,
    closed_port_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_digit_tables(tmp_path / "tables" / "gray8")
    params = load_repo_params()
    params["views"] = {"gray8": {"height": 8, "width": 8, "color": "grayscale"}}
    params["models"] = {"numpy_mlp": "gray8"}
    params["numpy_mlp"].update(hidden_units=[16], epochs=1)
    params["tracking"].update(uri=closed_port_uri, on_unreachable="local")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    train_here("numpy_mlp")
    assert "unreachable" in caplog.text and "local store" in caplog.text
    report = json.loads((tmp_path / "models" / "numpy_mlp" / "mlflow_run.json").read_text())
    assert report["tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert report["unlogged"] == []
