"""Parquet pixel tables: one row per image, pixels as fixed-size uint8 bytes, shape in metadata."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
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
    return pa.record_batch(
        [
            pa.array([class_names[i] for i in label_indices], pa.string()),
            pa.array(label_indices, pa.int16()),
            pa.array(list(sources), pa.string()),
            pixel_array,
        ],
        schema=schema,
    )


class TableWriter:
    """Streams record batches into a Parquet file that appears only once it is complete."""

    def __init__(self, path: str | Path, schema: pa.Schema) -> None:
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

    def write(self, batch: pa.RecordBatch) -> None:
        """Append one batch as one row group."""
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        """Finish the file and move it into place atomically."""
        self._writer.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Drop the partial file."""
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
