"""Tests for Parquet pixel tables: exact round trips, compact schema, atomic writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe.tables import (
    TableWriter,
    read_table,
    record_batch,
    table_info,
    table_schema,
)

CLASS_NAMES = ["cat", "dog", "fox"]


def _pixels(seed: int, count: int, shape: tuple[int, int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)


def _write(
    path: Path,
    shape: tuple[int, int, int],
    batch_sizes: list[int],
    view: str = "v",
    *,
    background: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Write batches of random rows; return all pixels (N, H, W, C), labels (N,), sources."""
    schema = table_schema(shape, CLASS_NAMES, view)
    all_pixels, all_labels, all_sources = [], [], []
    with TableWriter(path, schema, background=background) as writer:
        for batch_number, count in enumerate(batch_sizes):
            pixels = _pixels(batch_number, count, shape)
            labels = (
                np.random.default_rng(100 + batch_number).integers(0, 3, count).astype(np.int16)
            )
            sources = [
                f"{CLASS_NAMES[label]}/{batch_number}_{i}.jpg" for i, label in enumerate(labels)
            ]
            writer.write(record_batch(schema, pixels, labels, sources))
            all_pixels.append(pixels)
            all_labels.append(labels)
            all_sources += sources
        assert writer.rows == sum(batch_sizes)
    return np.concatenate(all_pixels), np.concatenate(all_labels), all_sources


@pytest.mark.parametrize("shape", [(5, 4, 3), (6, 6, 1), (1, 9, 3)])
def test_round_trip_is_exact(tmp_path: Path, shape: tuple[int, int, int]) -> None:
    path = tmp_path / "tables" / "train.parquet"
    pixels, labels, sources = _write(path, shape, [4, 3, 5], view="rgb_small")
    table = read_table(path)
    assert table.pixels.dtype == np.uint8
    assert table.pixels.shape == (len(labels), *shape)
    np.testing.assert_array_equal(table.pixels, pixels)
    np.testing.assert_array_equal(table.labels, labels)
    assert table.labels.dtype == np.int64
    assert table.sources == sources
    assert table.class_names == CLASS_NAMES
    assert table.view == "rgb_small"


def test_table_info_reads_the_footer(tmp_path: Path) -> None:
    path = tmp_path / "val.parquet"
    _, labels, _ = _write(path, (7, 3, 1), [2, 6], view="gray7")
    shape, class_names, view, rows = table_info(path)
    assert tuple(shape) == (7, 3, 1)
    assert class_names == CLASS_NAMES
    assert view == "gray7"
    assert rows == len(labels)


def test_each_batch_is_a_row_group(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    _write(path, (2, 2, 3), [3, 3, 1])
    assert pq.ParquetFile(path).metadata.num_row_groups == 3


def test_label_column_matches_label_index(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    _, labels, _ = _write(path, (2, 2, 1), [5, 5])
    names = pq.read_table(path, columns=["label"]).column("label").to_pylist()
    assert names == [CLASS_NAMES[i] for i in labels]


def test_reading_without_sources(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pixels, _, _ = _write(path, (3, 3, 3), [4])
    table = read_table(path, with_sources=False)
    assert table.sources == []
    np.testing.assert_array_equal(table.pixels, pixels)


def test_pixel_column_is_compact_bytes_not_floats(tmp_path: Path) -> None:
    shape = (4, 5, 3)
    path = tmp_path / "t.parquet"
    _write(path, shape, [2])
    schema = pq.read_schema(path)
    pixel_type = schema.field("pixels").type
    assert not pa.types.is_floating(pixel_type)
    assert not pa.types.is_list(pixel_type)
    assert pa.types.is_fixed_size_binary(pixel_type)
    assert pixel_type.byte_width == 4 * 5 * 3  # one uint8 per value
    assert pa.types.is_integer(schema.field("label_index").type)


def test_empty_table_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "test.parquet"
    with TableWriter(path, table_schema((3, 2, 1), CLASS_NAMES, "v")):
        pass
    table = read_table(path)
    assert table.pixels.shape == (0, 3, 2, 1)
    assert table.labels.shape == (0,)
    assert table_info(path)[3] == 0


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    out_dir = tmp_path / "tables"
    path = out_dir / "train.parquet"
    schema = table_schema((2, 2, 1), CLASS_NAMES, "v")
    with pytest.raises(RuntimeError, match="decoder crashed"), TableWriter(path, schema) as writer:
        writer.write(
            record_batch(schema, _pixels(0, 3, (2, 2, 1)), np.zeros(3, np.int16), ["a", "b", "c"])
        )
        partials = [p for p in out_dir.iterdir() if p != path]
        assert partials  # rows go to a partial file while writing ...
        raise RuntimeError("decoder crashed")
    assert not path.exists()
    assert list(out_dir.iterdir()) == []  # ... which is removed on failure


def test_background_writing_gives_the_same_file(tmp_path: Path) -> None:
    _write(tmp_path / "direct.parquet", (6, 5, 3), [7, 7, 2])
    _write(tmp_path / "background.parquet", (6, 5, 3), [7, 7, 2], background=True)
    direct = (tmp_path / "direct.parquet").read_bytes()
    assert (tmp_path / "background.parquet").read_bytes() == direct


@pytest.mark.parametrize("fails_at", ["write", "close"])
def test_background_write_error_reaches_the_caller_and_leaves_no_file(
    tmp_path: Path, fails_at: str
) -> None:
    schema = table_schema((2, 2, 1), CLASS_NAMES, "v")
    other = table_schema((3, 2, 1), CLASS_NAMES, "v")  # its batches do not fit this file
    bad = record_batch(other, _pixels(0, 2, (3, 2, 1)), np.zeros(2, np.int16), ["a", "b"])
    good = record_batch(schema, _pixels(1, 2, (2, 2, 1)), np.zeros(2, np.int16), ["c", "d"])
    good_writes = 0
    with (
        pytest.raises(ValueError, match="schema"),  # pyarrow: "... does not match schema ..."
        TableWriter(tmp_path / "t.parquet", schema, background=True) as writer,
    ):
        writer.write(good)
        writer.write(bad)  # fails in the writing thread, a little later
        if fails_at == "write":
            # one batch waits at most: once the third is queued, the thread is done with `bad`
            for _ in range(3):
                writer.write(good)
                good_writes += 1
    assert good_writes < 3
    assert list(tmp_path.iterdir()) == []


def test_final_file_appears_only_on_close(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    schema = table_schema((2, 2, 1), CLASS_NAMES, "v")
    writer = TableWriter(path, schema)
    writer.write(
        record_batch(schema, _pixels(0, 2, (2, 2, 1)), np.array([0, 1], np.int16), ["a", "b"])
    )
    assert not path.exists()
    writer.close()
    assert path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]


@pytest.mark.parametrize(
    ("pixels", "labels"),
    [
        (np.zeros((2, 2, 2, 1), dtype=np.float32), np.zeros(2, np.int16)),  # not uint8
        (np.zeros((3, 2, 2, 1), dtype=np.uint8), np.zeros(2, np.int16)),  # row count mismatch
    ],
)
def test_record_batch_refuses_bad_pixels(pixels: np.ndarray, labels: np.ndarray) -> None:
    schema = table_schema((2, 2, 1), CLASS_NAMES, "v")
    with pytest.raises(ValueError, match="uint8"):
        record_batch(schema, pixels, labels, ["s"] * len(labels))


def test_record_batch_accepts_non_contiguous_pixels(tmp_path: Path) -> None:
    base = _pixels(5, 4, (3, 3, 3))
    flipped = base[:, :, ::-1]  # a view with negative strides
    schema = table_schema((3, 3, 3), CLASS_NAMES, "v")
    path = tmp_path / "t.parquet"
    with TableWriter(path, schema) as writer:
        writer.write(record_batch(schema, flipped, np.zeros(4, np.int16), ["s"] * 4))
    np.testing.assert_array_equal(read_table(path).pixels, flipped)


def test_record_batch_equals_the_plain_pyarrow_batch() -> None:
    schema = table_schema((2, 2, 1), CLASS_NAMES, "v")
    pixels = _pixels(3, 4, (2, 2, 1))
    labels = np.array([2, 0, 1, 2], np.int16)
    sources = ["fox/a.jpg", "cat/é ü.png", "dog/b.jpg", "fox/日本.jpg"]
    plain = pa.record_batch(
        [
            pa.array([CLASS_NAMES[i] for i in labels], pa.string()),
            pa.array(labels, pa.int16()),
            pa.array(sources, pa.string()),
            pa.array([p.tobytes() for p in pixels], pa.binary(4)),
        ],
        schema=schema,
    )
    batch = record_batch(schema, pixels, labels, sources)
    batch.validate(full=True)
    assert batch.equals(plain)


def test_writing_a_table_does_not_import_pandas(tmp_path: Path) -> None:
    # pa.array() imports pandas on its first call: 0.4 s that the tabulate stage does not need
    code = (
        "import sys, numpy as np\n"
        "from imgpipe.tables import TableWriter, record_batch, table_schema\n"
        "schema = table_schema((2, 2, 1), ['a', 'b'], 'v')\n"
        f"with TableWriter({str(tmp_path / 't.parquet')!r}, schema) as writer:\n"
        "    writer.write(record_batch(schema, np.zeros((2, 2, 2, 1), np.uint8),\n"
        "                              np.array([0, 1], np.int16), ['a/1', 'b/2']))\n"
        "assert 'pandas' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
