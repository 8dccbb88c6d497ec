"""Tests for the `imgpipe-predict` command, run in-process on a model folder and image files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from imgpipe.classifier import Classifier
from imgpipe.model_folder import META_FILE, ModelMeta
from imgpipe.numpy_net import NumpyMLP
from imgpipe.predict import iter_image_paths, main

CLASS_NAMES = ["cat", "dog", "bird"]
VIEW = {"view": "gray8x6", "height": 8, "width": 6, "color": "grayscale"}
HEADER = ["path", "label", "probability"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder as the train stage writes it, holding an untrained NumpyMLP."""
    folder = tmp_path_factory.mktemp("numpy_mlp")
    n_inputs = VIEW["height"] * VIEW["width"]
    NumpyMLP([n_inputs, 8, len(CLASS_NAMES)], output="softmax", init="he", seed=0).save(
        folder / "model.npz"
    )
    meta = ModelMeta(model="numpy_mlp", class_names=CLASS_NAMES, **VIEW)
    (folder / META_FILE).write_text(json.dumps(meta.to_json()))
    return folder


@pytest.fixture
def image_dir(
    tmp_path: Path,
    tree_writer: Callable[[Path, Mapping[str, bytes]], Path],
    image_factory: Callable[[str, int], bytes],
    corrupt_bytes: dict[str, bytes],
) -> Path:
    """Three good images (one in a subfolder), a .DS_Store and a broken JPEG."""
    return tree_writer(
        tmp_path / "images",
        {
            "b.jpg": image_factory("rgb.jpg", 1),
            "a.png": image_factory("gray.png", 2),
            ".DS_Store": b"\x00\x00\x00\x01Bud1",
            "broken.jpg": corrupt_bytes["truncated.jpg"],
            "nested/c.png": image_factory("rgba.png", 3),
        },
    )


def good_images(image_dir: Path) -> list[Path]:
    """The readable images of image_dir, in the order the command lists them."""
    return [image_dir / "a.png", image_dir / "b.jpg", image_dir / "nested" / "c.png"]


def expected_rows(model_dir: Path, paths: list[Path]) -> list[list[str]]:
    """[path, label, probability] for each path, straight from the Classifier."""
    results = Classifier.load(model_dir).classify_bytes([p.read_bytes() for p in paths])
    rows = []
    for path, result in zip(paths, results, strict=True):
        assert isinstance(result, tuple), f"{path}: {result}"
        rows.append([str(path), result[0], f"{result[1]:.4f}"])
    return rows


def test_iter_image_paths_skips_hidden_files_and_recurses(image_dir: Path) -> None:
    listed = list(iter_image_paths([image_dir]))
    assert listed == [
        image_dir / "a.png",
        image_dir / "b.jpg",
        image_dir / "broken.jpg",
        image_dir / "nested" / "c.png",
    ]
    # a file named directly is kept whatever its name
    assert list(iter_image_paths([image_dir / ".DS_Store"])) == [image_dir / ".DS_Store"]


def test_predict_prints_and_writes_one_row_per_good_image(
    model_dir: Path, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_csv = tmp_path / "results" / "predictions.csv"  # its folder does not exist yet

    code = main([str(model_dir), str(image_dir), "--out", str(out_csv)])

    captured = capsys.readouterr()
    assert code == 0
    expected = expected_rows(model_dir, good_images(image_dir))
    printed = [line.split(",") for line in captured.out.splitlines()]
    assert printed == expected
    for _, label, probability in printed:
        assert label in CLASS_NAMES
        assert 1 / len(CLASS_NAMES) <= float(probability) <= 1

    assert "broken.jpg" in captured.err
    assert "1 of 4 files" in captured.err
    assert ".DS_Store" not in captured.out + captured.err

    with out_csv.open(newline="") as handle:
        written = list(csv.reader(handle))
    assert written == [HEADER, *expected]


def test_predict_replaces_out_whole_never_in_place(
    model_dir: Path, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out is written beside itself and renamed into place: a reader of the old file keeps
    reading the old file whole, and nothing is left over."""
    out_csv = tmp_path / "predictions.csv"
    out_csv.write_text("old,rows\n" * 1000)
    with out_csv.open() as old_reader:
        assert main([str(model_dir), str(image_dir), "--out", str(out_csv)]) == 0
        assert old_reader.read() == "old,rows\n" * 1000  # the old file, untouched
    with out_csv.open(newline="") as handle:
        assert list(csv.reader(handle)) == [
            HEADER,
            *expected_rows(model_dir, good_images(image_dir)),
        ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "predictions.csv"]


def test_predict_refuses_an_out_that_is_a_symlink(
    model_dir: Path, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "bashrc"
    target.write_text("precious\n")
    link = tmp_path / "predictions.csv"
    link.symlink_to(target)
    with pytest.raises(SystemExit, match=r"^2$"):
        main([str(model_dir), str(image_dir), "--out", str(link)])
    assert f"--out {link} is a symlink" in capsys.readouterr().err
    assert target.read_text() == "precious\n" and link.is_symlink()


def test_predict_batches_do_not_change_results(
    model_dir: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(model_dir), str(image_dir)]) == 0
    whole = capsys.readouterr().out
    assert main([str(model_dir), str(image_dir), "--batch-size", "1"]) == 0
    assert capsys.readouterr().out == whole


def test_predict_accepts_files_and_reports_missing_ones(
    model_dir: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, missing = image_dir / "b.jpg", image_dir / "missing.png"

    code = main([str(model_dir), str(image), str(missing)])

    captured = capsys.readouterr()
    assert code == 0  # some images were classified
    assert [line.split(",") for line in captured.out.splitlines()] == expected_rows(
        model_dir, [image]
    )
    assert f"{missing}: cannot read" in captured.err


def test_predict_without_a_model_folder_returns_2(
    tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([str(tmp_path / "models" / "dense"), str(image_dir)])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith("imgpipe-predict: ")
    assert "dvc repro" in captured.err


def test_predict_with_only_bad_images_returns_1(
    model_dir: Path,
    tmp_path: Path,
    tree_writer: Callable[[Path, Mapping[str, bytes]], Path],
    corrupt_bytes: dict[str, bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad_dir = tree_writer(tmp_path / "bad", corrupt_bytes)
    out_csv = tmp_path / "predictions.csv"

    code = main([str(model_dir), str(bad_dir), "--out", str(out_csv)])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    for name in corrupt_bytes:
        assert str(bad_dir / name) in captured.err
    assert f"{len(corrupt_bytes)} of {len(corrupt_bytes)} files" in captured.err
    with out_csv.open(newline="") as handle:
        assert list(csv.reader(handle)) == [HEADER]


def test_predict_rejects_a_missing_image_argument(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit, match=r"^2$"):  # argparse's exit status for a usage error
        main([str(model_dir)])
    assert "images" in capsys.readouterr().err


def test_predict_results_match_the_model_on_decoded_pixels(
    model_dir: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(model_dir), str(image_dir / "a.png")]) == 0
    path, label, probability = capsys.readouterr().out.strip().split(",")
    assert path == str(image_dir / "a.png")
    classifier = Classifier.load(model_dir)
    proba = classifier.predict_proba(classifier.decode((image_dir / "a.png").read_bytes())[None])
    assert label == CLASS_NAMES[int(np.argmax(proba[0]))]
    assert float(probability) == pytest.approx(float(proba.max()), abs=5e-5)


@pytest.mark.parametrize("batch_size", ["0", "-3"])
def test_predict_rejects_a_batch_size_below_one(
    model_dir: Path, image_dir: Path, batch_size: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit, match=r"^2$"):  # argparse's exit status for a usage error
        main([str(model_dir), str(image_dir), "--batch-size", batch_size])
    assert "--batch-size" in capsys.readouterr().err


def test_predict_stops_printing_quietly_when_the_reader_goes_away(
    model_dir: Path, tmp_path: Path, image_factory: Callable[[str, int], bytes]
) -> None:
    """`imgpipe-predict ... | head -1`: no BrokenPipeError traceback, --out still complete."""
    images = tmp_path / "many"
    images.mkdir()
    for index in range(2000):  # more lines than a pipe buffers once the reader has gone
        (images / f"{index:04d}.png").write_bytes(image_factory("gray.png", index))
    out_csv = tmp_path / "out.csv"
    command = [sys.executable, "-m", "imgpipe.predict", str(model_dir), str(images)]
    command += ["--out", str(out_csv), "--batch-size", "50"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    first = process.stdout.readline()
    process.stdout.close()  # the reader goes away, as `head -1` does
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert process.wait(timeout=120) == 0, stderr
    assert first.decode().startswith(str(images))
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    with out_csv.open(newline="") as handle:
        assert len(list(csv.reader(handle))) == 2001  # header + every image


def _write_table(path: Path, shape: tuple[int, int, int], rows: int, rows_per_group: int) -> Path:
    """A pixel table as tabulate writes it: `rows` random images in row groups."""
    from imgpipe.tables import TableWriter, record_batch, table_schema

    schema = table_schema(shape, CLASS_NAMES, "gray8x6")
    pixels = np.random.default_rng(0).integers(0, 256, (rows, *shape), dtype=np.uint8)
    labels = np.arange(rows) % len(CLASS_NAMES)
    sources = [f"{CLASS_NAMES[label]}/{index:03d}.png" for index, label in enumerate(labels)]
    with TableWriter(path, schema) as writer:
        for start in range(0, rows, rows_per_group):
            stop = start + rows_per_group
            writer.write(
                record_batch(schema, pixels[start:stop], labels[start:stop], sources[start:stop])
            )
    return path


def test_predict_reads_a_pixel_table_row_group_by_row_group(
    model_dir: Path, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A table's rows are named <table>:<source>, in file order, beside image files."""
    table = _write_table(tmp_path / "test.parquet", (8, 6, 1), rows=23, rows_per_group=5)
    from imgpipe.tables import read_table

    whole = read_table(table)
    proba = Classifier.load(model_dir).predict_proba(whole.pixels)

    code = main([str(model_dir), str(table), str(image_dir / "b.jpg"), "--batch-size", "4"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = [line.split(",") for line in captured.out.splitlines()]
    assert printed[:23] == [
        [f"{table}:{source}", CLASS_NAMES[int(p.argmax())], f"{p.max():.4f}"]
        for source, p in zip(whole.sources, proba, strict=True)
    ]
    assert printed[23:] == expected_rows(model_dir, [image_dir / "b.jpg"])


def test_predict_refuses_a_table_of_another_view(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _write_table(tmp_path / "rgb.parquet", (8, 6, 3), rows=4, rows_per_group=4)

    code = main([str(model_dir), str(table)])

    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "holds 8x6x3 pixels (view gray8x6) but the model reads 8x6x1" in captured.err
    assert "meta.json" in captured.err


def test_predict_refuses_a_parquet_file_that_is_not_a_pixel_table(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), other)

    assert main([str(model_dir), str(other)]) == 2
    err = capsys.readouterr().err
    assert "is not a pixel table written by the tabulate stage" in err
    assert "Traceback" not in err


def test_predict_engine_ray_without_ray_says_how_to_install_it(
    model_dir: Path, image_dir: Path
) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"  # what `import ray` meets without the extra
        "from imgpipe.predict import main\n"
        f"sys.exit(main([{str(model_dir)!r}, {str(image_dir)!r}, '--engine', 'ray']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert 'pip install -e ".[ray]"' in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
