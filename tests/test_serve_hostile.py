"""imgpipe-serve against hostile clients, for real: the server started as a subprocess on a free
127.0.0.1 port with a logreg trained on scikit-learn's digits, registered in a SQLite MLflow
store and served by its alias; requests over each bound, bodies over the size bound (chunked
and with Content-Length), deep and malformed JSON, a non-allowed format, a request past its
deadline, half-sent requests and connections over the cap. The /ping of a server whose model
call blocks runs the guard and the batcher under uvicorn in this process (a stand-in app).

Slow: one server for the module (about 5 s to start) and a few seconds of waiting on timers.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.serve import (
    EPS,
    Server,
    half_sent,
    log_model,
    post,
    request_body,
    send_chunked,
    send_with_length,
)
from tests.support import free_port, write_digits_model

pytestmark = pytest.mark.slow

NAME = "imgpipe-digits-production"
# Small bounds, so that each can be passed with small requests; the defaults are in ServeLimits.
FLAGS = {
    "--max-request-mb": "1",
    "--max-rows": "100",
    "--max-megapixels": "200",
    "--deadline": "1",
    "--read-timeout": "2",
    "--max-connections": "400",
}


@dataclass(frozen=True)
class Served:
    """The running imgpipe-serve, its log, and the registered version it serves."""

    server: Server
    log: Path
    version: str
    run_id: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """imgpipe-serve on models:/<NAME>@champion: a logreg on digits, logged and registered."""
    import mlflow
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("serve")
    model_dir = write_digits_model(folder / "models" / "logreg")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the store's artifacts land in folder/mlruns
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")  # restored
        uri = log_model(model_dir, folder)
        version = mlflow.register_model(uri, NAME)
        MlflowClient().set_registered_model_alias(NAME, "champion", version.version)
        mlflow.set_tracking_uri(None)
    flags = tuple(part for pair in FLAGS.items() for part in pair)
    log = folder / "server.log"
    server = Server(f"models:/{NAME}@champion", folder, log, flags)
    try:
        server.wait_ready(timeout=120)
        yield Served(server, log, version.version, version.run_id)
    finally:
        server.stop()


def digit_png(index: int) -> bytes:
    from imgpipe.demo import digits_images, png_bytes

    pixels, _ = digits_images()
    return png_bytes(pixels[index])


def flat_png(side: int) -> bytes:
    """A flat RGB PNG: a few KB that decode to side x side pixels (17 ms per megapixel here)."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def ask(served: Served, body: bytes) -> tuple[int, dict]:
    """POST body on a new connection: (status, the JSON answer)."""
    with closing(served.server.connection(timeout=60)) as connection:
        status, answer = post(connection, body)
    assert b"Traceback" not in answer and b"stack_trace" not in answer
    return status, json.loads(answer)


def one_line(answer: dict) -> str:
    assert set(answer) == {"error_code", "message"} and "\n" not in answer["message"]
    return answer["message"]


def test_the_log_names_the_registered_version_it_loaded(served: Served) -> None:
    line = next(
        line for line in served.log.read_text().splitlines() if "imgpipe-serve: loaded" in line
    )
    assert line == (
        f"imgpipe-serve: loaded models:/{NAME}@champion = registered model {NAME} version "
        f"{served.version}, alias champion (run {served.run_id})"
    )


def test_rows_over_the_bound_get_a_413_that_says_what_to_do(served: Served) -> None:
    image = digit_png(0)
    status, answer = ask(served, request_body([image] * 100))
    assert status == 200 and all(row["label"] for row in answer["predictions"])
    status, answer = ask(served, request_body([image] * 101))
    assert status == 413 and answer["error_code"] == "REQUEST_TOO_LARGE"
    assert one_line(answer).startswith("the request has 101 rows (limit 100): send at most 100")


def test_pixels_over_the_bound_get_a_413_from_the_headers_without_decoding(served: Served) -> None:
    body = request_body([flat_png(4000)] * 13)  # 208 megapixels: 3.5 CPU-seconds to decode
    cpu = served.server.cpu_seconds()
    start = time.monotonic()
    status, answer = ask(served, body)
    assert status == 413 and "208.0 megapixels (limit 200 per request)" in one_line(answer)
    assert time.monotonic() - start < 1.5
    assert served.server.cpu_seconds() - cpu < 1  # the headers only


def test_past_its_deadline_a_request_gets_a_504_and_its_other_rows_are_not_decoded(
    served: Served,
) -> None:
    body = request_body([flat_png(4000)] * 12)  # 192 megapixels: 3.3 CPU-seconds to decode
    cpu = served.server.cpu_seconds()
    start = time.monotonic()
    status, answer = ask(served, body)
    assert status == 504 and answer["error_code"] == "DEADLINE_EXCEEDED"
    assert "passed its deadline of 1 s with" in one_line(answer)
    assert time.monotonic() - start < 2.5
    assert served.server.cpu_seconds() - cpu < 2.2  # not the 3.3 s the whole request costs
    status, answer = ask(served, request_body([digit_png(1)]))  # the next request is served
    assert status == 200 and answer["predictions"][0]["label"]


def test_oversized_bodies_get_a_413_the_client_can_read_chunked_or_with_length(
    served: Served,
) -> None:
    for send in (send_chunked, send_with_length):
        status, body = send(served.server.port, 1_500_000)
        assert status == 413, send.__name__
        assert json.loads(body)["message"].startswith("the request is larger than 1 MB")


def test_deep_and_malformed_json_of_any_shape_gets_a_one_line_4xx(served: Served) -> None:
    bodies = [
        b"[" * 100_000,
        b"{" * 50_000,
        b'{"a":' * 50_000,
        b"[]",
        b'"image"',
        b"123",
        b"{",
        b"\xff\xfe\x00",
        b'{"dataframe_split": 5}',
        b'{"dataframe_split": {"columns": ["image"], "data": 5}}',
        b'{"dataframe_records": [1, 2]}',
        b'{"inputs": [[1, 2], [3]]}',
        b'{"instances": {"image": {"deep": [1]}}}',
        b'{"dataframe_split": {"columns": ["image"], "data": [[{"a": [1]}]]}}',
    ]
    for body in bodies:
        status, answer = ask(served, body)
        if status == 200:  # a well-formed table whose cell is not an image: that row's error
            assert answer["predictions"][0]["error"], body[:60]
            continue
        assert 400 <= status < 500, (body[:60], status, answer)
        one_line(answer)


def test_a_file_of_a_format_not_allowed_is_that_rows_error(served: Served) -> None:
    status, answer = ask(served, request_body([EPS, digit_png(2)]))
    assert status == 200
    eps_row, digit_row = answer["predictions"]
    assert eps_row["label"] is None and eps_row["error"].startswith("not an image in an accepted")
    assert digit_row["label"] is not None


def test_half_sent_requests_are_dropped_while_another_client_is_answered(served: Served) -> None:
    outcome: list[tuple[int, float]] = []
    attack = threading.Thread(
        target=lambda: outcome.append(half_sent(served.server.port, 300, timeout=15))
    )
    attack.start()
    time.sleep(0.5)  # the 300 are connected and stuck
    start = time.monotonic()
    status, answer = ask(served, request_body([digit_png(3)]))
    assert status == 200 and answer["predictions"][0]["label"]
    assert time.monotonic() - start < 1
    attack.join(30)
    dropped, seconds = outcome[0]
    assert dropped == 300
    assert seconds < 2 + 3  # --read-timeout 2, counted from each connection's start


def test_connections_over_the_cap_get_a_503_until_the_idle_ones_are_dropped(
    served: Served,
) -> None:
    idle = [socket.create_connection(("127.0.0.1", served.server.port)) for _ in range(400)]
    try:
        time.sleep(0.3)
        with closing(served.server.connection(timeout=10)) as connection:
            status, _ = post(connection, request_body([digit_png(4)]))
        assert status == 503
        time.sleep(3)  # --read-timeout 2: the idle connections are dropped
        status, answer = ask(served, request_body([digit_png(4)]))
        assert status == 200 and answer["predictions"][0]["label"]
    finally:
        for sock in idle:
            sock.close()


# --------------------------------------------------------------------------- a stuck model


async def ping_app(scope, receive, send) -> None:
    """A stand-in scoring app: 200 on every request (MLflow's /ping answers 200 while loaded)."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"\n"})


def test_ping_fails_while_the_model_call_blocks_and_recovers_after() -> None:
    import uvicorn

    from imgpipe.serve import ServerSettings, guarded, server_config
    from imgpipe.serving import BatchedPredictor, ServeLimits

    release = threading.Event()

    def blocking_predict(pixels: np.ndarray) -> np.ndarray:
        release.wait(30)
        return np.zeros((len(pixels), 2), np.float32)

    batched = BatchedPredictor(blocking_predict)
    settings = ServerSettings(limits=ServeLimits(stuck_after_s=0.5))
    port = free_port()
    server = uvicorn.Server(
        server_config(guarded(ping_app, settings, batched.stalled_for), "127.0.0.1", port, settings)
    )
    serving = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    serving.start()

    def ping() -> tuple[int, bytes]:
        with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as connection:
            connection.request("GET", "/ping")
            response = connection.getresponse()
            return response.status, response.read()

    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ping()[0] == 200
        caller = threading.Thread(target=batched, args=(np.zeros((1, 1, 1, 1), np.uint8),))
        caller.start()
        time.sleep(0.8)  # the forward pass has blocked for longer than stuck_after_s
        status, body = ping()
        assert status == 503 and json.loads(body)["error_code"] == "MODEL_STUCK"
        assert "restart it" in json.loads(body)["message"]
        release.set()
        caller.join(10)
        assert ping()[0] == 200
    finally:
        release.set()
        server.should_exit = True
        serving.join(10)
