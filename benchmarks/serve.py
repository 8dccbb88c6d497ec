"""The served model under load and under hostile requests, against imgpipe-predict in the same run.

Logs a trained model folder (default models/cnn) as the pipeline does (MLflow pyfunc) into a
temporary MLflow store, starts `imgpipe-serve` on 127.0.0.1 with it (its default bounds), and
sends bounded runs of requests from concurrent clients (threads with keep-alive connections):
1 and 32 images per request. Prints requests/s, images/s, p50/p99 latency and errors for each,
beside the images/s of imgpipe-predict's own loop (read files, decode, classify in batches of
64) on the same images, in this process, in the same run.

Then the hostile kinds, one hostile client at a time, each while another client keeps sending
valid 1-image requests: the earlier eleven (not base64, not an image, a 100-megapixel image, an
empty body, wrong column names, a 20 MB body, 10,000 rows, ...) and issue 24's (near-limit
bomb rows, the costliest image the pixel bound lets through, 200,000 tiny rows, an EPS file,
100,000 nested brackets, a chunked body over the size bound, one over it with Content-Length,
300 half-sent requests). Each must be answered or refused within 30 s (per-row errors, or a
4xx with a one-line message; never a stack trace or a crash); the server's CPU-seconds and
memory growth for each, and the valid client's p99, are printed. Every target ends with `met`
or `MISSED`; the exit status is 1 when one is missed.

  python benchmarks/serve.py                         # models/cnn, images from data/split/test
  python benchmarks/serve.py --requests 1000         # CI's smoke run (fewer makes p99 noisy)
  python benchmarks/serve.py --model <any model folder with meta.json> --images <class folders>
  python benchmarks/serve.py --decode-costs          # CPU per megapixel of each image format
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # imgpipe and benchmarks

from benchmarks import harness
from benchmarks.harness import REPO

HOSTILE_SECONDS = 30  # each hostile kind answered or refused within this
VALID_P99_MS = 1000  # valid 1-image requests while a hostile kind runs

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
    status: int | None = None  # this exact status (a 4xx) is the good answer


def _png(width: int, height: int, mode: str = "L") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buffer, format="JPEG", quality=50)
    return buffer.getvalue()


def _costliest_image(megapixels: float) -> bytes:
    """Lossy WebP of noise: the allowed format that costs the most CPU per pixel to decode
    (about 60 ms per megapixel here, docs/benchmarks.md), `megapixels` of it."""
    import numpy as np
    from PIL import Image

    side = int((megapixels * 1e6) ** 0.5)
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="WEBP", quality=50, method=0)
    return buffer.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto showpage\n%%EOF\n"


def hostile_requests(valid_image: bytes) -> list[Hostile]:
    """The hostile requests of issue 13, built around one valid image file: per-row errors, or
    a one-line 4xx (10,000 rows are over the row bound: a 413)."""
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
        Hostile("wrong column name", request_body([valid_image], column="img")),
        Hostile("20 MB body", request_body([noise]), rows=1),
        Hostile("10,000 rows", request_body([valid_image] * 10_000), status=413),
    ]


def hostile_bodies(max_megapixels: float) -> list[Hostile]:
    """Issue 24's hostile requests that are one body each: bomb rows near Pillow's 64-megapixel
    limit (refused per row from their headers), the costliest image the pixel bound lets through
    (decoded: about 2 CPU-seconds), 200,000 one-letter rows, an EPS file, deep JSON."""
    bomb = _png(7_990, 7_990, mode="1")  # 63.8 megapixels in 7.8 KB
    tiny_rows = json.dumps({"dataframe_split": {"columns": ["image"], "data": [["a"]] * 200_000}})
    return [
        Hostile("120 bomb rows (7,990 x 7,990, 1-bit)", request_body([bomb] * 120), rows=120),
        Hostile(
            f"costliest image within the bound ({max_megapixels:g} MP WebP of noise)",
            request_body([_costliest_image(max_megapixels * 0.98)]),
            rows=1,
            labelled=True,
        ),
        Hostile("200,000 one-letter rows", tiny_rows.encode(), status=413),
        Hostile("an EPS file (not an allowed format)", request_body([EPS]), rows=1),
        Hostile("100,000 nested [", b"[" * 100_000, status=400),
    ]


def judge(hostile: Hostile, status: int, body: bytes) -> str | None:
    """None when the answer is a good one, else what is wrong with it: a 200 must hold
    `hostile.rows` rows, each with an error (or each with a label, for valid images); a 4xx
    must carry a one-line message (and be `hostile.status` when given); nothing may carry a
    stack trace."""
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
    if not 400 <= status < 500 or (hostile.status is not None and status != hostile.status):
        return f"status {status}, expected {hostile.status or 'a 4xx'}: {text[:200]}"
    try:
        message = json.loads(text).get("message", text)
    except (ValueError, AttributeError):
        message = text
    if not message.strip() or "\n" in message.strip():
        return f"status {status} but not a one-line message: {message[:300]!r}"
    return None


# --------------------------------------------------------------------------- connection attacks


def send_chunked(port: int, total: int) -> tuple[int, bytes]:
    """POST `total` bytes chunked (no Content-Length), 1 MB a chunk: (status, body)."""
    piece = b"x" * 2**20

    def chunks():
        for start in range(0, total, len(piece)):
            yield piece[: total - start]

    with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=60)) as connection:
        headers = {"Content-Type": "application/json"}
        connection.request("POST", "/invocations", body=chunks(), headers=headers)
        response = connection.getresponse()
        return response.status, response.read()


def send_with_length(port: int, total: int) -> tuple[int, bytes]:
    """POST `total` bytes with their Content-Length, then read the answer: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = (
            "POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            f"\r\nContent-Length: {total}\r\n\r\n"
        )
        sock.sendall(head.encode())
        sock.sendall(b"x" * total)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def half_sent(port: int, count: int, timeout: float) -> tuple[int, float]:
    """`count` connections that never finish their request (half of them stop in the headers,
    half in the body); (how many the server dropped within `timeout`, seconds until the last)."""
    sockets = []
    for index in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
        if index % 2:
            head += b"\r\nContent-Length: 1000\r\n\r\n" + b'{"dataframe_split": '
        sock.sendall(head)
        sockets.append(sock)
    start = time.perf_counter()
    open_ = list(sockets)
    while open_ and time.perf_counter() - start < timeout:
        readable, _, _ = select.select(open_, [], [], 0.5)
        for sock in readable:
            try:
                closed = sock.recv(4096) == b""
            except OSError:  # reset: dropped too
                closed = True
            if closed:
                open_.remove(sock)
    seconds = time.perf_counter() - start
    for sock in sockets:
        sock.close()
    return count - len(open_), seconds


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
    if mlflow.get_experiment_by_name("serve-benchmark") is None:  # artifacts in store, not ./mlruns
        mlflow.create_experiment(
            "serve-benchmark", artifact_location=(store / "artifacts").as_uri()
        )
    mlflow.set_experiment("serve-benchmark")
    with mlflow.start_run():
        info = log_pyfunc_model(folder.weights_path(meta), model_dir / "meta.json")
    return info.model_uri


class Server:
    """`imgpipe-serve` in its own process group; stopped on exit."""

    def __init__(self, model_uri: str, store: Path, log: Path, flags: tuple[str, ...] = ()):
        self.port = free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
        env.pop("PYTHONPATH", None)
        command = Path(sys.executable).parent / "imgpipe-serve"
        args = [str(command), model_uri, "--host", "127.0.0.1", "--port", str(self.port), *flags]
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

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server and its children so far, seconds."""
        import psutil

        root = psutil.Process(self.process.pid)
        processes = [root, *root.children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in processes)

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


# --------------------------------------------------------------------------- decoding cost


def decode_costs(megapixels: float = 16) -> list[tuple[str, float, float]]:
    """(image, file MB, CPU ms per megapixel) of imgpipe-serve's decoding (decode_checked, to a
    128x128 RGB view) for each accepted format at its costliest: noise, or flat where the
    format decodes flat pixels slower; the best of two runs. What --max-megapixels is set from."""
    import numpy as np
    from PIL import Image

    from imgpipe.images import decode_checked

    side = int((megapixels * 1e6) ** 0.5)
    noise = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    )
    flat = Image.new("RGB", (side, side), (120, 80, 40))
    cases = [
        ("WebP, lossy, noise", noise, {"format": "WEBP", "quality": 50}),
        ("WebP, lossless, noise", noise, {"format": "WEBP", "lossless": True, "method": 0}),
        ("JPEG, progressive, noise", noise, {"format": "JPEG", "quality": 95, "progressive": True}),
        ("JPEG, baseline, noise", noise, {"format": "JPEG", "quality": 95}),
        ("TIFF, LZW, noise", noise, {"format": "TIFF", "compression": "tiff_lzw"}),
        ("PNG, flat", flat, {"format": "PNG"}),
        ("PNG, noise", noise, {"format": "PNG", "compress_level": 1}),
        ("GIF, flat", flat.convert("P"), {"format": "GIF"}),
        ("BMP", flat, {"format": "BMP"}),
        ("PNG, 1-bit (dithered)", flat.convert("1"), {"format": "PNG"}),
    ]
    rows = []
    for name, image, options in cases:
        buffer = io.BytesIO()
        image.save(buffer, **options)
        data = buffer.getvalue()
        best = float("inf")
        for _ in range(2):
            start = time.process_time()
            pixels = decode_checked(data, height=128, width=128, color="rgb")
            best = min(best, time.process_time() - start)
        assert not isinstance(pixels, str), (name, pixels)
        rows.append((name, len(data) / 1e6, best / (side * side / 1e6) * 1000))
    return sorted(rows, key=lambda row: -row[2])


def print_decode_costs() -> None:
    harness.print_machine()
    print("| image (16 megapixels) | file MB | CPU ms per megapixel | 32 megapixels cost, CPU-s |")
    print("|---|---:|---:|---:|")
    for name, size, cost in decode_costs():
        print(f"| {name} | {size:.1f} | {cost:.1f} | {cost * 32 / 1000:.2f} |")


# --------------------------------------------------------------------------- hostile kinds


class ValidClient:
    """Another client sending valid 1-image requests one after another while a hostile kind
    runs: their latencies, and how many were not answered with a label."""

    def __init__(self, server: Server, images: list[bytes]) -> None:
        self.server = server
        self.bodies = [request_body([image]) for image in images]
        self.latencies_ms: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ValidClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        connection = self.server.connection(timeout=30)
        number = 0
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                status, answer = post(connection, self.bodies[number % len(self.bodies)])
                good = status == 200 and json.loads(answer)["predictions"][0]["label"]
            except (OSError, ValueError, KeyError, http.client.HTTPException):
                connection.close()
                connection = self.server.connection(timeout=30)
                good = False
            self.latencies_ms.append((time.perf_counter() - start) * 1000)
            self.failures += not good
            number += 1

    def p99(self) -> float:
        ordered = sorted(self.latencies_ms) or [float("nan")]
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@dataclass
class HostileResult:
    name: str
    status: int
    seconds: float
    verdict: str | None  # None: a good answer
    shown: str  # the answer's first line, shortened
    cpu_seconds: float  # the server's, while the kind ran (the valid client's share included)
    rss_growth_mb: float
    valid: int  # valid requests sent meanwhile
    valid_failures: int
    valid_p99_ms: float


def hostile_kinds(
    pool: list[bytes], server: Server, max_mb: float, max_megapixels: float
) -> list[tuple[str, Callable[[], tuple[int, bytes, str | None]]]]:
    """Each hostile kind as (name, a call that runs it and returns status, body, verdict)."""

    def posted(hostile: Hostile) -> Callable[[], tuple[int, bytes, str | None]]:
        def run() -> tuple[int, bytes, str | None]:
            with closing(server.connection(timeout=HOSTILE_SECONDS * 2)) as connection:
                status, body = post(connection, hostile.body, hostile.content_type)
            return status, body, judge(hostile, status, body)

        return run

    def too_large(send: Callable[[int, int], tuple[int, bytes]]) -> Callable:
        def run() -> tuple[int, bytes, str | None]:
            status, body = send(server.port, int(max_mb * 1e6 * 1.1))
            return status, body, judge(Hostile("", b"", status=413), status, body)

        return run

    def idle() -> tuple[int, bytes, str | None]:
        dropped, seconds = half_sent(server.port, 300, HOSTILE_SECONDS)
        verdict = None if dropped == 300 else f"{300 - dropped} of 300 not dropped"
        return 0, f"{dropped} of 300 dropped after {seconds:.1f} s".encode(), verdict

    kinds = [(h.name, posted(h)) for h in hostile_requests(pool[0])]
    kinds += [(h.name, posted(h)) for h in hostile_bodies(max_megapixels)]
    kinds += [
        (f"chunked body over {max_mb:g} MB", too_large(send_chunked)),
        (f"body over {max_mb:g} MB with Content-Length", too_large(send_with_length)),
        ("300 half-sent requests (slow and idle clients)", idle),
    ]
    return kinds


def run_hostile(
    server: Server,
    pool: list[bytes],
    name: str,
    attack: Callable[[], tuple[int, bytes, str | None]],
) -> HostileResult:
    """One hostile kind, while a valid client keeps sending 1-image requests (for 1 s at least)."""
    cpu, rss = server.cpu_seconds(), server.rss_mb()
    with ValidClient(server, pool[:16]) as valid:
        start = time.perf_counter()
        try:
            status, body, verdict = attack()
        except (OSError, http.client.HTTPException) as error:
            status, body, verdict = 0, b"", f"no answer: {error}"
        seconds = time.perf_counter() - start
        if seconds > HOSTILE_SECONDS:
            verdict = verdict or f"took {seconds:.0f} s"
        time.sleep(max(0.0, 1 - seconds))
    alive = server.process.poll() is None
    first = (body.decode("utf-8", "replace").strip().splitlines() or [""])[0][:90]
    return HostileResult(
        name, status, seconds, verdict if alive else "the server crashed", first,
        server.cpu_seconds() - cpu if alive else float("nan"),
        server.rss_mb() - rss if alive else float("nan"),
        len(valid.latencies_ms), valid.failures, valid.p99(),
    )  # fmt: skip


def print_hostile(results: list[HostileResult]) -> None:
    print()
    print(
        "| hostile kind | status | seconds | server CPU-s | memory growth MB | valid requests "
        "meanwhile (failed) | their p99 ms | answer |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        answer = "ok: " + r.shown.replace("|", "/") if r.verdict is None else "BAD: " + r.verdict
        print(
            f"| {r.name} | {r.status} | {r.seconds:.2f} | {r.cpu_seconds:.2f} | "
            f"{r.rss_growth_mb:+.0f} | {r.valid} ({r.valid_failures}) | {r.valid_p99_ms:.0f} | "
            f"{answer[:100]} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, default=REPO / "models" / "cnn", help="a trained model folder"
    )
    parser.add_argument("--images", type=Path, default=REPO / "data" / "split" / "test")
    parser.add_argument("--requests", type=int, default=2000, help="per run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pool", type=int, default=512, help="distinct images sent")
    parser.add_argument(
        "--decode-costs", action="store_true", help="only print the decoding cost per format"
    )
    args = parser.parse_args(argv)
    if args.decode_costs:
        print_decode_costs()
        return 0
    if not (args.model / "meta.json").is_file():
        raise SystemExit(f"no trained model in {args.model}: run `dvc repro` first, or --model")
    paths = image_paths(args.images, args.pool)
    if not paths:
        raise SystemExit(f"no images under {args.images}: run `dvc repro` first, or --images")
    pool = [path.read_bytes() for path in paths]

    import mlflow

    from imgpipe.serve import ServerSettings

    defaults = ServerSettings()
    max_mb, max_megapixels = defaults.max_body_bytes / 1e6, defaults.limits.max_megapixels
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
            rss_start = server.rss_mb()
            results = {}
            for per_request in (1, 32):
                result = run_load(server, pool, per_request, args.requests, args.clients)
                results[per_request] = result
                print(
                    f"  {per_request} image(s) a request: {result.images / result.seconds:,.0f} "
                    f"images/s, p99 {result.percentile(99):.1f} ms, {result.errors} errors",
                    flush=True,
                )
            hostile = []
            for name, attack in hostile_kinds(pool, server, max_mb, max_megapixels):
                hostile.append(run_hostile(server, pool, name, attack))
                print(f"  hostile: {name}: {hostile[-1].verdict or 'ok'}", flush=True)
            alive = server.process.poll() is None
            with closing(server.connection(timeout=60)) as connection:
                status, body = post(connection, request_body(pool[:4])) if alive else (0, b"")
            still_answers = status == 200 and all(
                row["label"] for row in json.loads(body)["predictions"]
            )
            rss_end = server.rss_mb() if alive else float("nan")
        finally:
            server.stop()
    return report(args, results, predict_rate, hostile, still_answers, rss_end - rss_start)


def report(
    args: argparse.Namespace,
    results: dict[int, LoadResult],
    predict_rate: float,
    hostile: list[HostileResult],
    still_answers: bool,
    growth: float,
) -> int:
    """Print the tables and check the targets; the exit status."""
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
    print_hostile(hostile)
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
    bad = [r.name for r in hostile if r.verdict is not None]
    targets.check(
        f"every hostile kind answered or refused within {HOSTILE_SECONDS} s, without a crash "
        "or a stack trace; the server answers normally afterwards",
        not bad and still_answers,
        f"{len(hostile) - len(bad)}/{len(hostile)} good{': ' + ', '.join(bad) if bad else ''}; "
        f"server still answers: {still_answers}",
    )
    worst = max(hostile, key=lambda r: r.valid_p99_ms)
    failed = sum(r.valid_failures for r in hostile)
    targets.check(
        f"valid 1-image requests answered while each hostile kind runs, p99 under "
        f"{VALID_P99_MS} ms",
        failed == 0 and worst.valid_p99_ms < VALID_P99_MS,
        f"{failed} failed of {sum(r.valid for r in hostile)}; worst p99 {worst.valid_p99_ms:.0f} "
        f"ms (during {worst.name})",
    )
    targets.check(
        "memory bounded: under 1 GB growth over the whole run", growth < 1000, f"{growth:+,.0f} MB"
    )
    return targets.summary()


if __name__ == "__main__":
    sys.exit(main())
