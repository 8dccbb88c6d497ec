"""Command `imgpipe-serve`: serve a logged or registered model over HTTP with MLflow's scoring
protocol (the same requests and answers as `mlflow models serve`), plus what a shared server
needs: a bound on the request size, and errors as one JSON line without a stack trace."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class _BodyTooLargeError(Exception):
    """The request body grew past the limit while it was being read."""


async def _answer(send: Send, status: int, body: bytes) -> None:
    """Send a whole JSON answer: its start, then its body in one message."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Exchange:
    """One HTTP request through guarded(): the body counted as the app receives it, and an
    error answer held back until it can be rewritten as one JSON line."""

    def __init__(
        self,
        receive: Receive,
        send: Send,
        max_body_bytes: int,
        one_line_error: Callable[[int, bytes], bytes],
    ) -> None:
        self._receive = receive
        self._send = send
        self.max_body_bytes = max_body_bytes
        self.one_line_error = one_line_error
        self.received = 0
        self.error_start: Message | None = None
        self.error_body: list[bytes] = []
        self.started = False  # an answer has begun: too late for a 413

    async def receive(self) -> Message:
        """The app's receive: raises _BodyTooLargeError once the body passes the limit."""
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_body_bytes:
                raise _BodyTooLargeError
        return message

    async def send(self, message: Message) -> None:
        """The app's send: answers pass through, error answers (4xx, 5xx) rewritten."""
        if message["type"] == "http.response.start":
            self.started = True
            if message["status"] >= 400:
                self.error_start = message  # held back until its body is rewritten
                return
        elif message["type"] == "http.response.body" and self.error_start is not None:
            self.error_body.append(message.get("body", b""))
            if not message.get("more_body"):
                status = self.error_start["status"]
                body = self.one_line_error(status, b"".join(self.error_body))
                await _answer(self._send, status, body)
            return
        await self._send(message)


def guarded(app: App, max_body_bytes: int) -> App:
    """An ASGI app around `app`: bodies over max_body_bytes get a 413, and every error answer
    (4xx, 5xx) becomes one JSON line, {"error_code", "message"}, with no stack trace."""
    from imgpipe.serving import one_line_error

    too_large = (
        f"the request is larger than {max_body_bytes / 1e6:.0f} MB: send fewer rows per "
        "request (or start imgpipe-serve with a larger --max-request-mb)"
    )
    too_large_body = json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": too_large}).encode()

    async def guarded_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            await _answer(send, 413, too_large_body)
            return
        exchange = _Exchange(receive, send, max_body_bytes, one_line_error)
        try:
            await app(scope, exchange.receive, exchange.send)
        except _BodyTooLargeError:
            if not exchange.started:
                await _answer(send, 413, too_large_body)

    return guarded_app


def main(argv: list[str] | None = None) -> int:
    """Load the model, then answer POST /invocations (and GET /ping) until stopped."""
    parser = argparse.ArgumentParser(
        prog="imgpipe-serve",
        description="Serve a model logged by the pipeline: POST /invocations with MLflow's JSON "
        "scoring format, one column `image` of base64 image files.",
    )
    parser.add_argument(
        "model_uri", help="models:/imgpipe-cnn/latest, runs:/<run id>/model, or a local path"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument(
        "--max-request-mb", type=float, default=64, help="larger request bodies get a 413"
    )
    parser.add_argument(
        "--timeout", type=int, default=60, help="seconds one request may take before a 504"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(args.timeout)

    import uvicorn
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    try:
        model = scoring_server.load_model_with_mlflow_config(args.model_uri)
    except (MlflowException, OSError) as error:
        first_line = (str(error).strip().splitlines() or ["unknown error"])[0]
        print(
            f"imgpipe-serve: cannot load {args.model_uri}: {first_line} (check the URI, "
            "e.g. models:/imgpipe-cnn/latest, and that MLFLOW_TRACKING_URI names the store)",
            file=sys.stderr,
        )
        return 2
    app = guarded(scoring_server.init(model), int(args.max_request_mb * 1e6))
    print(
        f"imgpipe-serve: {args.model_uri} on http://{args.host}:{args.port}/invocations",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
