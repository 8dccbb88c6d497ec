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


def guarded(app: App, max_body_bytes: int) -> App:
    """An ASGI app around `app`: bodies over max_body_bytes get a 413, and every error answer
    (4xx, 5xx) becomes one JSON line, {"error_code", "message"}, with no stack trace."""
    from imgpipe.serving import one_line_error

    too_large = (
        f"the request is larger than {max_body_bytes / 1e6:.0f} MB: send fewer rows per "
        "request (or start imgpipe-serve with a larger --max-request-mb)"
    )

    async def answer(send: Send, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def guarded_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            body = json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": too_large})
            await answer(send, 413, body.encode())
            return
        received = 0
        error_start: Message | None = None
        error_body: list[bytes] = []
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body_bytes:
                    raise _BodyTooLargeError
            return message

        async def one_line_send(message: Message) -> None:
            nonlocal error_start, started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    error_start = message  # held back until its body is rewritten
                    return
            elif message["type"] == "http.response.body" and error_start is not None:
                error_body.append(message.get("body", b""))
                if not message.get("more_body"):
                    await answer(
                        send,
                        error_start["status"],
                        one_line_error(error_start["status"], b"".join(error_body)),
                    )
                return
            await send(message)

        try:
            await app(scope, limited_receive, one_line_send)
        except _BodyTooLargeError:
            if not started:
                body = json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": too_large})
                await answer(send, 413, body.encode())

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
