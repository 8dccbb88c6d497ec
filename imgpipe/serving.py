"""The served model's requests: a table of base64 images in, one answer per row out, the pixels
of concurrent requests classified together in one forward pass, and the bounds on the work one
request may cause (rows, decoded pixels, a deadline)."""

from __future__ import annotations

import base64
import binascii
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from imgpipe.classifier import best_labels

IMAGE_COLUMN = "image"
# Rows decoded at once: a request of 1,000 rows holds 256 decoded images at a time, not all.
ROWS_PER_CHUNK = 256
# Images per forward pass when concurrent requests are batched together.
MAX_BATCH = 256


@dataclass(frozen=True)
class ServeLimits:
    """The bounds on one request's work: the defaults of imgpipe-serve's flags, and what any
    other server of the logged model (`mlflow models serve`, load_model) gets.

    The pixel bounds come from the decoding cost measured per megapixel (docs/benchmarks.md):
    lossy WebP of noise, the costliest accepted format, takes 30 ms of CPU per megapixel (up to
    twice that on cores shared with other work) and 16 bytes per pixel while it decodes, so 32
    megapixels a request cost 1 to 2 CPU-seconds and 0.5 GB at most; 40 megapixels decoding at
    once (one such request and others' small images) bound decoding memory to about 0.64 GB.
    """

    max_rows: int = 1024  # rows (images) per request
    max_megapixels: float = 32  # decoded pixels per request, counted from the image headers
    decoding_megapixels: float = 40  # pixels being decoded at once over all requests (memory)
    deadline_s: float = 15  # a request's rows not computed by then are dropped
    stuck_after_s: float = 20  # /ping fails while one forward pass takes longer than this

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)


class RequestRefusedError(Exception):
    """A request over a bound (rows, pixels): refused whole, with what to do (HTTP 413)."""


class DeadlineExceededError(Exception):
    """A request's deadline passed: its rows not yet computed were dropped (HTTP 504)."""


class PixelBudget:
    """The pixels being decoded at once, over all requests: a decoder holds an image's header
    pixel count while it decodes it, and waits (until its request's deadline) for room, so that
    decoding memory stays bounded however many requests arrive together."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._room = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, deadline: float) -> Iterator[None]:
        """Hold `pixels` of the budget for the block; DeadlineExceededError if no room in time.
        An image larger than the whole budget waits until it decodes alone."""
        with self._room:
            while self.used and self.used + pixels > self.capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceededError(
                        "the server was busy decoding other requests until this request's "
                        "deadline: retry in a few seconds, or send fewer pixels per request"
                    )
                self._room.wait(remaining)
            self.used += pixels
        try:
            yield
        finally:
            with self._room:
                self.used -= pixels
                self._room.notify_all()


@dataclass(frozen=True)
class RequestBounds:
    """One request's limits, its deadline (time.monotonic()) and the shared decoding budget."""

    limits: ServeLimits
    deadline: float
    budget: PixelBudget

    def check_deadline(self, rows_left: int) -> None:
        """DeadlineExceededError when the deadline has passed, saying how many rows it drops."""
        if time.monotonic() > self.deadline:
            raise DeadlineExceededError(
                f"the request passed its deadline of {self.limits.deadline_s:g} s with "
                f"{rows_left} rows not computed (dropped): send fewer or smaller images per "
                "request, or retry when the server is less busy"
            )


# Set by imgpipe-serve for each request (its flags and the request's arrival); absent under
# any other server, where the defaults hold from the moment predict is called.
CURRENT_BOUNDS: ContextVar[RequestBounds | None] = ContextVar("imgpipe_bounds", default=None)
_default_budget: list[PixelBudget] = []
_default_lock = threading.Lock()


def current_bounds() -> RequestBounds:
    """This request's bounds: imgpipe-serve's, or the defaults starting now."""
    bounds = CURRENT_BOUNDS.get()
    if bounds is not None:
        return bounds
    limits = ServeLimits()
    with _default_lock:
        if not _default_budget:
            _default_budget.append(PixelBudget(int(limits.decoding_megapixels * 1e6)))
    return RequestBounds(limits, time.monotonic() + limits.deadline_s, _default_budget[0])


@dataclass
class _Job:
    """One caller's pixels waiting for the batching thread, and its answer."""

    pixels: np.ndarray  # (N, H, W, C) uint8
    deadline: float | None = None  # time.monotonic(): past it, the job is dropped, not computed
    done: threading.Event = field(default_factory=threading.Event)
    proba: np.ndarray | None = None
    error: BaseException | None = None

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


class BatchedPredictor:
    """Calls `predict` (pixels -> probabilities) on the pixels of concurrent callers together.

    A server answers each request in its own thread; one-image requests from many clients would
    each pay a whole forward pass's fixed cost. Callers queue their pixels; one thread takes
    everything waiting (up to `max_batch` images), drops the callers whose deadline has passed,
    runs one forward pass and hands each caller its rows. With one caller at a time it is a
    plain call through a queue. `stalled_for()` tells how long the current pass has run.
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int = MAX_BATCH):
        self._predict = predict
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._busy_since: float | None = None  # time.monotonic() when the current pass began

    def __call__(self, pixels: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """(N, K) probabilities for (N, H, W, C) pixels, computed with whatever else waits;
        DeadlineExceededError when they are not computed by `deadline` (time.monotonic())."""
        job = _Job(pixels, deadline)
        with self._lock:
            if self._thread is None:  # started on first use: nothing runs at import or load
                self._thread = threading.Thread(
                    target=self._work, name="imgpipe-batcher", daemon=True
                )
                self._thread.start()
        self._queue.put(job)
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not job.done.wait(wait):
            raise DeadlineExceededError(
                f"the model did not answer this request's {len(pixels)} images by its "
                "deadline: retry later (if it keeps happening, the server is stuck: restart it)"
            )
        if job.error is not None:
            raise job.error
        assert job.proba is not None
        return job.proba

    def stalled_for(self) -> float:
        """Seconds the current forward pass has run (0 when the thread is idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def _take(self) -> list[_Job]:
        """The first waiting job and the jobs behind it (up to max_batch images); jobs past
        their deadline are answered with DeadlineExceededError and left out, not computed."""
        jobs: list[_Job] = []
        images = 0
        job: _Job | None = self._queue.get()
        while job is not None:
            if job.expired():
                job.error = DeadlineExceededError("the request passed its deadline in the queue")
                job.done.set()
            else:
                jobs.append(job)
                images += len(job.pixels)
            try:
                job = self._queue.get_nowait() if images < self._max_batch else None
            except queue.Empty:
                job = None
        return jobs

    def _work(self) -> None:
        """Forever: take the waiting jobs, predict, answer each."""
        while True:
            jobs = self._take()
            if not jobs:
                continue
            self._busy_since = time.monotonic()
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
                self._busy_since = None
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


def _header_size(data: bytes) -> tuple[int, int] | str:
    """(width, height) from an image's header, or why it is refused: libjpeg-turbo's header
    reader for JPEGs (1 us, against Pillow's 50), imgpipe.images.image_size for the rest."""
    import simplejpeg

    from imgpipe.images import image_size

    if data.startswith(b"\xff\xd8\xff"):  # JPEG (an accepted format): the decoder checks the rest
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return width, height
        except ValueError:
            pass  # corrupt or unusual: Pillow's header reader says why
    return image_size(data)


def _counted_rows(cells: Sequence[Any], bounds: RequestBounds) -> list[tuple[bytes, int] | str]:
    """Each cell as (image bytes, header pixels), or its row's error; RequestRefusedError when
    the images hold more pixels than the request may decode. Nothing is decoded here."""
    limit = bounds.limits.max_pixels
    rows: list[tuple[bytes, int] | str] = []
    for done, cell in enumerate(cells):
        if done % ROWS_PER_CHUNK == 0:
            bounds.check_deadline(len(cells) - done)
        data = image_bytes(cell)
        size = data if isinstance(data, str) else _header_size(data)  # the header only
        if isinstance(size, str):
            rows.append(size)
        elif size[0] * size[1] > limit:
            rows.append(
                f"the image has {size[0] * size[1] / 1e6:.1f} megapixels, over the server's "
                f"limit of {limit / 1e6:g} per request: send a smaller image"
            )
        else:
            rows.append((data, size[0] * size[1]))  # type: ignore[arg-type]
    total = sum(row[1] for row in rows if not isinstance(row, str))
    if total > bounds.limits.max_pixels:
        raise RequestRefusedError(
            f"the request's images hold {total / 1e6:.1f} megapixels (limit "
            f"{bounds.limits.max_megapixels:g} per request): send fewer or smaller images per "
            "request (or start imgpipe-serve with a larger --max-megapixels)"
        )
    return rows


def check_rows(count: int, bounds: RequestBounds) -> None:
    """RequestRefusedError when a request has more rows than allowed."""
    if count > bounds.limits.max_rows:
        raise RequestRefusedError(
            f"the request has {count:,} rows (limit {bounds.limits.max_rows:,}): send at most "
            f"{bounds.limits.max_rows:,} images per request (or start imgpipe-serve with a "
            "larger --max-rows)"
        )


def answer_rows(
    frame: pd.DataFrame,
    *,
    decode: Callable[[bytes], np.ndarray | str],
    predict: Callable[[np.ndarray, float], np.ndarray],
    class_names: Sequence[str],
    bounds: RequestBounds,
) -> pd.DataFrame:
    """One answer per request row, in order: `label` and `probability`, or `error` saying why
    that row could not be classified. A bad row never fails the others; a request without an
    `image` column gets that error on every row. Over its row or pixel bound the request is
    refused before anything is decoded (RequestRefusedError); past its deadline the rows not
    yet computed are dropped (DeadlineExceededError). Each image is decoded once."""
    check_rows(len(frame), bounds)
    columns = [str(column) for column in frame.columns]
    if IMAGE_COLUMN not in columns:
        problem = (
            f"the request has no '{IMAGE_COLUMN}' column (it has {columns[:5]}): send one "
            f"column named '{IMAGE_COLUMN}' of base64-encoded image files"
        )
        return _rows([problem] * len(frame))
    rows = _counted_rows(frame[IMAGE_COLUMN].tolist(), bounds)
    answers: list[tuple[str, float] | str] = []
    for start in range(0, len(rows), ROWS_PER_CHUNK):
        decoded: list[np.ndarray | str] = []
        for row in rows[start : start + ROWS_PER_CHUNK]:
            if isinstance(row, str):
                decoded.append(row)
                continue
            bounds.check_deadline(len(rows) - start - len(decoded))
            with bounds.budget.hold(row[1], bounds.deadline):
                decoded.append(decode(row[0]))
        good = [index for index, pixels in enumerate(decoded) if not isinstance(pixels, str)]
        chunk: list[tuple[str, float] | str] = [p if isinstance(p, str) else "" for p in decoded]
        if good:
            bounds.check_deadline(len(rows) - start)
            proba = predict(np.stack([decoded[index] for index in good]), bounds.deadline)
            for index, answer in zip(good, best_labels(proba, class_names), strict=True):
                chunk[index] = answer
        answers.extend(chunk)
    return _rows(answers)


def answer_pixels(
    pixels: np.ndarray,
    *,
    input_shape: tuple[int, int, int],
    predict: Callable[[np.ndarray, float], np.ndarray],
    class_names: Sequence[str],
    bounds: RequestBounds,
) -> pd.DataFrame:
    """`label`, `probability` and one `p_<class>` column per class for uint8 pixels
    (N, H, W, C) in the model's view, within the request's row bound and deadline."""
    check_rows(len(pixels), bounds)
    if pixels.ndim != 4 or pixels.shape[1:] != input_shape:
        raise ValueError(
            f"expected pixels of shape (N, {', '.join(map(str, input_shape))}), got "
            f"{pixels.shape}: send images in the 'image' column instead"
        )
    pixels = pixels.astype(np.uint8, copy=False)
    bounds.check_deadline(len(pixels))
    proba = predict(pixels, bounds.deadline)
    frame = pd.DataFrame(proba, columns=[f"p_{n}" for n in class_names])
    frame.insert(0, "label", [class_names[i] for i in proba.argmax(axis=1)])
    frame.insert(1, "probability", proba.max(axis=1))
    return frame


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
    echo the whole request (a 20 MB body comes back in the message; a failed predict or schema
    check is "Failed to ... data '<the request>' ... Error: <why>", of which only <why> is
    kept), and with Python's stack trace for unexpected errors; a client needs neither.
    """
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        error_code = str(parsed.get("error_code") or "")
        message = str(parsed.get("message") or "")
    else:
        error_code, message = "", text
    if message.startswith("Failed to ") and "Error: " in message:  # MLflow's echo of the data
        message = message.rsplit("Error: ", 1)[1]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    message = lines[0] if lines else f"request failed with HTTP status {status}"
    if len(message) > 300:
        message = message[:297] + "..."
    if error_code == "REQUEST_LIMIT_EXCEEDED":  # a bound of imgpipe.serving: status 413
        error_code = "REQUEST_TOO_LARGE"
    elif not error_code:
        error_code = {504: "DEADLINE_EXCEEDED"}.get(
            status, "BAD_REQUEST" if 400 <= status < 500 else "INTERNAL_ERROR"
        )
    return json.dumps({"error_code": error_code, "message": message}).encode()
