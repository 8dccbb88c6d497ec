"""The served model's request handling: per-row answers, bad rows, batching of concurrent calls."""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pandas as pd
import pytest

from imgpipe.serving import BatchedPredictor, answer_rows, image_bytes, one_line_error

CLASSES = ["cat", "dog"]


def fake_decode(data: bytes) -> np.ndarray | str:
    """b"cat"/b"dog" decode to a one-pixel image whose value is the class index."""
    if data in (b"cat", b"dog"):
        return np.full((1, 1, 1), CLASSES.index(data.decode()), dtype=np.uint8)
    return "not an image Pillow can read"


def fake_predict(pixels: np.ndarray) -> np.ndarray:
    """Probability 0.9 for the class the pixel value names."""
    proba = np.full((len(pixels), 2), 0.1, dtype=np.float32)
    proba[np.arange(len(pixels)), pixels.reshape(len(pixels))] = 0.9
    return proba


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def answer(frame: pd.DataFrame) -> pd.DataFrame:
    return answer_rows(frame, decode=fake_decode, predict=fake_predict, class_names=CLASSES)


def test_each_row_gets_its_label_or_its_own_error_in_order() -> None:
    frame = pd.DataFrame(
        {"image": [b64(b"dog"), "not base64 at all!", b64(b"junk"), b64(b"cat"), None, 7]}
    )
    out = answer(frame)
    assert list(out.columns) == ["label", "probability", "error"]
    assert out["label"].tolist() == ["dog", None, None, "cat", None, None]
    assert out["probability"].tolist()[0] == pytest.approx(0.9)
    errors = out["error"].tolist()
    assert errors[0] is None and errors[3] is None
    assert "not base64" in errors[1]
    assert errors[2] == "not an image Pillow can read"
    assert errors[4] == "no image in this row"
    assert "int" in errors[5] and "base64" in errors[5]


def test_raw_bytes_are_accepted_as_they_are() -> None:
    assert image_bytes(b"cat") == b"cat"
    assert image_bytes(b64(b"cat")) == b"cat"


def test_a_request_without_an_image_column_gets_one_clear_error_per_row() -> None:
    out = answer(pd.DataFrame({"img": [b64(b"cat"), b64(b"dog")]}))
    assert out["label"].tolist() == [None, None]
    message = out["error"].iloc[0]
    assert "no 'image' column" in message and "['img']" in message and "\n" not in message


def test_many_rows_are_decoded_and_predicted_chunk_by_chunk() -> None:
    seen: list[int] = []

    def counting_predict(pixels: np.ndarray) -> np.ndarray:
        seen.append(len(pixels))
        return fake_predict(pixels)

    frame = pd.DataFrame({"image": [b64(b"cat"), b64(b"dog")] * 300})
    out = answer_rows(frame, decode=fake_decode, predict=counting_predict, class_names=CLASSES)
    assert out["label"].tolist() == ["cat", "dog"] * 300
    assert seen == [256, 256, 88]  # never more than one chunk of decoded pixels at a time


def test_empty_request_gives_an_empty_answer() -> None:
    out = answer(pd.DataFrame({"image": []}))
    assert len(out) == 0 and list(out.columns) == ["label", "probability", "error"]


def test_concurrent_callers_share_forward_passes_and_each_gets_its_own_rows() -> None:
    batches: list[int] = []

    def slow_predict(pixels: np.ndarray) -> np.ndarray:
        batches.append(len(pixels))
        time.sleep(0.05)  # a forward pass long enough for the other callers to queue up
        return pixels.reshape(len(pixels), 1).astype(np.float32) * np.ones((1, 2), np.float32)

    predictor = BatchedPredictor(slow_predict, max_batch=64)
    results: dict[int, np.ndarray] = {}

    def call(caller: int) -> None:
        pixels = np.full((caller + 1, 1, 1, 1), caller, dtype=np.uint8)
        results[caller] = predictor(pixels)

    threads = [threading.Thread(target=call, args=(caller,)) for caller in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for caller in range(8):
        assert results[caller].shape == (caller + 1, 2)
        assert (results[caller] == caller).all()  # its own rows, not a neighbour's
    assert sum(batches) == sum(range(1, 9))
    assert len(batches) < 8  # some callers were served together


def test_a_failing_forward_pass_fails_every_waiting_caller_and_the_next_call_works() -> None:
    calls = {"n": 0}

    def flaky(pixels: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return np.zeros((len(pixels), 2), np.float32)

    predictor = BatchedPredictor(flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        predictor(np.zeros((1, 1, 1, 1), np.uint8))
    assert predictor(np.zeros((3, 1, 1, 1), np.uint8)).shape == (3, 2)


def test_error_bodies_become_one_line_without_stack_traces() -> None:
    mlflow_style = json.dumps(
        {
            "error_code": "BAD_REQUEST",
            "message": "Invalid input. Not JSON.\nInput: \n" + "x" * 1000 + "\n",
            "stack_trace": "Traceback (most recent call last):\n  File ...",
        }
    ).encode()
    answer = json.loads(one_line_error(400, mlflow_style))
    assert answer == {"error_code": "BAD_REQUEST", "message": "Invalid input. Not JSON."}
    plain = json.loads(one_line_error(415, b"This predictor only supports JSON\nGot text/plain"))
    assert plain["message"] == "This predictor only supports JSON"
    assert len(json.loads(one_line_error(400, b"y" * 10_000))["message"]) == 300
    assert json.loads(one_line_error(500, b""))["error_code"] == "INTERNAL_ERROR"


def call_asgi(app, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """One HTTP request through an ASGI app, its body in 1 KB chunks: (status, body)."""
    import asyncio

    chunks = [body[i : i + 1024] for i in range(0, len(body), 1024)] or [b""]
    incoming = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def echo_or_fail(scope, receive, send) -> None:
    """A stand-in scoring app: reads the whole body, fails with a stack trace on b"fail"."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if body == b"fail":
        status, answer = 400, json.dumps({"message": "bad\nInput: fail", "stack_trace": "T"})
    else:
        status, answer = 200, json.dumps({"predictions": len(body)})
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": answer.encode()})


def test_guarded_app_bounds_the_body_and_rewrites_errors_to_one_line() -> None:
    from imgpipe.serve import guarded

    app = guarded(echo_or_fail, max_body_bytes=4096)
    assert call_asgi(app, b"x" * 4096, []) == (200, b'{"predictions": 4096}')
    status, body = call_asgi(app, b"x" * 5000, [])  # no Content-Length: counted while read
    assert status == 413 and "larger than" in json.loads(body)["message"]
    status, body = call_asgi(app, b"x" * 10, [(b"content-length", b"999999")])
    assert status == 413
    status, body = call_asgi(app, b"fail", [])
    assert (status, json.loads(body)) == (400, {"error_code": "BAD_REQUEST", "message": "bad"})
