"""The served model under load and under hostile requests, against imgpipe-predict in the same run.

Logs a trained model folder (default models/cnn) as the pipeline does (MLflow pyfunc) into a
temporary MLflow store, starts `imgpipe-serve` on 127.0.0.1 with it (MLflow's scoring server
with a request-size bound and one-line errors), and sends bounded runs of requests from
concurrent clients (threads with keep-alive connections): 1 and 32 images per request. Prints
requests/s, images/s, p50/p99 latency and errors for each, beside the images/s of
imgpipe-predict's own loop (read files, decode, classify in batches of 64) on the same images,
in this process, in the same run. Then sends hostile requests (not base64, not an image, a
100-megapixel image, an empty body, wrong column names, a 20 MB body, 10,000 rows, ...) and
checks each gets per-row errors or a 4xx with a one-line message and no stack trace, that the
server still answers, and how much its memory grew. Every target ends with `met` or `MISSED`;
the exit status is 1 when one is missed.

  python benchmarks/serve.py                         # models/cnn, images from data/split/test
  python benchmarks/serve.py --requests 1000         # CI's smoke run (fewer makes p99 noisy)
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # imgpipe and benchmarks

from benchmarks import harness
from benchmarks.harness import REPO

# --------------------------------------------------------------------------- requests


def request_body(images: list[bytes], column: str = "image") -> bytes:
    """MLflow's JSON scoring format: one column of base64 image files."""
    rows = [[base64.b64encode(data).decode("ascii")] for data in images]
    return json.dumps({"dataframe_split": {"columns": [column], "data": rows}}).encode()


def post(
    connection: http.client.HTTPConnection, body: bytes, content_type: str = "application/json"
) -> tuple[int, bytes]:
    """POST /invocations on a kept-alive connection: (status, body)."""
    connection.request("POST", "/invocations", body=body, headers={"Content-Type": content_type})
    response = connection.getresponse()
    return response.status, response.read()


@dataclass(frozen=True)
class Hostile:
    """A request a careless or hostile client may send, and what a good answer to it is."""

    name: str
    body: bytes
    content_type: str = "application/json"
    rows: int | None = None  # a 200 with this many rows, each with an error (or a label)
    labelled: bool = False  # the rows are valid images: each must have a label


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buffer, format="JPEG", quality=50)
    return buffer.getvalue()


def hostile_requests(valid_image: bytes) -> list[Hostile]:
    """The hostile requests of issue 13, built around one valid image file."""
    not_base64 = json.dumps(
        {"dataframe_split": {"columns": ["image"], "data": [["%%% not base64 %%%"]]}}
    ).encode()
    noise = os.urandom(15 * 2**20)  # 20 MB once base64-encoded
    return [
        Hostile("not base64", not_base64, rows=1),
        Hostile("not an image", request_body([b"hello, world " * 100]), rows=1),
        Hostile("100-megapixel PNG", request_body([_png(10_000, 10_000)]), rows=1),
        Hostile("100-megapixel JPEG", request_body([_jpeg(10_000, 10_000)]), rows=1),
        Hostile("empty body", b""),
        Hostile("not JSON", b"{this is not json"),
        Hostile("JSON without a data key", b'{"images": []}'),
        Hostile("wrong content type", b"image=abc", content_type="text/plain"),
        Hostile("wrong column name", request_body([valid_image], column="img"), rows=1),
        Hostile("20 MB body", request_body([noise]), rows=1),
        Hostile("10,000 rows", request_body([valid_image] * 10_000), rows=10_000, labelled=True),
    ]


def judge(hostile: Hostile, status: int, body: bytes) -> str | None:
    """None when the answer is a good one, else what is wrong with it: a 200 must hold
    `hostile.rows` rows, each with an error (or each with a label, for valid images); a 4xx
    must carry a one-line message; nothing may carry a stack trace."""
    text = body.decode("utf-8", errors="replace")
    if "Traceback" in text or "stack_trace" in text:
        return f"status {status} with a stack trace"
    if status == 200 and hostile.rows is not None:
        rows = json.loads(text)["predictions"]
        if len(rows) != hostile.rows:
            return f"{len(rows)} rows, expected {hostile.rows}"
        for row in rows:
            if hostile.labelled and row.get("label") is None:
                return f"a valid image without a label: {row}"
            if not hostile.labelled and not row.get("error"):
                return f"a row without an error: {row}"
        return None
    if not 400 <= status < 500:
        return f"status {status}, expected a 4xx: {text[:200]}"
    try:
        message = json.loads(text).get("message", text)
    except (ValueError, AttributeError):
        message = text
    if not message.strip() or "\n" in message.strip():
        return f"status {status} but not a one-line message: {message[:300]!r}"
    return None


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_model(model_dir: Path, store: Path) -> str:
    """Log a train stage's model folder as the pipeline does; returns its MLflow model URI."""
    import mlflow

    from imgpipe.model_folder import ModelFolder
    from imgpipe.tracking.pyfunc import log_pyfunc_model

    folder = ModelFolder(model_dir)
    meta = folder.meta()
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    mlflow.set_experiment("serve-benchmark")
    with mlflow.start_run():
        info = log_pyfunc_model(folder.weights_path(meta), model_dir / "meta.json")
    return info.model_uri


class Server:
    """`imgpipe-serve` in its own process group; stopped on exit."""

    def __init__(self, model_uri: str, store: Path, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
        env.pop("PYTHONPATH", None)
        command = Path(sys.executable).parent / "imgpipe-serve"
        args = [str(command), model_uri, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log.read_text()[-3000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/ping")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server was not ready after {timeout} s")

    def connection(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def rss_mb(self) -> float:
        """Resident memory of the server and its children (uvicorn's worker), MB."""
        import psutil

        root = psutil.Process(self.process.pid)
        processes = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in processes) / 1e6

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    requests: int
    images: int
    seconds: float
    latencies_ms: list[float]
    errors: int  # failed requests, and rows answered with an error

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def load(server: Server, bodies: list[bytes], per_request: int, requests: int, clients: int):
    """`requests` POSTs from `clients` threads, each on its own kept-alive connection."""
    latencies: list[float] = []
    errors = [0]
    sent = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        connection = server.connection()
        while True:
            with lock:
                if sent[0] >= requests:
                    return
                number = sent[0]
                sent[0] += 1
            body = bodies[number % len(bodies)]
            start = time.perf_counter()
            try:
                status, answer = post(connection, body)
                bad = status != 200 or any(
                    row.get("error") for row in json.loads(answer)["predictions"]
                )
            except (OSError, ValueError, KeyError, http.client.HTTPException):
                connection = server.connection()
                bad = True
            elapsed = (time.perf_counter() - start) * 1000
            with lock:
                latencies.append(elapsed)
                errors[0] += bad

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return LoadResult(requests, requests * per_request, seconds, latencies, errors[0])


def predict_loop_rate(model_dir: Path, paths: list[Path], batch_size: int = 64) -> float:
    """Images/s of imgpipe-predict's loop (read, decode, classify per batch), model loaded."""
    from imgpipe.classifier import Classifier

    classifier = Classifier.load(model_dir)

    def one_pass() -> float:
        start = time.perf_counter()
        for first in range(0, len(paths), batch_size):
            payloads = [path.read_bytes() for path in paths[first : first + batch_size]]
            classifier.classify_bytes(payloads)
        return time.perf_counter() - start

    one_pass()  # warm-up: the first forward passes build TensorFlow's graphs
    return len(paths) / min(one_pass() for _ in range(3))


def image_paths(folder: Path, limit: int) -> list[Path]:
    """Up to `limit` image files under folder, sorted, alternating between its class folders."""
    from imgpipe.batch_predict import iter_image_paths

    paths = list(iter_image_paths([folder]))
    by_class: dict[Path, list[Path]] = {}
    for path in paths:
        by_class.setdefault(path.parent, []).append(path)
    mixed = [p for group in zip(*by_class.values(), strict=False) for p in group]
    return (mixed or paths)[:limit]


def run_load(
    server: Server, pool: list[bytes], per_request: int, requests: int, clients: int
) -> LoadResult:
    bodies = [
        request_body([pool[(start + k) % len(pool)] for k in range(per_request)])
        for start in range(0, len(pool), per_request)
    ]
    load(server, bodies, per_request, clients * 4, clients)  # warm-up, not timed
    return load(server, bodies, per_request, requests, clients)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "cnn")
    parser.add_argument("--images", type=Path, default=REPO / "data" / "split" / "test")
    parser.add_argument("--requests", type=int, default=2000, help="per run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pool", type=int, default=512, help="distinct images sent")
    args = parser.parse_args(argv)
    if not (args.model / "meta.json").is_file():
        raise SystemExit(f"no trained model in {args.model}: run `dvc repro` first, or --model")
    paths = image_paths(args.images, args.pool)
    if not paths:
        raise SystemExit(f"no images under {args.images}: run `dvc repro` first, or --images")
    pool = [path.read_bytes() for path in paths]

    import mlflow

    harness.print_machine("tensorflow", "keras")
    print(f"model: {args.model} ; images: {len(pool)} files from {args.images}")
    print(f"MLflow {mlflow.__version__}; clients: {args.clients} threads in this process")
    predict_rate = predict_loop_rate(args.model, paths)
    print(f"imgpipe-predict's loop, in this process: {predict_rate:,.0f} images/s")

    with tempfile.TemporaryDirectory(prefix="imgpipe-serve-") as temp:
        store = Path(temp)
        uri = log_model(args.model, store)
        server = Server(uri, store, store / "server.log")
        try:
            server.wait_ready()
            results = {}
            for per_request in (1, 32):
                result = run_load(server, pool, per_request, args.requests, args.clients)
                results[per_request] = result
                print(
                    f"  {per_request} image(s) a request: {result.images / result.seconds:,.0f} "
                    f"images/s, p99 {result.percentile(99):.1f} ms, {result.errors} errors",
                    flush=True,
                )
            rss_before = server.rss_mb()
            verdicts = []
            with closing(server.connection(timeout=300)) as connection:
                for hostile in hostile_requests(pool[0]):
                    start = time.perf_counter()
                    try:
                        status, body = post(connection, hostile.body, hostile.content_type)
                        verdict = judge(hostile, status, body)
                        first_line = body.decode("utf-8", "replace").strip().splitlines() or [""]
                        shown = first_line[0][:90]
                    except (OSError, http.client.HTTPException) as error:
                        connection.close()
                        status, verdict, shown = 0, f"no answer: {error}", ""
                    seconds = time.perf_counter() - start
                    verdicts.append((hostile, status, seconds, verdict, shown))
                rss_after = server.rss_mb()
                status, body = post(connection, request_body(pool[:4]))
                still_answers = status == 200 and all(
                    row["label"] for row in json.loads(body)["predictions"]
                )
        finally:
            server.stop()

    print()
    print("| request | requests | requests/s | images/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for per_request, result in results.items():
        print(
            f"| {per_request} image{'s' if per_request > 1 else ''}, {args.clients} clients | "
            f"{result.requests:,} | {result.requests / result.seconds:,.1f} | "
            f"{result.images / result.seconds:,.0f} | {result.percentile(50):.1f} | "
            f"{result.percentile(99):.1f} | {result.errors} |"
        )
    print(f"| imgpipe-predict's loop (batches of 64) | | | {predict_rate:,.0f} | | | |")
    print()
    print("| hostile request | status | seconds | answer |")
    print("|---|---:|---:|---|")
    for hostile, status, seconds, verdict, shown in verdicts:
        answer = "ok: " + shown.replace("|", "/") if verdict is None else "BAD: " + verdict
        print(f"| {hostile.name} | {status} | {seconds:.2f} | {answer[:110]} |")
    print(
        f"server memory: {rss_before:,.0f} MB before the hostile requests, {rss_after:,.0f} after"
    )
    print()
    targets = harness.Targets()
    ratio = results[32].images / results[32].seconds / predict_rate
    targets.check(
        "32-image requests at least 80% of imgpipe-predict's images/s",
        ratio >= 0.8,
        f"{ratio:.0%} ({results[32].images / results[32].seconds:,.0f} vs {predict_rate:,.0f})",
    )
    p99 = results[1].percentile(99)
    targets.check(
        f"p99 of 1-image requests from {args.clients} clients under 150 ms",
        p99 < 150,
        f"{p99:.1f} ms",
    )
    errors = sum(result.errors for result in results.values())
    targets.check("no errors on valid requests", errors == 0, f"{errors} errors")
    bad = [hostile.name for hostile, _, _, verdict, _ in verdicts if verdict is not None]
    targets.check(
        "every hostile request answered without a crash or a stack trace",
        not bad and still_answers,
        f"{len(verdicts) - len(bad)}/{len(verdicts)} good; server still answers: {still_answers}",
    )
    growth = rss_after - rss_before
    targets.check(
        "memory bounded: under 1 GB growth over the hostile requests",
        growth < 1000,
        f"{growth:+,.0f} MB",
    )
    return targets.summary()


if __name__ == "__main__":
    sys.exit(main())
