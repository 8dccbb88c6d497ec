"""Parquet pixel tables: one row per image, pixels as fixed-size uint8 bytes, shape in metadata."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_META_SHAPE = b"imgpipe.shape"
_META_CLASSES = b"imgpipe.class_names"
_META_VIEW = b"imgpipe.view"


def table_schema(shape: tuple[int, int, int], class_names: Sequence[str], view: str) -> pa.Schema:
    """Arrow schema of a pixel table; the image shape and class names ride in its metadata."""
    height, width, channels = shape
    return pa.schema(
        [
            pa.field("label", pa.string(), nullable=False),
            pa.field("label_index", pa.int16(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            # (H * W * C) uint8 bytes per row: read back with one np.frombuffer, no row loop
            pa.field("pixels", pa.binary(height * width * channels), nullable=False),
        ],
        metadata={
            _META_SHAPE: json.dumps([height, width, channels]).encode(),
            _META_CLASSES: json.dumps(list(class_names)).encode(),
            _META_VIEW: view.encode(),
        },
    )


def record_batch(
    schema: pa.Schema,
    pixels: np.ndarray,
    label_indices: np.ndarray,
    sources: Sequence[str],
) -> pa.RecordBatch:
    """A batch of rows from pixels (N, H, W, C) uint8 and label indices (N,)."""
    class_names = json.loads(schema.metadata[_META_CLASSES])
    count = len(label_indices)
    if pixels.dtype != np.uint8 or pixels.shape[0] != count:
        raise ValueError(
            f"pixels must be uint8 with {count} rows, got {pixels.dtype} {pixels.shape}"
        )
    flat = np.ascontiguousarray(pixels).reshape(-1)
    row_bytes = schema.field("pixels").type.byte_width
    pixel_array = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(row_bytes), count, [None, pa.py_buffer(flat)]
    )
    # Columns are built from buffers: pa.array() imports pandas on its first call (0.4 s, a
    # tenth of the time tabulate takes for 20,000 images) and the tabulate stage never needs it.
    indices = pa.Array.from_buffers(
        pa.int16(), count, [None, pa.py_buffer(np.ascontiguousarray(label_indices, np.int16))]
    )
    return pa.RecordBatch.from_arrays(
        [_string_array(class_names).take(indices), indices, _string_array(sources), pixel_array],
        schema=schema,
    )


def _string_array(values: Sequence[str]) -> pa.Array:
    """A pyarrow string array, equal to pa.array(values, pa.string()), without pa.array()."""
    encoded = [value.encode() for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(encoded), buffers)


class TableWriter:
    """Streams record batches into a Parquet file that appears only once it is complete.

    With `background=True`, batches are encoded and compressed in a thread of their own (Arrow
    releases the GIL while it writes), at most one batch waiting: the caller goes on producing
    the next row group meanwhile. The file is the same either way.
    """

    def __init__(self, path: str | Path, schema: pa.Schema, *, background: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._writer = pq.ParquetWriter(
            self._partial,
            schema,
            compression="zstd",
            compression_level=1,
            use_dictionary=["label", "source"],
            write_statistics=["label", "label_index"],
        )
        self.rows = 0
        self._error: BaseException | None = None  # the background thread's, raised here
        self._queue: queue.Queue[pa.RecordBatch | None] | None = None
        if background:
            self._queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(
                target=self._write_queued, name=f"write {self.path.name}", daemon=True
            )
            self._thread.start()

    def _write_queued(self) -> None:
        assert self._queue is not None
        while (batch := self._queue.get()) is not None:
            if self._error is None:  # after an error, only drain, so that write() never blocks
                try:
                    self._writer.write_batch(batch)
                except BaseException as error:  # handed to the caller's thread
                    self._error = error

    def _stop_thread(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None

    def _raise_background_error(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, batch: pa.RecordBatch) -> None:
        """Append one batch as one row group."""
        if self._queue is None:
            self._writer.write_batch(batch)
        else:
            self._raise_background_error()
            self._queue.put(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        """Finish the file and move it into place atomically (or drop it, if a write failed)."""
        self._stop_thread()
        if self._error is not None:
            self.abort()
            self._raise_background_error()
        self._writer.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        self._stop_thread()
        self._writer.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class PixelTable:
    """A pixel table read back into arrays."""

    pixels: np.ndarray  # (N, H, W, C) uint8, read-only view of the Arrow buffer
    labels: np.ndarray  # (N,) int64 label indices
    sources: list[str]
    class_names: list[str]
    view: str


def table_info(path: str | Path) -> tuple[tuple[int, int, int], list[str], str, int]:
    """(shape, class names, view name, row count) from a table's footer, without reading pixels."""
    meta = pq.read_metadata(path)
    schema_meta = meta.schema.to_arrow_schema().metadata
    shape = tuple(json.loads(schema_meta[_META_SHAPE]))
    return (
        shape,
        json.loads(schema_meta[_META_CLASSES]),
        schema_meta[_META_VIEW].decode(),
        meta.num_rows,
    )  # type: ignore[return-value]


def pixels_from_column(column: pa.ChunkedArray | pa.Array, shape: Sequence[int]) -> np.ndarray:
    """(N, H, W, C) uint8 view over a fixed-size binary pixel column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    row_bytes = column.type.byte_width
    data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    start = column.offset * row_bytes
    return data[start : start + len(column) * row_bytes].reshape(len(column), *shape)


def read_table(path: str | Path, *, with_sources: bool = True) -> PixelTable:
    """Read a whole pixel table: pixels as uint8 (no float copy), labels as int64."""
    columns = ["label_index", "pixels"] + (["source"] if with_sources else [])
    table = pq.read_table(path, columns=columns)
    meta = table.schema.metadata
    shape = json.loads(meta[_META_SHAPE])
    return PixelTable(
        pixels=pixels_from_column(table.column("pixels"), shape),
        labels=table.column("label_index").to_numpy().astype(np.int64),
        sources=table.column("source").to_pylist() if with_sources else [],
        class_names=json.loads(meta[_META_CLASSES]),
        view=meta[_META_VIEW].decode(),
    )


def label_counts(path: str | Path) -> list[int]:
    """Images of each class in a table (in class_names' order), from its labels alone."""
    _, class_names, _, _ = table_info(path)
    labels = pq.read_table(path, columns=["label_index"]).column("label_index").to_numpy()
    return np.bincount(labels.astype(np.int64), minlength=len(class_names)).tolist()


def shuffle_buffer_batches(
    row_groups: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    rng: np.random.Generator,
    batch_size: int,
    buffer_rows: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mini-batches of (pixels (B, H, W, C), labels (B,)) drawn at random through a buffer.

    Each row group that arrives joins the buffer; whenever the buffer then holds more than
    `buffer_rows` rows, whole batches of rows chosen at random from all it holds leave it until
    it holds at most that many again. Once the row groups run out, what is left leaves in a
    random order. Every row comes out exactly once; every batch but the last is full, so an epoch
    has ceil(rows / batch_size) batches, as in memory. Rows held: at most
    max(buffer_rows, batch_size - 1) plus one row group. The order depends only on the rows and
    on `rng`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pixels: np.ndarray | None = None  # (capacity, H, W, C) uint8: the buffer, rows [0, held)
    labels: np.ndarray | None = None  # (capacity,)
    held = 0
    for group_pixels, group_labels in row_groups:
        arriving = len(group_labels)
        if pixels is None or labels is None or held + arriving > len(pixels):
            # the first group, or a bigger one than seen so far: a buffer that fits it
            capacity = max(buffer_rows, batch_size - 1) + arriving
            grown = np.empty((capacity, *group_pixels.shape[1:]), dtype=group_pixels.dtype)
            grown_labels = np.empty(capacity, dtype=group_labels.dtype)
            if pixels is not None and labels is not None:
                grown[:held], grown_labels[:held] = pixels[:held], labels[:held]
            pixels, labels = grown, grown_labels
        pixels[held : held + arriving] = group_pixels
        labels[held : held + arriving] = group_labels
        held += arriving
        if held <= buffer_rows:
            continue
        over = held - buffer_rows
        leaving = min(-(-over // batch_size), held // batch_size) * batch_size
        chosen = rng.permutation(held)[:leaving]  # (leaving,) rows, in the order they leave
        for start in range(0, leaving, batch_size):
            rows = chosen[start : start + batch_size]
            yield pixels[rows], labels[rows]  # copies: the buffer changes after the last one
        # close the gaps: rows kept beyond the new end move into the rows that left before it
        kept = held - leaving
        left = np.zeros(held, dtype=bool)
        left[chosen] = True
        gaps = np.flatnonzero(left[:kept])
        movers = kept + np.flatnonzero(~left[kept:])
        pixels[gaps], labels[gaps] = pixels[movers], labels[movers]
        held = kept
    if pixels is None or labels is None or not held:
        return
    rest = rng.permutation(held)
    for start in range(0, held, batch_size):
        rows = rest[start : start + batch_size]
        yield pixels[rows], labels[rows]


def ordered_batches(
    row_groups: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mini-batches of the rows in the order they come, every one full but the last (batches
    run across row groups), as slicing the whole table would give them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    carried: tuple[np.ndarray, np.ndarray] | None = None  # the last group's tail, < batch_size
    for group_pixels, group_labels in row_groups:
        start = 0
        if carried is not None:
            start = min(batch_size - len(carried[1]), len(group_labels))
            carried = (
                np.concatenate([carried[0], group_pixels[:start]]),
                np.concatenate([carried[1], group_labels[:start]]),
            )
            if len(carried[1]) < batch_size:
                continue
            yield carried
            carried = None
        whole = start + (len(group_labels) - start) // batch_size * batch_size
        for first in range(start, whole, batch_size):
            yield group_pixels[first : first + batch_size], group_labels[first : first + batch_size]
        if whole < len(group_labels):
            carried = (group_pixels[whole:].copy(), group_labels[whole:].copy())
    if carried is not None:
        yield carried


class TableStream:
    """A pixel table too big to read whole, read one row group at a time.

    `shuffled_batches` gives an epoch's mini-batches through a seeded shuffle buffer of
    `shuffle_rows` rows, in an order that depends only on (seed, epoch): a run resumed at epoch k
    sees the batches of a run that never stopped. `ordered_batches` gives them in file order.
    Each epoch opens the file afresh, so two epochs (or two streams) may be read at once.
    """

    def __init__(self, path: str | Path, *, shuffle_rows: int) -> None:
        if shuffle_rows < 0:
            raise ValueError(f"shuffle_rows must be >= 0, got {shuffle_rows}")
        self.path = Path(path)
        self.shuffle_rows = shuffle_rows
        metadata = pq.read_metadata(self.path)
        schema_meta = metadata.schema.to_arrow_schema().metadata
        self.shape: tuple[int, int, int] = tuple(json.loads(schema_meta[_META_SHAPE]))  # type: ignore[assignment]
        self.class_names: list[str] = json.loads(schema_meta[_META_CLASSES])
        self.rows = metadata.num_rows
        # rows of each row group, in file order
        self.group_rows = tuple(
            metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)
        )

    @property
    def pixel_bytes(self) -> int:
        """Bytes of the whole table's pixels once read (uncompressed uint8)."""
        return self.rows * int(np.prod(self.shape))

    def batch_count(self, batch_size: int) -> int:
        """Mini-batches in one epoch: ceil(rows / batch_size), as for the table in memory."""
        return -(-self.rows // batch_size)

    def row_groups(self, order: Iterable[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(pixels (G, H, W, C) uint8, labels (G,) int64) of each row group in `order`."""
        with pq.ParquetFile(self.path) as parquet:
            for group in order:
                table = parquet.read_row_group(int(group), columns=["label_index", "pixels"])
                pixels = pixels_from_column(table.column("pixels"), self.shape)
                yield pixels, table.column("label_index").to_numpy().astype(np.int64)

    def shuffled_batches(
        self, batch_size: int, *, seed: int, epoch: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch's mini-batches: the row groups in a random order, through the buffer."""
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self.group_rows))
        return shuffle_buffer_batches(
            self.row_groups(order), rng=rng, batch_size=batch_size, buffer_rows=self.shuffle_rows
        )

    def ordered_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The table's mini-batches in file order (validation: no shuffling)."""
        return ordered_batches(self.row_groups(range(len(self.group_rows))), batch_size)

    def head(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `rows` rows in file order (pixels, labels), reading only their row groups."""
        needed, total = [], 0
        for group, count in enumerate(self.group_rows):
            if total >= rows:
                break
            needed.append(group)
            total += count
        parts = list(self.row_groups(needed))
        if not parts:
            return np.empty((0, *self.shape), np.uint8), np.empty(0, np.int64)
        pixels = np.concatenate([p for p, _ in parts])[:rows]
        return pixels, np.concatenate([y for _, y in parts])[:rows]
