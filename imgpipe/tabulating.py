"""The tabulate stage's engine: data/split -> data/tables/<view>/{train,val,test}.parquet.

Forked worker processes decode tasks of files straight into shared memory; the stage process
copies them, in file order, into row groups that a background thread compresses and writes.
"""

from __future__ import annotations

import itertools
import logging
import math
import mmap
import multiprocessing
import multiprocessing.pool
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from imgpipe.images import SPLITS, decode_image, printable, split_files
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


def tabulate_split(
    pool: multiprocessing.pool.Pool,
    slots: TaskSlots,
    split_dir: Path,
    sources: list[str],
    class_names: list[str],
    view_name: str,
    view: ViewParams,
    out_path: Path,
    rows_per_group: int,
    progress: tqdm,
    workers: int,
) -> tuple[int, list[tuple[str, str]]]:
    """Decode one split's files in parallel and stream them into a Parquet table by row groups.

    `sources` are the files as `<class>/<file name>` under split_dir. Workers decode small tasks
    of at most IMAGES_PER_TASK files straight into slots of a shared memory block, so that every
    core stays busy up to the end and no pixels are pickled; the parent copies them in file
    order into row groups of `rows_per_group` rows. At most TASKS_PER_WORKER tasks per worker
    are in flight, so memory stays flat however many images there are. The table depends only
    on the files and rows_per_group, never on the number of workers or task size.
    """
    # names are stored as valid UTF-8 (a folder not made by `split` may hold any bytes)
    schema = table_schema(view.shape, [printable(c) for c in class_names], view_name)
    index_of = {name: i for i, name in enumerate(class_names)}
    view_key = (view.height, view.width, view.color)
    labels = np.array([index_of[s.split("/", 1)[0]] for s in sources], dtype=np.int16)
    per_task = task_size(view.shape)
    in_flight = TASKS_PER_WORKER * workers
    # task n's slot is reused by task n + slots.count: by then the parent has copied it out
    # (ordered_results sends task n + in_flight before it hands over task n's result)
    assert slots.count > in_flight and slots.slot_bytes >= per_task * math.prod(view.shape)
    buffer = RowGroupBuffer(view.shape, rows_per_group)
    failures: list[tuple[str, str]] = []
    # row groups are compressed and written in a thread while the next ones are decoded
    with TableWriter(out_path, schema, background=True) as writer:
        prefix = os.path.join(split_dir, "")
        jobs = (
            ([prefix + s for s in chunk], view_key, view.shape, number)
            for number, chunk in enumerate(chunks(sources, per_task))
        )
        results = ordered_results(pool, jobs, in_flight=in_flight)
        for task_number, (decoded, errors) in enumerate(results):
            offset = task_number * per_task
            count = min(per_task, len(sources) - offset)
            pixels = slots.view(task_number, count, view.shape)
            decoded_rows = np.asarray(decoded, dtype=np.int64)
            if errors:  # rare: keep only the rows that were decoded
                pixels = pixels[decoded_rows]
            rows = decoded_rows + offset
            for group in buffer.add(pixels, labels[rows], [printable(sources[i]) for i in rows]):
                writer.write(record_batch(schema, *group))
            failures.extend(
                (printable(os.path.join(split_dir, sources[offset + i])), reason)
                for i, reason in errors
            )
            progress.update(len(decoded) + len(errors))
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


def tabulate_views(
    split_dir: Path, out_dir: Path, views: Mapping[str, ViewParams], settings: TabulateParams
) -> TabulateOutcome:
    """Write out_dir/<view>/<split>.parquet for every view and split, and out_dir/skipped.json.

    The folder appears whole or not at all. Files that cannot be decoded are left out and
    listed in skipped.json (and in the outcome).
    """
    started = time.perf_counter()
    if "fork" not in multiprocessing.get_all_start_methods():
        raise StageError(
            "needs the 'fork' start method of multiprocessing (Linux, macOS), which this "
            "platform lacks: on Windows, run the pipeline in WSL"
        )
    workers = settings.workers or cpu_count()
    slots = TaskSlots(
        TASKS_PER_WORKER * workers + 1,
        max(task_size(v.shape) * math.prod(v.shape) for v in views.values()),
    )
    # The workers are forked (they inherit the slots), and first, so that they do not inherit
    # (and count) the file lists.
    fork = multiprocessing.get_context("fork")
    with fork.Pool(workers, initializer=_init_worker, initargs=(slots,)) as pool:
        sources = {s: split_files(split_dir / s) for s in SPLITS}
        class_names = sorted(
            {p.name for s in SPLITS for p in (split_dir / s).iterdir() if p.is_dir()}
        )
        images = sum(len(f) for f in sources.values())
        total = images * len(views)
        log.info(
            "%d images, %d classes, %d view(s): %s; %d worker processes",
            images,
            len(class_names),
            len(views),
            ", ".join(views),
            workers,
        )
        failures: list[dict[str, str]] = []
        with (
            atomic_directory(out_dir) as staging,
            tqdm(total=total, desc="tabulate", unit="img") as progress,
        ):
            for view_name, view in views.items():
                for split_name in SPLITS:
                    progress.set_postfix_str(f"{view_name}/{split_name}")
                    _, failed = tabulate_split(
                        pool,
                        slots,
                        split_dir / split_name,
                        sources[split_name],
                        class_names,
                        view_name,
                        view,
                        staging / view_name / f"{split_name}.parquet",
                        settings.rows_per_group,
                        progress,
                        workers,
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
