"""The served model's requests: a table of base64 images in, one answer per row out, the pixels
of concurrent requests classified together in one forward pass."""

from __future__ import annotations

import base64
import binascii
import json
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from imgpipe.classifier import best_labels

IMAGE_COLUMN = "image"
# Rows decoded at once: a request of 10,000 rows holds 256 decoded images at a time, not all.
ROWS_PER_CHUNK = 256
# Images per forward pass when concurrent requests are batched together.
MAX_BATCH = 256


@dataclass
class _Job:
    """One caller's pixels waiting for the batching thread, and its answer."""

    pixels: np.ndarray  # (N, H, W, C) uint8
    done: threading.Event = field(default_factory=threading.Event)
    proba: np.ndarray | None = None
    error: BaseException | None = None


class BatchedPredictor:
    """Calls `predict` (pixels -> probabilities) on the pixels of concurrent callers together.

    A server answers each request in its own thread; one-image requests from many clients would
    each pay a whole forward pass's fixed cost. Callers queue their pixels; one thread takes
    everything waiting (up to `max_batch` images), runs one forward pass and hands each caller
    its rows. With one caller at a time it is a plain call through a queue.
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int = MAX_BATCH):
        self._predict = predict
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(N, K) probabilities for (N, H, W, C) pixels, computed with whatever else waits."""
        job = _Job(pixels)
        with self._lock:
            if self._thread is None:  # started on first use: nothing runs at import or load
                self._thread = threading.Thread(
                    target=self._work, name="imgpipe-batcher", daemon=True
                )
                self._thread.start()
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.proba is not None
        return job.proba

    def _work(self) -> None:
        """Forever: take the first waiting job and the jobs behind it, predict, answer each."""
        while True:
            jobs = [self._queue.get()]
            images = len(jobs[0].pixels)
            while images < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                jobs.append(job)
                images += len(job.pixels)
            try:
                pixels = (
                    jobs[0].pixels if len(jobs) == 1 else np.concatenate([j.pixels for j in jobs])
                )
                proba = self._predict(pixels)
                start = 0
                for job in jobs:
                    job.proba = proba[start : start + len(job.pixels)]
                    start += len(job.pixels)
            except BaseException as error:  # every waiting caller gets the failure, none hangs
                for job in jobs:
                    job.error = error
            finally:
                for job in jobs:
                    job.done.set()


def image_bytes(value: Any) -> bytes | str:
    """A request cell as image bytes (raw bytes, or base64 text), or why it is not one."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return "the image text is not base64: send each image file base64-encoded"
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "no image in this row"
    return f"the image is {type(value).__name__}; send each image file as base64 text"


def answer_rows(
    frame: pd.DataFrame,
    *,
    decode: Callable[[bytes], np.ndarray | str],
    predict: Callable[[np.ndarray], np.ndarray],
    class_names: Sequence[str],
) -> pd.DataFrame:
    """One answer per request row, in order: `label` and `probability`, or `error` saying why
    that row could not be classified. A bad row never fails the others; a request without an
    `image` column gets that error on every row."""
    columns = [str(column) for column in frame.columns]
    if IMAGE_COLUMN not in columns:
        problem = (
            f"the request has no '{IMAGE_COLUMN}' column (it has {columns[:5]}): send one "
            f"column named '{IMAGE_COLUMN}' of base64-encoded image files"
        )
        return _rows([problem] * len(frame))
    cells = frame[IMAGE_COLUMN].tolist()
    answers: list[tuple[str, float] | str] = []
    for start in range(0, len(cells), ROWS_PER_CHUNK):
        decoded: list[np.ndarray | str] = []
        for cell in cells[start : start + ROWS_PER_CHUNK]:
            data = image_bytes(cell)
            decoded.append(data if isinstance(data, str) else decode(data))
        good = [index for index, pixels in enumerate(decoded) if not isinstance(pixels, str)]
        chunk: list[tuple[str, float] | str] = [p if isinstance(p, str) else "" for p in decoded]
        if good:
            proba = predict(np.stack([decoded[index] for index in good]))  # (n, K)
            for index, answer in zip(good, best_labels(proba, class_names), strict=True):
                chunk[index] = answer
        answers.extend(chunk)
    return _rows(answers)


def _rows(answers: Sequence[tuple[str, float] | str]) -> pd.DataFrame:
    """The response table: label, probability, error (None where not applicable)."""
    rows = [
        {"label": None, "probability": None, "error": answer}
        if isinstance(answer, str)
        else {"label": answer[0], "probability": answer[1], "error": None}
        for answer in answers
    ]
    return pd.DataFrame(rows, columns=["label", "probability", "error"])


def one_line_error(status: int, body: bytes) -> bytes:
    """An error response's body as JSON with a one-line `message` and no stack trace.

    MLflow's scoring server answers a bad request with its message, which can span lines and
    echo the whole request (a 20 MB body comes back in the message), and with Python's stack
    trace for unexpected errors; a client needs neither.
    """
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error_code = str(parsed.get("error_code") or "")
        message = str(parsed.get("message") or "")
    else:
        error_code, message = "", text
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    message = lines[0] if lines else f"request failed with HTTP status {status}"
    if len(message) > 300:
        message = message[:297] + "..."
    error_code = error_code or ("BAD_REQUEST" if 400 <= status < 500 else "INTERNAL_ERROR")
    return json.dumps({"error_code": error_code, "message": message}).encode()
