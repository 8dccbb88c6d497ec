"""The tabulate stage's core: data/split -> data/tables/<view>/{train,val,test}.parquet.

Two engines decode (tabulate.engine). `local`: forked worker processes decode tasks of files
straight into shared memory. `ray`: Ray Data decodes them on a Ray cluster with the same
function. Either way the stage process copies the pixels, in file order, into row groups that a
background thread compresses and writes: the tables are the same whichever engine made them.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import mmap
import multiprocessing
import multiprocessing.pool
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from imgpipe.images import SPLITS, channel_count, decode_image, printable, split_files
from imgpipe.runtime import StageError, atomic_directory, cpu_count, write_json_atomic
from imgpipe.tables import TableWriter, record_batch, table_schema

if TYPE_CHECKING:
    from imgpipe.params import TabulateParams, ViewParams

log = logging.getLogger("imgpipe.tabulating")

# Files per task sent to a worker: small enough that both cores stay busy to the last row group,
# large enough that the per-task overhead (scheduling, a result to unpickle) stays below 1 % of
# the decoding time. Large images get fewer, so that a task's pixels stay within
# TASK_BYTES (64 x 96 x 96 bytes = 0.6 MB).
IMAGES_PER_TASK = 64
TASK_BYTES = 2**20
# Tasks queued or running per worker: enough that the workers never wait while the parent
# copies rows out of the slots and hands row groups to the writing thread, few enough to bound
# memory (a slot per task in flight).
TASKS_PER_WORKER = 4
# Files that passed split's check but could not be decoded here (view, split, path, reason).
SKIPPED_REPORT = "skipped.json"


def decode_chunk(
    paths: Sequence[str], view: tuple[int, int, str], out: np.ndarray
) -> tuple[list[int], list[tuple[int, str]]]:
    """Decode files into out[i] (out: (>= len(paths), H, W, C) uint8).

    Returns the indices decoded and (index, error) for the files that could not be; the rows of
    those are left as they were.
    """
    height, width, color = view
    decoded: list[int] = []
    errors: list[tuple[int, str]] = []
    for index, path in enumerate(paths):
        try:
            with open(path, "rb", buffering=0) as file:  # unbuffered: one read of the size
                data = file.read()
            out[index] = decode_image(data, height=height, width=width, color=color)
            decoded.append(index)
        except Exception as error:  # any decoder failure becomes a reported skip, not a crash
            errors.append((index, f"{type(error).__name__}: {error}"))
    return decoded, errors


def task_size(shape: tuple[int, int, int]) -> int:
    """Files per task for images of this shape: IMAGES_PER_TASK, fewer for large images."""
    return max(1, min(IMAGES_PER_TASK, TASK_BYTES // math.prod(shape)))


class TaskSlots:
    """Shared memory for `count` tasks' pixels, `slot_bytes` each, that workers decode into.

    Anonymous and shared (mmap MAP_SHARED | MAP_ANONYMOUS), made before the workers are forked,
    so that they inherit it: workers send back only the indices they decoded, never pixels (no
    pickling, no copies through pipes), and there is no name to clean up: the memory goes with
    the last process that maps it, however the stage ends.
    """

    def __init__(self, count: int, slot_bytes: int) -> None:
        self.count = count
        self.slot_bytes = slot_bytes
        self.memory = mmap.mmap(-1, count * slot_bytes)

    def view(self, task_number: int, rows: int, shape: tuple[int, int, int]) -> np.ndarray:
        """(rows, H, W, C) uint8 view of task `task_number`'s slot (slots are reused in turn)."""
        offset = (task_number % self.count) * self.slot_bytes
        return np.ndarray((rows, *shape), dtype=np.uint8, buffer=self.memory, offset=offset)


_slots: TaskSlots | None = None  # in a worker: the parent's TaskSlots, inherited at fork


def _init_worker(slots: TaskSlots) -> None:
    global _slots
    _slots = slots


def _decode_job(
    job: tuple[Sequence[str], tuple[int, int, str], tuple[int, int, int], int],
) -> tuple[list[int], list[tuple[int, str]]]:
    """Worker side of a task: decode its files straight into its slot of the shared memory.

    The job is (paths, (H, W, colour), (H, W, C), task number).
    """
    paths, view, shape, task_number = job
    assert _slots is not None, "worker started without _init_worker"
    return decode_chunk(paths, view, _slots.view(task_number, len(paths), shape))


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def ordered_results(pool: multiprocessing.pool.Pool, jobs: Iterable, in_flight: int) -> Iterator:
    """_decode_job results in job order, with at most `in_flight` jobs queued or running.

    Pool.imap would queue every job at once and buffer every finished result the parent has not
    consumed yet, so memory would grow with the data set; this keeps it bounded.
    """
    pending: deque[multiprocessing.pool.AsyncResult] = deque()
    jobs = iter(jobs)
    for job in itertools.islice(jobs, in_flight):
        pending.append(pool.apply_async(_decode_job, (job,)))
    while pending:
        result = pending.popleft().get()
        for job in itertools.islice(jobs, 1):  # in_flight - 1 jobs still keep the workers busy
            pending.append(pool.apply_async(_decode_job, (job,)))
        yield result


class RowGroupBuffer:
    """Collects decoded rows and hands them on in row groups of exactly `rows_per_group` rows."""

    def __init__(self, shape: tuple[int, int, int], rows_per_group: int) -> None:
        self.shape = shape
        self.rows_per_group = rows_per_group
        self._new_group()

    def _new_group(self) -> None:
        self._pixels = np.empty((self.rows_per_group, *self.shape), dtype=np.uint8)  # (G, H, W, C)
        self._labels = np.empty(self.rows_per_group, dtype=np.int16)
        self._sources: list[str] = []

    def add(
        self, pixels: np.ndarray, labels: np.ndarray, sources: Sequence[str]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """Append rows; yields each row group that becomes full, as (pixels, labels, sources)."""
        start = 0
        while start < len(labels):
            filled = len(self._sources)
            take = min(self.rows_per_group - filled, len(labels) - start)
            self._pixels[filled : filled + take] = pixels[start : start + take]
            self._labels[filled : filled + take] = labels[start : start + take]
            self._sources.extend(sources[start : start + take])
            start += take
            if len(self._sources) == self.rows_per_group:
                yield self._pixels, self._labels, self._sources
                self._new_group()

    def flush(self) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """Yields the last, partial row group, if any rows are left."""
        filled = len(self._sources)
        if filled:
            yield self._pixels[:filled], self._labels[:filled], self._sources
            self._new_group()


# What a decoder yields for each chunk of files, in file order: (files in the chunk, pixels of
# the decoded ones (D, H, W, C) uint8, their indices in the chunk, (index, reason) of the others).
# The pixels may be reused by the decoder once the next chunk is asked for.
ChunkResult = tuple[int, np.ndarray, Sequence[int], list[tuple[int, str]]]
ViewKey = tuple[int, int, str]  # (height, width, color)
Shape = tuple[int, int, int]


@dataclass(frozen=True)
class DecodeJob:
    """One table's files (absolute paths, in table order) and the view to decode them to."""

    paths: list[str]
    view: ViewKey
    shape: Shape


# A decoder takes every job of the stage at once (so that an engine may plan them together) and
# yields, for each job in turn, an iterator of its chunks' results; each must be consumed before
# the next job's is asked for.
Decoder = Callable[[Sequence[DecodeJob]], Iterator[Iterator[ChunkResult]]]


class LocalDecoder:
    """The `local` engine: forked workers decode tasks of files into the shared TaskSlots."""

    def __init__(self, pool: multiprocessing.pool.Pool, slots: TaskSlots, workers: int) -> None:
        self.pool, self.slots, self.workers = pool, slots, workers

    def __call__(self, jobs: Sequence[DecodeJob]) -> Iterator[Iterator[ChunkResult]]:
        for job in jobs:
            yield self._decode(job)

    def _decode(self, job: DecodeJob) -> Iterator[ChunkResult]:
        """Decode a job's files in tasks of task_size(shape) files; results in file order."""
        per_task = task_size(job.shape)
        in_flight = TASKS_PER_WORKER * self.workers
        # task n's slot is reused by task n + slots.count: by then the parent has copied it out
        # (ordered_results sends task n + in_flight before it hands over task n's result)
        assert self.slots.count > in_flight
        assert self.slots.slot_bytes >= per_task * math.prod(job.shape)
        tasks = list(chunks(job.paths, per_task))
        work = ((task, job.view, job.shape, number) for number, task in enumerate(tasks))
        results = ordered_results(self.pool, work, in_flight=in_flight)
        for number, (decoded, errors) in enumerate(results):
            pixels = self.slots.view(number, len(tasks[number]), job.shape)
            if errors:  # rare: keep only the rows that were decoded
                pixels = pixels[np.asarray(decoded, dtype=np.int64)]
            yield len(tasks[number]), pixels, decoded, errors


# Files per Ray task (a multiple of the local engine's task size): a Ray Data task costs far
# more than a pool task (scheduling, the object store, Arrow), so it gets more work; measured on
# 20,000 images, 2 cores: 64 files a task took twice the wall time of 512
RAY_TASK_FACTOR = 8


def ray_decode_batch(batch: pa.Table) -> pa.Table:
    """The `ray` engine's map function: decode_chunk on one chunk of files per row.

    Each input row is a chunk (`paths`: a JSON list, `view`: JSON [height, width, color]). Each
    output row holds the chunk's decoded pixels as one binary value (D x H x W x C bytes, in file
    order), the indices decoded and the (index, reason) of the others, as JSON.
    """
    pixels_out, decoded_out, errors_out = [], [], []
    for paths_json, view_json in zip(
        batch.column("paths").to_pylist(), batch.column("view").to_pylist(), strict=True
    ):
        paths = json.loads(paths_json)
        height, width, color = json.loads(view_json)
        shape = (height, width, channel_count(color))
        pixels = np.empty((len(paths), *shape), dtype=np.uint8)
        decoded, errors = decode_chunk(paths, (height, width, color), pixels)
        if errors:
            pixels = pixels[np.asarray(decoded, dtype=np.int64)]
        pixels_out.append(pixels.reshape(-1))
        decoded_out.append(json.dumps(decoded))
        errors_out.append(json.dumps(errors))
    offsets = np.zeros(len(pixels_out) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pixels_out], out=offsets[1:])
    data = pa.py_buffer(np.concatenate(pixels_out) if pixels_out else np.empty(0, np.uint8))
    binary = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(pixels_out), [None, pa.py_buffer(offsets), data]
    )
    return pa.table(
        {
            "pixels": binary,
            "decoded": pa.array(decoded_out, type=pa.string()),
            "errors": pa.array(errors_out, type=pa.string()),
        }
    )


class RayDecoder:
    """The `ray` engine: one Ray Data pipeline for every job (a dataset of chunks of file paths
    -> map_batches(ray_decode_batch) on the cluster's CPUs), its results handed back in file
    order (preserve_order). One pipeline, not one per table: each costs a start and a drain.
    """

    def __call__(self, jobs: Sequence[DecodeJob]) -> Iterator[Iterator[ChunkResult]]:
        import ray

        plan = [
            [(chunk, job) for chunk in chunks(job.paths, task_size(job.shape) * RAY_TASK_FACTOR)]
            for job in jobs
        ]
        items = [
            {"paths": json.dumps(chunk), "view": json.dumps(job.view)}
            for job_chunks in plan
            for chunk, job in job_chunks
        ]
        if not items:
            yield from (iter(()) for _ in jobs)
            return
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ray_decode_batch, batch_size=None, batch_format="pyarrow"
        )
        rows = self._rows(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
        for job_chunks in plan:
            yield self._job_results(rows, job_chunks)

    @staticmethod
    def _rows(batches: Iterable[pa.Table]) -> Iterator[tuple[pa.Buffer, str, str]]:
        for table in batches:
            pixels = table.column("pixels").combine_chunks()
            offsets = np.frombuffer(pixels.buffers()[1], dtype=np.int64)[
                pixels.offset : pixels.offset + len(pixels) + 1
            ]
            data = pixels.buffers()[2]
            for row, (decoded, errors) in enumerate(
                zip(
                    table.column("decoded").to_pylist(),
                    table.column("errors").to_pylist(),
                    strict=True,
                )
            ):
                yield data.slice(offsets[row], offsets[row + 1] - offsets[row]), decoded, errors

    @staticmethod
    def _job_results(
        rows: Iterator[tuple[pa.Buffer, str, str]], job_chunks: list[tuple[list[str], DecodeJob]]
    ) -> Iterator[ChunkResult]:
        for chunk, job in job_chunks:
            data, decoded_json, errors_json = next(rows)
            decoded = json.loads(decoded_json)
            errors = [(int(index), str(reason)) for index, reason in json.loads(errors_json)]
            pixels = np.frombuffer(data, dtype=np.uint8).reshape(len(decoded), *job.shape)
            yield len(chunk), pixels, decoded, errors


def tabulate_split(
    results: Iterable[ChunkResult],
    split_dir: Path,
    sources: list[str],
    class_names: list[str],
    view_name: str,
    view: ViewParams,
    out_path: Path,
    rows_per_group: int,
    progress: tqdm,
) -> tuple[int, list[tuple[str, str]]]:
    """Decode one split's files in parallel and stream them into a Parquet table by row groups.

    `sources` are the files as `<class>/<file name>` under split_dir; `results` are their
    chunks, decoded in file order (by the local engine's workers, or by Ray); they are copied
    into row groups of `rows_per_group` rows, written while the next ones are decoded, so memory
    stays flat however many images there are. The table depends only on the files and
    rows_per_group, never on the engine, the number of workers or the chunk sizes.
    """
    # names are stored as valid UTF-8 (a folder not made by `split` may hold any bytes)
    schema = table_schema(view.shape, [printable(c) for c in class_names], view_name)
    index_of = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index_of[s.split("/", 1)[0]] for s in sources], dtype=np.int16)
    buffer = RowGroupBuffer(view.shape, rows_per_group)
    failures: list[tuple[str, str]] = []
    # row groups are compressed and written in a thread while the next ones are decoded
    with TableWriter(out_path, schema, background=True) as writer:
        offset = 0
        for count, pixels, decoded, errors in results:
            rows = np.asarray(decoded, dtype=np.int64) + offset
            for group in buffer.add(pixels, labels[rows], [printable(sources[i]) for i in rows]):
                writer.write(record_batch(schema, *group))
            failures.extend(
                (printable(os.path.join(split_dir, sources[offset + i])), reason)
                for i, reason in errors
            )
            offset += count
            progress.update(count)
        for group in buffer.flush():
            writer.write(record_batch(schema, *group))
        rows_written = writer.rows
    return rows_written, failures


@dataclass(frozen=True)
class TabulateOutcome:
    """What tabulate_views did, for the stage's summary."""

    images: int  # files per view
    rows: int  # rows written, all views and splits
    failures: list[dict[str, str]]  # {view, split, path, reason} of files that did not decode
    megabytes: float  # size of the tables
    seconds: float


@contextmanager
def decoding_engine(
    settings: TabulateParams, views: Mapping[str, ViewParams]
) -> Iterator[tuple[Decoder, str]]:
    """The decoder of tabulate.engine for the duration of the block, and what it runs on."""
    workers = settings.workers or cpu_count()
    if settings.engine == "ray":
        from imgpipe.raycluster import ray_cluster

        with ray_cluster(workers) as where:
            yield RayDecoder(), f"Ray Data on {where}"
        return
    if "fork" not in multiprocessing.get_all_start_methods():
        raise StageError(
            "needs the 'fork' start method of multiprocessing (Linux, macOS), which this "
            "platform lacks: on Windows, run the pipeline in WSL"
        )
    slots = TaskSlots(
        TASKS_PER_WORKER * workers + 1,
        max(task_size(v.shape) * math.prod(v.shape) for v in views.values()),
    )
    # The workers are forked (they inherit the slots), and first, so that they do not inherit
    # (and count) the file lists.
    fork = multiprocessing.get_context("fork")
    with fork.Pool(workers, initializer=_init_worker, initargs=(slots,)) as pool:
        yield LocalDecoder(pool, slots, workers), f"{workers} worker processes"


def _split_contents(split_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Each split's files (<class>/<file name>) and the class names: every class folder of any
    split, sorted."""
    sources = {s: split_files(split_dir / s) for s in SPLITS}
    class_names = sorted({p.name for s in SPLITS for p in (split_dir / s).iterdir() if p.is_dir()})
    return sources, class_names


def _decode_jobs(
    split_dir: Path,
    sources: Mapping[str, list[str]],
    views: Mapping[str, ViewParams],
    tables: list[tuple[str, str]],
) -> list[DecodeJob]:
    """One decoding job per (view, split) table: the split's files by absolute path, and the
    view's size, colour mode and array shape."""
    return [
        DecodeJob(
            [os.path.join(os.path.abspath(split_dir / s), f) for f in sources[s]],
            (views[v].height, views[v].width, views[v].color),
            views[v].shape,
        )
        for v, s in tables
    ]


def tabulate_views(
    split_dir: Path, out_dir: Path, views: Mapping[str, ViewParams], settings: TabulateParams
) -> TabulateOutcome:
    """Write out_dir/<view>/<split>.parquet for every view and split, and out_dir/skipped.json.

    The folder appears whole or not at all. Files that cannot be decoded are left out and
    listed in skipped.json (and in the outcome). The tables are the same, byte for byte, with
    either engine.
    """
    started = time.perf_counter()
    with decoding_engine(settings, views) as (decoder, engine):
        sources, class_names = _split_contents(split_dir)
        images = sum(len(f) for f in sources.values())
        total = images * len(views)
        log.info(
            "%d images, %d classes, %d view(s): %s; decoding with %s",
            images,
            len(class_names),
            len(views),
            ", ".join(views),
            engine,
        )
        failures: list[dict[str, str]] = []
        tables = [(v, s) for v in views for s in SPLITS]  # in this order
        jobs = _decode_jobs(split_dir, sources, views, tables)
        with (
            atomic_directory(out_dir) as staging,
            tqdm(total=total, desc="tabulate", unit="img") as progress,
        ):
            for (view_name, split_name), results in zip(tables, decoder(jobs), strict=True):
                progress.set_postfix_str(f"{view_name}/{split_name}")
                _, failed = tabulate_split(
                    results,
                    split_dir / split_name,
                    sources[split_name],
                    class_names,
                    view_name,
                    views[view_name],
                    staging / view_name / f"{split_name}.parquet",
                    settings.rows_per_group,
                    progress,
                )
                failures.extend(
                    {"view": view_name, "split": split_name, "path": path, "reason": reason}
                    for path, reason in failed
                )
            # in the output, so that the report always goes with the tables it describes
            write_json_atomic(staging / SKIPPED_REPORT, {"skipped": failures})
    size = sum(p.stat().st_size for p in out_dir.rglob("*.parquet"))
    return TabulateOutcome(
        images, total - len(failures), failures, size / 1e6, time.perf_counter() - started
    )
