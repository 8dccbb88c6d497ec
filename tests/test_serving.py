"""The served model's request handling: per-row answers, bad rows, batching of concurrent calls,
the bounds on one request's work (rows, pixels, deadline) and the HTTP guard around MLflow's app.
The servers themselves, under hostile clients: tests/test_serve_hostile.py."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imgpipe.images import decode_checked
from imgpipe.serving import (
    BatchedPredictor,
    DeadlineExceededError,
    PixelBudget,
    RequestBounds,
    RequestRefusedError,
    ServeLimits,
    answer_rows,
    image_bytes,
    one_line_error,
)

CLASSES = ["cat", "dog"]


def png(value: int, size: int = 1) -> bytes:
    """A size x size grey PNG of one value: 0 is a cat, 1 a dog, to the stand-in model."""
    buffer = io.BytesIO()
    Image.new("L", (size, size), value).save(buffer, format="PNG")
    return buffer.getvalue()


CAT, DOG = png(0), png(1)


def decode(data: bytes) -> np.ndarray | str:
    """The real decoding, to a 1x1 grey view."""
    return decode_checked(data, height=1, width=1, color="grayscale")


def fake_predict(pixels: np.ndarray, deadline: float | None = None) -> np.ndarray:
    """Probability 0.9 for the class the pixel value names."""
    proba = np.full((len(pixels), 2), 0.1, dtype=np.float32)
    proba[np.arange(len(pixels)), pixels.reshape(len(pixels))] = 0.9
    return proba


def bounds(**limits: float) -> RequestBounds:
    """Bounds with these limits (the rest the defaults), a deadline from now, a fresh budget."""
    chosen = ServeLimits(**limits)  # type: ignore[arg-type]
    budget = PixelBudget(int(chosen.decoding_megapixels * 1e6))
    return RequestBounds(chosen, time.monotonic() + chosen.deadline_s, budget)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def answer(frame: pd.DataFrame, **limits: float) -> pd.DataFrame:
    return answer_rows(
        frame, decode=decode, predict=fake_predict, class_names=CLASSES, bounds=bounds(**limits)
    )


def test_each_row_gets_its_label_or_its_own_error_in_order() -> None:
    frame = pd.DataFrame(
        {"image": [b64(DOG), "not base64 at all!", b64(b"junk"), b64(CAT), None, 7]}
    )
    out = answer(frame)
    assert list(out.columns) == ["label", "probability", "error"]
    assert out["label"].tolist() == ["dog", None, None, "cat", None, None]
    assert out["probability"].tolist()[0] == pytest.approx(0.9)
    errors = out["error"].tolist()
    assert errors[0] is None and errors[3] is None
    assert "not base64" in errors[1]
    assert errors[2].startswith("not an image in an accepted format")
    assert errors[4] == "no image in this row"
    assert "int" in errors[5] and "base64" in errors[5]


def test_raw_bytes_are_accepted_as_they_are() -> None:
    assert image_bytes(CAT) == CAT
    assert image_bytes(b64(CAT)) == CAT


def test_a_request_without_an_image_column_gets_one_clear_error_per_row() -> None:
    out = answer(pd.DataFrame({"img": [b64(CAT), b64(DOG)]}))
    assert out["label"].tolist() == [None, None]
    message = out["error"].iloc[0]
    assert "no 'image' column" in message and "['img']" in message and "\n" not in message


def test_many_rows_are_decoded_and_predicted_chunk_by_chunk() -> None:
    seen: list[int] = []

    def counting_predict(pixels: np.ndarray, deadline: float) -> np.ndarray:
        seen.append(len(pixels))
        return fake_predict(pixels)

    frame = pd.DataFrame({"image": [b64(CAT), b64(DOG)] * 300})
    out = answer_rows(
        frame, decode=decode, predict=counting_predict, class_names=CLASSES, bounds=bounds()
    )
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
    message = "Failed to predict data '   image\n0  abc'. \nError: the request passed its deadline"
    failed = json.dumps({"error_code": "DEADLINE_EXCEEDED", "message": message}).encode()
    assert json.loads(one_line_error(504, failed))["message"] == "the request passed its deadline"


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
    from imgpipe.serve import ServerSettings, guarded

    app = guarded(echo_or_fail, ServerSettings(max_body_bytes=4096), lambda: 0.0)
    assert call_asgi(app, b"x" * 4096, []) == (200, b'{"predictions": 4096}')
    status, body = call_asgi(app, b"x" * 5000, [])  # no Content-Length: counted while read
    assert status == 413 and "larger than" in json.loads(body)["message"]
    status, body = call_asgi(app, b"x" * 10, [(b"content-length", b"999999")])
    assert status == 413
    status, body = call_asgi(app, b"fail", [])
    assert (status, json.loads(body)) == (400, {"error_code": "BAD_REQUEST", "message": "bad"})


def test_guarded_app_refuses_deep_json_and_too_many_values_before_the_app_parses_them() -> None:
    from imgpipe.serve import MAX_JSON_DEPTH, ServerSettings, guarded

    settings = ServerSettings(max_body_bytes=10**7, limits=ServeLimits(max_rows=10))
    app = guarded(echo_or_fail, settings, lambda: 0.0)
    status, body = call_asgi(app, b"[" * 100_000, [])
    assert status == 400 and "nests deeper than" in json.loads(body)["message"]
    nested = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH  # as deep as allowed: passed on
    assert call_asgi(app, nested, [])[0] == 200
    status, body = call_asgi(app, b"[" + b"1," * 200 + b"1]", [])  # 201 values, 10 rows
    assert status == 413 and "--max-rows" in json.loads(body)["message"]


def test_nesting_depth_counts_across_its_chunks() -> None:
    from imgpipe.serve import nesting_depth

    assert nesting_depth(b'{"dataframe_split": {"columns": ["image"], "data": [["a"]]}}') == 4
    deep = b"[" * 3_000_000 + b"]" * 3_000_000  # three 1 MB chunks of brackets
    assert nesting_depth(deep) == 3_000_000
    assert nesting_depth(b"[]" * 2_000_000 + b"[[[[[[[[[[" * 10) == 100


def test_guarded_app_makes_mlflow_request_limit_a_413_and_ping_fail_when_stuck() -> None:
    from imgpipe.serve import ServerSettings, guarded

    async def refusing(scope, receive, send) -> None:
        await receive()
        message = "Failed to predict data '  image\n0  a'. \nError: the request has 2,000 rows"
        answer = {"error_code": "REQUEST_LIMIT_EXCEEDED", "message": message}
        await send({"type": "http.response.start", "status": 429, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    stalled = [0.0]
    app = guarded(refusing, ServerSettings(), lambda: stalled[0])
    status, body = call_asgi(app, b"{}", [])
    assert (status, json.loads(body)) == (
        413,
        {"error_code": "REQUEST_TOO_LARGE", "message": "the request has 2,000 rows"},
    )
    stalled[0] = ServeLimits().stuck_after_s + 1
    ping = {"type": "http", "method": "GET", "path": "/ping", "headers": []}
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    import asyncio

    asyncio.run(app(ping, None, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error_code"] == "MODEL_STUCK"


# --------------------------------------------------------------------------- bounds


def test_a_request_over_the_row_bound_is_refused_before_anything_is_decoded() -> None:
    frame = pd.DataFrame({"image": [b64(CAT)] * 11})
    with pytest.raises(RequestRefusedError, match=r"11 rows \(limit 10\): send at most 10"):
        answer(frame, max_rows=10)
    assert len(answer(frame.head(10), max_rows=10)) == 10


def test_pixels_are_counted_from_the_headers_and_bounded_before_any_decoding() -> None:
    decoded: list[int] = []

    def counting_decode(data: bytes) -> np.ndarray | str:
        decoded.append(len(data))
        return decode(data)

    big = png(0, size=1000)  # 1 megapixel
    frame = pd.DataFrame({"image": [b64(big)] * 3})
    with pytest.raises(RequestRefusedError, match=r"3\.0 megapixels \(limit 2\.5 per request\)"):
        answer_rows(
            frame, decode=counting_decode, predict=fake_predict, class_names=CLASSES,
            bounds=bounds(max_megapixels=2.5),
        )  # fmt: skip
    assert decoded == []  # refused from the headers alone
    # one image over the whole bound is that row's error; the other rows are answered
    out = answer(pd.DataFrame({"image": [b64(big), b64(DOG)]}), max_megapixels=0.5)
    assert out["label"].tolist() == [None, "dog"]
    assert "1.0 megapixels, over the server's limit of 0.5" in out["error"].iloc[0]


def test_past_its_deadline_a_request_stops_decoding_and_its_rows_are_dropped() -> None:
    decoded: list[int] = []

    def slow_decode(data: bytes) -> np.ndarray | str:
        decoded.append(1)
        time.sleep(0.1)
        return decode(data)

    frame = pd.DataFrame({"image": [b64(CAT)] * 50})  # 5 s of decoding
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError, match=r"deadline of 0\.35 s with .* not computed"):
        answer_rows(
            frame, decode=slow_decode, predict=fake_predict, class_names=CLASSES,
            bounds=bounds(deadline_s=0.35),
        )  # fmt: skip
    assert time.monotonic() - start < 1
    assert 3 <= len(decoded) <= 6  # the rest were never decoded


def test_a_forward_pass_that_blocks_shows_as_stalled_and_late_callers_are_dropped() -> None:
    release = threading.Event()
    computed: list[int] = []

    def blocking_predict(pixels: np.ndarray) -> np.ndarray:
        computed.append(len(pixels))
        release.wait(30)
        return np.zeros((len(pixels), 2), np.float32)

    predictor = BatchedPredictor(blocking_predict)
    first = threading.Thread(target=predictor, args=(np.zeros((1, 1, 1, 1), np.uint8),))
    first.start()
    time.sleep(0.3)
    assert predictor.stalled_for() >= 0.2
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="did not answer this request's 5 images"):
        predictor(np.zeros((5, 1, 1, 1), np.uint8), time.monotonic() + 0.3)
    assert time.monotonic() - start < 1  # the caller did not wait for the stuck pass
    release.set()
    first.join(10)
    assert predictor(np.zeros((2, 1, 1, 1), np.uint8)).shape == (2, 2)
    assert computed == [1, 2]  # the late caller's 5 images were dropped, not computed
    assert predictor.stalled_for() == 0.0


def test_the_pixel_budget_makes_decoders_wait_for_room_until_their_deadline() -> None:
    budget = PixelBudget(100)
    order: list[str] = []
    with budget.hold(80, time.monotonic() + 5):

        def second() -> None:
            with budget.hold(50, time.monotonic() + 5):
                order.append("second decodes")

        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.2)
        order.append("first done")
        late = pytest.raises(DeadlineExceededError, match="busy decoding other requests")
        with late, budget.hold(50, time.monotonic() + 0.1):
            pass
    waiter.join(5)
    assert order == ["first done", "second decodes"]
    with budget.hold(500, time.monotonic() + 1):  # larger than the budget: decodes alone
        assert budget.used == 500


def test_bodies_held_at_once_are_bounded_over_all_requests() -> None:
    import asyncio

    from imgpipe.serve import ServerSettings, guarded

    answering = asyncio.Event()

    async def slow_app(scope, receive, send) -> None:
        await receive()
        await answering.wait()  # holds its body until told to answer
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = guarded(slow_app, ServerSettings(max_body_bytes=1000, max_held_bytes=1500), lambda: 0.0)

    async def request(body: bytes) -> int:
        sent: list[dict] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": []}
        await app(scope, receive, send)
        return sent[0]["status"]

    async def three() -> list[int]:
        first = asyncio.create_task(request(b"x" * 1000))
        await asyncio.sleep(0.05)  # the first body is held
        second = await request(b"y" * 800)  # 1,800 bytes together: refused at once
        answering.set()
        return [await first, second, await request(b"z" * 800)]  # room again

    assert asyncio.run(three()) == [200, 503, 200]
