"""A corpus of bad inputs through split and tabulate, hostile archives, and safe loading.

Every file either becomes a correct table row or is skipped with its reason in the split report;
the stages finish; the counts add up. Archives that try to escape are refused whole.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imgpipe import images
from imgpipe.images import RawSource, check_image, printable
from imgpipe.numpy_net import NumpyMLP
from imgpipe.splitting import SPLITS
from imgpipe.tables import read_table
from tests.support import (
    ROOT,
    data_stage_params,
    encode,
    exif_rotated_jpeg,
    load_repo_params,
    make_image,
    run_forking_stage,
    write_tree,
    write_zip,
)

NOT_UTF8 = os.fsdecode(b"caf\xe9-\xff.png")  # Linux allows any bytes in a name


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb."""
    png = encode(Image.new("L", (1, 1)), "PNG")
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return png[:8] + ihdr + png[8 + len(ihdr) :]


def good_images() -> dict[str, bytes]:
    """Every format, mode and size the pipeline must accept, named as a user might."""
    noise = np.random.default_rng(5).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    picture = Image.fromarray(noise)
    return {
        "cat/anim.gif": encode(picture.convert("P"), "GIF"),
        "cat/old.bmp": encode(picture, "BMP"),
        "cat/web.webp": encode(picture, "WEBP", lossless=True),
        "cat/scan.tiff": encode(picture, "TIFF"),
        "cat/print.jpg": make_image("cmyk.jpg", 11),
        "cat/deep.png": make_image("gray16.png", 12),
        "cat/alpha.png": make_image("rgba.png", 13),
        "cat/indexed.png": make_image("palette.png", 14),
        "cat/rotated.jpg": exif_rotated_jpeg(40, 20),
        "cat/dot.png": encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
        "cat/huge.jpg": encode(Image.new("RGB", (4000, 3000), (30, 160, 90)), "JPEG"),
        "cat/SHOUT.JPG": make_image("rgb.jpg", 15),
        "cat/Mixed.PnG": make_image("gray.png", 16),
        f"cat/{NOT_UTF8}": make_image("gray.png", 17),
        **{f"dog/{index}.jpg": make_image("rgb.jpg", 100 + index) for index in range(12)},
    }


BAD = {
    "cat/truncated.jpg": "cannot decode",
    "cat/empty.jpg": "empty file",
    "cat/notes.jpg": "not an image",
    "cat/bomb.png": "decompression bomb",
    "cat/vector.eps": "not an image in an accepted format",  # Pillow would start Ghostscript
    "cat/icon.ico": "not an image in an accepted format",
    "stray.jpg": "class",
}
SYSTEM = (".DS_Store", "dog/.DS_Store", "dog/Thumbs.db", "__MACOSX/cat/._anim.gif", "cat/.hid.jpg")
CORPUS_VIEWS = {
    "gray8": {"height": 8, "width": 8, "color": "grayscale"},
    "rgb20": {"height": 20, "width": 40, "color": "rgb"},
}


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """split + tabulate on a folder holding the whole corpus; yields (project, report)."""
    project = tmp_path_factory.mktemp("corpus")
    raw = project / "raw"
    jpeg = make_image("rgb.jpg", 99)
    files = {
        **good_images(),
        "cat/truncated.jpg": jpeg[: len(jpeg) // 2],
        "cat/empty.jpg": b"",
        "cat/notes.jpg": b"a text file named like a JPEG\n",
        "cat/bomb.png": bomb_png(),
        "cat/vector.eps": encode(Image.new("RGB", (8, 6), (200, 10, 10)), "EPS"),
        "cat/icon.ico": encode(Image.new("RGB", (16, 16), (9, 9, 9)), "ICO", sizes=[(16, 16)]),
        "stray.jpg": make_image("rgb.jpg", 98),
        **dict.fromkeys(SYSTEM, b"\x00\x05\x16\x07 clutter"),
        "fox/.DS_Store": b"a class folder with nothing but clutter",
    }
    write_tree(raw, files)
    (raw / "owl").mkdir()  # a class folder with no files at all
    params = data_stage_params(CORPUS_VIEWS, workers=2, rows_per_group=4)
    params["data"]["raw"] = str(raw)
    params["split"]["ratios"] = {"train": 0.5, "val": 0.25, "test": 0.25}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        run_forking_stage("split", "--out", "split", "--report", "report.json")
        run_forking_stage("tabulate", "--split", "split", "--out", "tables")
    yield project, json.loads((project / "report.json").read_text())


def test_corpus_counts_add_up(corpus_run: tuple[Path, dict]) -> None:
    _, report = corpus_run
    good = good_images()
    assert report["files_found"] == len(good) + len(BAD) + len(SYSTEM) + 1  # + fox/.DS_Store
    assert report["system_files_ignored"] == len(SYSTEM) + 1
    assert report["readable"] == report["selected"] == len(good)
    assert sum(report["totals"].values()) == len(good)
    assert report["classes"] == ["cat", "dog"]  # fox and owl hold no images: no class


def test_each_bad_file_is_skipped_with_its_reason(corpus_run: tuple[Path, dict]) -> None:
    _, report = corpus_run
    skipped = {item["path"]: item["reason"] for item in report["skipped"]}
    assert set(skipped) == set(BAD)
    for path, reason_part in BAD.items():
        assert reason_part in skipped[path], (path, skipped[path])


def test_every_good_file_becomes_one_correct_row(corpus_run: tuple[Path, dict]) -> None:
    project, report = corpus_run
    good = good_images()
    expected = sorted(printable(path) for path in good)
    for view in ("gray8", "rgb20"):
        sources: list[str] = []
        for split_name in SPLITS:
            table = read_table(project / "tables" / view / f"{split_name}.parquet")
            assert len(table.sources) == report["totals"][split_name]
            for row, source in enumerate(table.sources):
                assert table.class_names[table.labels[row]] == source.split("/")[0]
            sources += table.sources
            if view == "rgb20" and "cat/rotated.jpg" in table.sources:
                upright = table.pixels[table.sources.index("cat/rotated.jpg")].astype(int)
                left, right = upright[:, :15].mean(axis=(0, 1)), upright[:, 25:].mean(axis=(0, 1))
                assert left[0] > 180 and left[2] < 80  # red on the left: EXIF rotation applied
                assert right[2] > 180 and right[0] < 80
            if view == "rgb20" and "cat/dot.png" in table.sources:
                dot = table.pixels[table.sources.index("cat/dot.png")]
                assert np.all(np.abs(dot.astype(int) - [9, 99, 199]) <= 1)  # 1x1 stretched
        assert sorted(sources) == expected
    assert "cat/caf\\xe9-\\xff.png" in expected  # undecodable bytes as readable escapes


def test_kaggle_zip_with_names_that_do_not_follow_the_pattern(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = {
        **{f"train/cat.{i}.JPG": make_image("rgb.jpg", 200 + i) for i in range(4)},
        **{f"train/dog.{i}.jpeg": make_image("rgb.jpg", 300 + i) for i in range(4)},
        "train/holiday.jpg": make_image("rgb.jpg", 400),  # no <class>.<id>.<ext>
        "train/IMG_0001.JPG": make_image("rgb.jpg", 401),
        "__MACOSX/train/._cat.0.JPG": b"\x00\x05",
    }
    archive = write_zip(tmp_path / "train.zip", entries)
    write_params(tmp_path, archive)
    monkeypatch.chdir(tmp_path)
    run_forking_stage("split", "--out", "split", "--report", "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["classes"] == ["cat", "dog"]
    assert report["selected"] == 8
    skipped = {item["path"]: item["reason"] for item in report["skipped"]}
    assert set(skipped) == {"train/holiday.jpg", "train/IMG_0001.JPG"}
    assert all("<class>.<id>.<ext>" in reason for reason in skipped.values())


# --------------------------------------------------------------------------- hostile archives


def write_params(folder: Path, raw: Path) -> None:
    params = load_repo_params()
    params["data"]["raw"] = str(raw)
    params["split"]["ratios"] = {"train": 0.5, "val": 0.25, "test": 0.25}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def symlink_entry(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("../escape.jpg", "'..' in the path"),
        ("cat/../../escape.jpg", "'..' in the path"),
        ("/tmp/absolute.jpg", "absolute path"),
        ("C:/windows.jpg", "absolute path"),
        ("link.jpg", "symlink"),
    ],
)
def test_archive_that_tries_to_escape_is_refused_and_nothing_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str, reason: str
) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    archive = project / "data" / "raw.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for index in range(3):
            handle.writestr(f"cat/{index}.jpg", make_image("rgb.jpg", 500 + index))
            handle.writestr(f"dog/{index}.jpg", make_image("rgb.jpg", 600 + index))
        if reason == "symlink":
            handle.writestr(*symlink_entry(f"cat/{entry}", "/etc/passwd"))
        else:
            handle.writestr(entry, make_image("rgb.jpg", 700))
    write_params(project, archive)
    monkeypatch.chdir(project)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit, match=r"^\[split\] refusing") as caught:
        run_forking_stage("split", "--out", "data/split", "--report", "data/split-report.json")
    message = str(caught.value.code)
    assert reason in message and "Re-pack" in message
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_unsafe_entry_accepts_ordinary_names() -> None:
    for name in ("cat/1.jpg", "train/dog.2.jpg", "a..b/c..jpg", "x/.../y.jpg"):
        assert images.unsafe_entry(zipfile.ZipInfo(name)) is None, name


def test_zip_bomb_entry_is_skipped_without_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "raw.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for index in range(3):
            handle.writestr(f"cat/{index}.png", make_image("gray.png", 800 + index))
            handle.writestr(f"dog/{index}.png", make_image("gray.png", 900 + index))
        handle.writestr("cat/bomb.bmp", bytes(40 * 2**20))  # 40 MiB of zeros: ~1000:1
    assert archive.stat().st_size < 2**20
    write_params(tmp_path, archive)
    monkeypatch.chdir(tmp_path)
    run_forking_stage("split", "--out", "split", "--report", "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    skipped = {item["path"]: item["reason"] for item in report["skipped"]}
    assert list(skipped) == ["cat/bomb.bmp"]
    assert "zip bomb" in skipped["cat/bomb.bmp"]
    assert report["selected"] == 6
    with pytest.raises(ValueError, match="zip bomb"):
        RawSource(archive).read("cat/bomb.bmp")


def test_oversized_entry_limits() -> None:
    huge = zipfile.ZipInfo("a.jpg")
    huge.file_size, huge.compress_size = images.MAX_ENTRY_BYTES + 1, images.MAX_ENTRY_BYTES
    assert "zip bomb" in (images.oversized_entry(huge) or "")
    normal = zipfile.ZipInfo("b.jpg")
    normal.file_size, normal.compress_size = 5_000_000, 4_900_000
    assert images.oversized_entry(normal) is None
    small_but_squashed = zipfile.ZipInfo("c.bmp")  # a blank BMP: compresses well, still small
    small_but_squashed.file_size, small_but_squashed.compress_size = 1_000_000, 1_000
    assert images.oversized_entry(small_but_squashed) is None


def test_decompression_bomb_is_refused_before_decoding() -> None:
    reason = check_image(bomb_png())
    assert reason is not None and "decompression bomb" in reason
    with Image.open(io.BytesIO(bomb_png(100, 50))) as image:  # the fixture really is a PNG
        assert image.size == (100, 50)


# --------------------------------------------------------------------------- safe loading


def test_no_module_uses_pickle() -> None:
    for path in [*ROOT.glob("imgpipe/*.py"), *ROOT.glob("stages/*.py")]:
        text = path.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, path


def test_numpy_model_with_object_arrays_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    NumpyMLP([4, 3, 2], output="softmax", init="he", seed=0).save(path)
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["W0"] = np.array([object()], dtype=object)  # a pickled payload
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(ValueError, match="pickle"):
        NumpyMLP.load(path)


@pytest.mark.slow
def test_keras_model_with_a_lambda_layer_is_refused(tmp_path: Path) -> None:
    """Safe mode: a .keras file that carries Python code (a Lambda layer) does not load."""
    import keras

    from imgpipe.classifier import Classifier
    from imgpipe.model_folder import META_FILE, ModelMeta

    inputs = keras.Input((2, 2, 1))
    outputs = keras.layers.Lambda(lambda x: x * 2)(keras.layers.Flatten()(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    meta = ModelMeta("dense", "v", 2, 2, "grayscale", ["a", "b"])
    (tmp_path / META_FILE).write_text(json.dumps(meta.to_json()))
    with pytest.raises(ValueError, match="safe_mode"):
        Classifier.load(tmp_path)


def test_predict_refuses_non_image_input_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tree_writer: Callable
) -> None:
    from imgpipe import predict
    from imgpipe.model_folder import META_FILE, ModelMeta

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    NumpyMLP([16, 4, 2], output="softmax", init="he", seed=0).save(model_dir / "model.npz")
    meta = ModelMeta("numpy_mlp", "v", 4, 4, "grayscale", ["a", "b"])
    (model_dir / META_FILE).write_text(json.dumps(meta.to_json()))
    inputs = tree_writer(
        tmp_path / "in",
        {
            "script.py": b"import os\n",
            "data.npy": b"\x93NUMPY",
            "bomb.png": bomb_png(),
            "vector.eps": encode(Image.new("RGB", (8, 6)), "EPS"),
        },
    )
    assert predict.main([str(model_dir), str(inputs)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count(": skipped: ") == 4
    assert "decompression bomb" in captured.err
    assert "vector.eps: skipped: not an image in an accepted format (JPEG" in captured.err
