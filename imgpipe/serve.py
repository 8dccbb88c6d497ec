"""Command `imgpipe-serve`: serve a logged or registered model over HTTP with MLflow's scoring
protocol (the same requests and answers as `mlflow models serve`), plus what a server in front
of untrusted clients needs: bounds on the request body (413, chunked or not), on the bodies held
at once, on JSON nesting, on each request's rows, pixels and time (imgpipe.serving), on
connections and on the time a client may take to send its request; a /ping that fails while
the model is stuck; errors as one JSON line without a stack trace; and a log line naming the
model version it loaded."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from imgpipe.serving import ServeLimits

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# Deeper JSON is refused before MLflow parses it (Python's parser fails past ~1,000 levels).
# A valid request nests 4 levels ({"dataframe_split": {"data": [[...]]}}), a tensor 6 or so.
MAX_JSON_DEPTH = 64
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but the four brackets
# Many tiny JSON values cost far more to parse than their bytes (200,000 one-letter rows: 2.4
# MB, +87 MB and a second of CPU in MLflow's parser): a body with more commas than max_rows
# rows of this many values each is refused before it is parsed. A request of base64 images has
# one comma a row.
VALUES_PER_ROW = 16


@dataclass(frozen=True)
class ServerSettings:
    """imgpipe-serve's bounds (its flags); the per-request ones are in `limits`."""

    max_body_bytes: int = 64_000_000  # one request body
    max_held_bytes: int = 256_000_000  # the bodies of all requests being read or answered
    read_timeout_s: float = 5  # to send a whole request (headers and body)
    max_connections: int = 500  # open connections (uvicorn's limit_concurrency)
    limits: ServeLimits = field(default_factory=ServeLimits)


class _RefusedError(Exception):
    """A request refused by the guard before the app sees it: the status and the JSON line."""

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = json.dumps({"error_code": error_code, "message": message}).encode()


class _DisconnectedError(Exception):
    """The client went away (or was dropped) before its body was read."""


async def _answer(send: Send, status: int, body: bytes, *, close: bool = False) -> None:
    """Send a whole JSON answer: its start, then its body in one message."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def nesting_depth(body: bytes) -> int:
    """How deep the brackets in a JSON body nest (brackets inside strings counted too, which can
    only overstate it); 1 MB of brackets at a time."""
    import numpy as np

    brackets = body.translate(None, _BRACKETS)
    steps = np.zeros(256, np.int64)
    steps[[ord("["), ord("{")]], steps[[ord("]"), ord("}")]] = 1, -1
    deepest = level = 0
    for start in range(0, len(brackets), 1 << 20):
        chunk = np.cumsum(steps[np.frombuffer(brackets[start : start + (1 << 20)], np.uint8)])
        deepest = max(deepest, level + int(chunk.max()))
        level += int(chunk[-1])
    return deepest


class _Held:
    """Bytes of request bodies held at once over all requests (the event loop's thread only)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.total = 0

    def take(self, count: int) -> bool:
        if self.total + count > self.capacity:
            return False
        self.total += count
        return True


class _Request:
    """One request's body as the guard reads it: bounded, counted in `held`, drained on refusal
    so that the client reads the 413 instead of a connection reset."""

    def __init__(self, scope: Scope, receive: Receive, settings: ServerSettings, held: _Held):
        self.headers = dict(scope.get("headers") or [])
        self.receive = receive
        self.settings = settings
        self.held = held
        self.taken = 0  # bytes of `held` this request holds

    def too_large(self) -> _RefusedError:
        return _RefusedError(
            413,
            "REQUEST_TOO_LARGE",
            f"the request is larger than {self.settings.max_body_bytes / 1e6:g} MB: send fewer "
            "rows per request (or start imgpipe-serve with a larger --max-request-mb)",
        )

    async def body(self) -> bytes:
        """The whole body; _RefusedError over a bound, _DisconnectedError if the client left."""
        limit = self.settings.max_body_bytes
        length = self.headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            if int(length) <= 2 * limit and self.headers.get(b"expect") != b"100-continue":
                await self.drain(int(length))
            raise self.too_large()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                raise _DisconnectedError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body"):
                    await self.drain(limit)
                raise self.too_large()
            self._hold(len(chunk))
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _hold(self, count: int) -> None:
        if not self.held.take(count):
            raise _RefusedError(
                503,
                "TEMPORARILY_UNAVAILABLE",
                f"the server holds {self.held.total / 1e6:.0f} MB of requests already (limit "
                f"{self.held.capacity / 1e6:g} MB): retry in a few seconds",
            )
        self.taken += count

    async def drain(self, most: int) -> None:
        """Read and drop up to `most` more bytes of the body (or until it ends)."""
        drained = 0
        while drained <= most:
            message = await self.receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return
            drained += len(message.get("body", b""))


class _ErrorRewriter:
    """The app's send: answers pass through; an error answer (4xx, 5xx) is held back until it
    can be rewritten as one JSON line (MLflow's REQUEST_LIMIT_EXCEEDED becomes a 413)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.error_start: Message | None = None
        self.error_body: list[bytes] = []

    async def send(self, message: Message) -> None:
        from imgpipe.serving import one_line_error

        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.error_start = message  # held back until its body is rewritten
            return
        if message["type"] == "http.response.body" and self.error_start is not None:
            self.error_body.append(message.get("body", b""))
            if not message.get("more_body"):
                status = self.error_start["status"]
                body = one_line_error(status, b"".join(self.error_body))
                if json.loads(body)["error_code"] == "REQUEST_TOO_LARGE":
                    status = 413  # MLflow's REQUEST_LIMIT_EXCEEDED (429): a request bound
                await _answer(self._send, status, body)
            return
        await self._send(message)


def guarded(app: App, settings: ServerSettings, stalled_for: Callable[[], float]) -> App:
    """An ASGI app around MLflow's scoring app: the body read (bounded) before the app sees it,
    JSON nested too deep refused, the request's bounds and deadline set for the model
    (imgpipe.serving.CURRENT_BOUNDS), /ping failing while the model is stuck, and every error
    answer one JSON line, {"error_code", "message"}, with no stack trace."""
    from imgpipe.serving import CURRENT_BOUNDS, PixelBudget, RequestBounds

    limits = settings.limits
    held = _Held(settings.max_held_bytes)
    budget = PixelBudget(int(limits.decoding_megapixels * 1e6))

    async def guarded_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if scope["path"] in ("/ping", "/health") and stalled_for() > limits.stuck_after_s:
            stuck = _RefusedError(503, "MODEL_STUCK", _stuck_message(stalled_for(), limits))
            await _answer(send, stuck.status, stuck.body)
            return
        bounds = RequestBounds(limits, time.monotonic() + limits.deadline_s, budget)
        request = _Request(scope, receive, settings, held)
        try:
            body = await request.body()
            if nesting_depth(body) > MAX_JSON_DEPTH:
                raise _RefusedError(400, "BAD_REQUEST", _too_deep_message())
            if body.count(b",") >= limits.max_rows * VALUES_PER_ROW:  # before MLflow parses it
                raise _RefusedError(413, "REQUEST_TOO_LARGE", _too_many_values(limits))
            CURRENT_BOUNDS.set(bounds)  # this request's task (and the threads it starts) only
            await app(scope, _replay(body, receive), _ErrorRewriter(send).send)
        except _RefusedError as refused:
            await _answer(send, refused.status, refused.body, close=refused.status != 400)
        except _DisconnectedError:
            return
        finally:
            held.total -= request.taken

    return guarded_app


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the whole body once, then waits for the client's disconnect."""
    given = [False]

    async def replay() -> Message:
        if given[0]:
            return await receive()
        given[0] = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _stuck_message(seconds: float, limits: ServeLimits) -> str:
    return (
        f"the model has been computing one batch for {seconds:.0f} s (limit "
        f"{limits.stuck_after_s:g} s): the server is stuck; restart it"
    )


def _too_many_values(limits: ServeLimits) -> str:
    return (
        f"the JSON body holds more values than {limits.max_rows:,} rows can need: send at most "
        f"{limits.max_rows:,} images per request in one 'image' column (or start imgpipe-serve "
        "with a larger --max-rows)"
    )


def _too_deep_message() -> str:
    return (
        f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels: send "
        '{"dataframe_split": {"columns": ["image"], "data": [["<base64 image>"], ...]}}'
    )


def timed_protocol(read_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a timer: a client that has not sent its whole request
    (headers and body) within read_timeout_s of connecting, or of its previous answer, is
    dropped. (uvicorn's own timers start only after an answer.)"""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class RequestTimerProtocol(H11Protocol):
        _timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            if not self.transport.is_closing():
                self._timer = self.loop.call_later(read_timeout_s, self._expire)

        def _expire(self) -> None:
            cycle = self.cycle
            if cycle is not None and not cycle.more_body and not cycle.response_complete:
                return  # the whole request came in time: the app is answering it
            if not self.transport.is_closing():
                self.transport.close()

    return RequestTimerProtocol


def server_config(app: App, host: str, port: int, settings: ServerSettings) -> Any:
    """uvicorn's configuration for the guarded app: the request timer, the connection cap."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=timed_protocol(settings.read_timeout_s),
        limit_concurrency=settings.max_connections,  # more connections get a 503
        timeout_keep_alive=5,  # an idle kept-alive connection is closed after 5 s
    )


def describe_model(model_uri: str, model: Any) -> str:
    """Which model a URI resolved to: registered name, version, alias, run id (or the run)."""
    run_id = getattr(model.metadata, "run_id", None) or "unknown"
    registered = model_uri.removeprefix("models:/")
    if registered == model_uri or not ("@" in registered or "/" in registered):
        return f"{model_uri}, not a registered model version (run {run_id})"
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    alias = model_uri.split("@", 1)[1] if "@" in model_uri else None
    try:
        client = MlflowClient()
        name, version = get_model_name_and_version(client, model_uri)
        run_id = client.get_model_version(name, version).run_id or run_id
    except Exception as error:  # the model loaded: a registry lookup failure only loses detail
        first_line = (str(error).strip().splitlines() or ["unknown error"])[0]
        return f"{model_uri} (run {run_id}; registry version unknown: {first_line})"
    named = f", alias {alias}" if alias else ""
    return f"{model_uri} = registered model {name} version {version}{named} (run {run_id})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgpipe-serve",
        description="Serve a model logged by the pipeline: POST /invocations with MLflow's JSON "
        "scoring format, one column `image` of base64 image files.",
    )
    default, limits = ServerSettings(), ServeLimits()
    parser.add_argument(
        "model_uri",
        help="models:/imgpipe-cnn-production@champion, runs:/<run id>/model, or a local path",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5001)
    flags: list[tuple[str, type, float, str]] = [
        ("--max-request-mb", float, default.max_body_bytes / 1e6,
         "request bodies over this get a 413"),
        ("--max-held-mb", float, default.max_held_bytes / 1e6,
         "request bodies held at once over all requests; a request past it gets a 503"),
        ("--max-rows", int, limits.max_rows, "images per request; more get a 413"),
        ("--max-megapixels", float, limits.max_megapixels,
         "pixels per request, from the image headers, before decoding; more get a 413 "
         "(the default costs about 2 CPU-seconds of decoding)"),
        ("--decoding-megapixels", float, limits.decoding_megapixels,
         "pixels being decoded at once over all requests (bounds the memory)"),
        ("--deadline", float, limits.deadline_s,
         "seconds a request may take; then its rows not yet computed are dropped: a 504"),
        ("--stuck-after", float, limits.stuck_after_s,
         "/ping answers 503 while one forward pass has run longer than this (seconds)"),
        ("--read-timeout", float, default.read_timeout_s,
         "seconds a client has to send its whole request (headers and body)"),
        ("--max-connections", int, default.max_connections,
         "open connections; requests beyond get a 503"),
    ]  # fmt: skip
    for flag, kind, value, meaning in flags:
        parser.add_argument(flag, type=kind, default=value, help=f"{meaning} (default: {value:g})")
    return parser


def _settings(args: argparse.Namespace) -> ServerSettings:
    limits = ServeLimits(
        max_rows=args.max_rows,
        max_megapixels=args.max_megapixels,
        decoding_megapixels=args.decoding_megapixels,
        deadline_s=args.deadline,
        stuck_after_s=args.stuck_after,
    )
    return ServerSettings(
        max_body_bytes=int(args.max_request_mb * 1e6),
        max_held_bytes=int(args.max_held_mb * 1e6),
        read_timeout_s=args.read_timeout,
        max_connections=args.max_connections,
        limits=limits,
    )


def main(argv: list[str] | None = None) -> int:
    """Load the model, then answer POST /invocations (and GET /ping) until stopped."""
    args = _parser().parse_args(argv)
    settings = _settings(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # MLflow's own timeout answers 504 but leaves the work running: ours comes first and stops it
    timeout = math.ceil(settings.limits.deadline_s + 5)
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(timeout)

    import uvicorn
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    try:
        model = scoring_server.load_model_with_mlflow_config(args.model_uri)
    except (MlflowException, OSError) as error:
        first_line = (str(error).strip().splitlines() or ["unknown error"])[0]
        print(
            f"imgpipe-serve: cannot load {args.model_uri}: {first_line} (check the URI, e.g. "
            "models:/imgpipe-cnn-production@champion, and that MLFLOW_TRACKING_URI names the "
            "store)",
            file=sys.stderr,
        )
        return 2
    try:  # imgpipe's model: /ping watches its batching thread
        batched = getattr(model.unwrap_python_model(), "batched", None)
    except MlflowException:  # another flavour: no batching thread to watch
        batched = None
    stalled_for = batched.stalled_for if batched is not None else (lambda: 0.0)
    app = guarded(scoring_server.init(model), settings, stalled_for)
    print(f"imgpipe-serve: loaded {describe_model(args.model_uri, model)}", file=sys.stderr)
    print(
        f"imgpipe-serve: {args.model_uri} on http://{args.host}:{args.port}/invocations",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(server_config(app, args.host, args.port, settings)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
