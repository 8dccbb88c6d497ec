"""End-to-end tests of the data stages (demo, split, tabulate) on tiny generated image sets."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from imgpipe import tabulating
from imgpipe.demo import write_demo_images
from imgpipe.images import decode_image, split_files
from imgpipe.splitting import SPLITS, Record, destination_names
from imgpipe.tables import read_table, table_info
from tests.support import data_stage_params, run_forking_stage

VIEWS = {
    "gray16": {"height": 16, "width": 16, "color": "grayscale"},
    "rgb24": {"height": 24, "width": 24, "color": "rgb"},
}
RATIOS = {"train": 0.6, "val": 0.2, "test": 0.2}
CLASSES = ("cat", "dog", "fox")
PER_CLASS = 12
KINDS = ("rgb.jpg", "gray.png", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png", "exif6.jpg")
SYSTEM_FILES = (".DS_Store", "cat/.DS_Store", "__MACOSX/cat/._cat_00.jpg", "dog/Thumbs.db")
UNLABELLED = ("stray.jpg",)  # a good image outside any class folder
CONFLICTS = ("dog/shared.png", "fox/shared.png")  # identical bytes under two classes
DUPLICATE = ("cat/cat_00.jpg", "cat/cat_00_copy.jpg")  # identical bytes, same class


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _class_folder_files(make_image: Callable[[str, int], bytes], corrupt: dict[str, bytes]) -> dict:
    files: dict[str, bytes] = {}
    seed = 0
    for label in CLASSES:
        for index in range(PER_CLASS):
            kind = KINDS[seed % len(KINDS)]
            files[f"{label}/{label}_{index:02d}.{kind.split('.')[1]}"] = make_image(kind, seed)
            seed += 1
    files[DUPLICATE[0]] = files[DUPLICATE[1]] = make_image("rgb.jpg", 500)
    files[CONFLICTS[0]] = files[CONFLICTS[1]] = make_image("gray.png", 501)
    files[UNLABELLED[0]] = make_image("rgb.jpg", 502)
    corrupt_homes = dict(zip(corrupt, CLASSES, strict=True))  # one corrupt file per class
    for name, data in corrupt.items():
        files[f"{corrupt_homes[name]}/{name}"] = data
    for name in SYSTEM_FILES:
        files[name] = b"\x00\x05\x16\x07 not an image"
    return files


def _write_params(directory: Path, raw: Path, **split_overrides: Any) -> None:
    """A params.yaml from the repo's, pointed at tiny raw data with tiny views."""
    # several row groups per table
    params = data_stage_params(VIEWS, workers=2, rows_per_group=5)
    params["data"]["raw"] = str(raw)
    params["split"]["ratios"] = dict(RATIOS)
    params["split"]["max_per_class"] = None
    params["split"].update(split_overrides)
    (directory / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


@dataclass
class Run:
    """Outputs of one split + tabulate run."""

    split_dir: Path
    report: dict[str, Any]
    tables_dir: Path | None


def _run_split(directory: Path, name: str = "split") -> tuple[Path, dict[str, Any]]:
    split_dir, report_path = directory / name, directory / f"{name}-report.json"
    run_forking_stage("split", "--out", str(split_dir), "--report", str(report_path))
    return split_dir, json.loads(report_path.read_text(encoding="utf-8"))


def _run(directory: Path, name: str = "run", with_tables: bool = True) -> Run:
    split_dir, report = _run_split(directory, f"{name}-split")
    tables_dir = None
    if with_tables:
        tables_dir = directory / f"{name}-tables"
        run_forking_stage("tabulate", "--split", str(split_dir), "--out", str(tables_dir))
    return Run(split_dir, report, tables_dir)


def _split_files(split_dir: Path) -> dict[str, bytes]:
    return {
        p.relative_to(split_dir).as_posix(): p.read_bytes()
        for p in split_dir.rglob("*")
        if p.is_file()
    }


def _count_on_disk(split_dir: Path, split_name: str, label: str) -> int:
    return sum(1 for p in (split_dir / split_name / label).iterdir() if p.is_file())


@pytest.fixture(scope="module")
def class_folder_raw(
    tmp_path_factory: pytest.TempPathFactory,
    image_factory: Callable[[str, int], bytes],
    corrupt_bytes: dict[str, bytes],
    tree_writer: Callable,
) -> tuple[Path, dict[str, bytes]]:
    files = _class_folder_files(image_factory, corrupt_bytes)
    root = tree_writer(tmp_path_factory.mktemp("raw") / "pets", files)
    return root, files


@pytest.fixture(scope="module")
def workdir(
    tmp_path_factory: pytest.TempPathFactory, class_folder_raw: tuple[Path, dict[str, bytes]]
) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("project")
    _write_params(directory, class_folder_raw[0])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        yield directory


@pytest.fixture(scope="module")
def first_run(workdir: Path) -> Run:
    return _run(workdir, "first")


@pytest.fixture(scope="module")
def second_run(workdir: Path, first_run: Run) -> Run:
    return _run(workdir, "second")


# --------------------------------------------------------------------------- split


def test_report_totals_add_up(
    first_run: Run, class_folder_raw: tuple[Path, dict[str, bytes]]
) -> None:
    report, files = first_run.report, class_folder_raw[1]
    assert report["files_found"] == len(files)
    assert report["system_files_ignored"] == len(SYSTEM_FILES)
    assert sum(report["totals"].values()) == report["selected"]
    for split_name in SPLITS:
        assert sum(report["counts"][split_name].values()) == report["totals"][split_name]
    unreadable_or_unlabelled = len(report["skipped"]) - len(CONFLICTS)
    assert (
        report["readable"] == report["files_found"] - len(SYSTEM_FILES) - unreadable_or_unlabelled
    )
    # no cap: every readable image is selected except the contradictory copies
    assert report["not_selected_by_cap"] == 0
    assert report["selected"] == report["readable"] - len(CONFLICTS)
    assert report["classes"] == list(CLASSES)
    assert report["duplicate_groups"] == 2


def test_each_class_is_split_by_the_ratios(first_run: Run) -> None:
    counts = first_run.report["counts"]
    for label in CLASSES:
        total = sum(counts[name][label] for name in SPLITS)
        for name in SPLITS:
            assert (
                abs(counts[name][label] - total * RATIOS[name]) <= 1.5
            )  # duplicates move in pairs


def test_skipped_lists_each_bad_file_with_a_reason(
    first_run: Run, corrupt_bytes: dict[str, bytes]
) -> None:
    skipped = {item["path"]: item["reason"] for item in first_run.report["skipped"]}
    corrupt_paths = {p for p in skipped if p.rsplit("/", 1)[-1] in corrupt_bytes}
    assert len(corrupt_paths) == len(corrupt_bytes)
    assert set(skipped) == corrupt_paths | set(UNLABELLED) | set(CONFLICTS)
    assert all(reason.strip() for reason in skipped.values())
    assert "class" in skipped[UNLABELLED[0]]
    for path in CONFLICTS:
        assert "dog" in skipped[path] and "fox" in skipped[path]


def test_system_files_are_ignored(first_run: Run) -> None:
    skipped = {item["path"] for item in first_run.report["skipped"]}
    assert not skipped & set(SYSTEM_FILES)
    for path in first_run.split_dir.rglob("*"):
        assert not path.name.startswith(".")
        assert path.name.lower() not in {"thumbs.db", "__macosx"}


def test_class_folders_exist_in_every_split(first_run: Run) -> None:
    for split_name in SPLITS:
        assert sorted(p.name for p in (first_run.split_dir / split_name).iterdir()) == list(CLASSES)
        for label in CLASSES:
            expected = first_run.report["counts"][split_name].get(label, 0)
            assert _count_on_disk(first_run.split_dir, split_name, label) == expected


def test_split_files_are_the_readable_raw_files(
    first_run: Run, class_folder_raw: tuple[Path, dict[str, bytes]]
) -> None:
    _, files = class_folder_raw
    bad = {item["path"] for item in first_run.report["skipped"]} | set(SYSTEM_FILES)
    wanted = sorted(_digest(data) for path, data in files.items() if path not in bad)
    written = _split_files(first_run.split_dir)
    assert sorted(_digest(data) for data in written.values()) == wanted
    for relative, data in written.items():
        split_name, label, _ = relative.split("/")
        assert split_name in SPLITS
        originals = [path for path, raw in files.items() if raw == data and path not in bad]
        assert all(path.split("/")[0] == label for path in originals)  # still in its class


def test_duplicates_land_in_the_same_split(first_run: Run) -> None:
    homes = {
        relative.split("/")[0]
        for relative in _split_files(first_run.split_dir)
        if relative.rsplit("/", 1)[-1] in {Path(p).name for p in DUPLICATE}
    }
    assert len(homes) == 1


# --------------------------------------------------------------------------- tabulate


def test_tables_have_a_row_per_image_in_their_split(first_run: Run) -> None:
    assert first_run.tables_dir is not None
    listed = sorted(p.name for p in first_run.tables_dir.iterdir())
    assert listed == sorted([*VIEWS, tabulating.SKIPPED_REPORT])
    report = json.loads((first_run.tables_dir / tabulating.SKIPPED_REPORT).read_text())
    assert report == {"skipped": []}  # split only passes on images that decode
    for view_name, view in VIEWS.items():
        channels = 1 if view["color"] == "grayscale" else 3
        for split_name in SPLITS:
            path = first_run.tables_dir / view_name / f"{split_name}.parquet"
            shape, class_names, table_view, rows = table_info(path)
            on_disk = sum(1 for p in (first_run.split_dir / split_name).rglob("*") if p.is_file())
            assert rows == on_disk == first_run.report["totals"][split_name]
            assert tuple(shape) == (view["height"], view["width"], channels)
            assert class_names == list(CLASSES)
            assert table_view == view_name


def test_table_rows_hold_their_files_pixels_and_labels(first_run: Run) -> None:
    assert first_run.tables_dir is not None
    for view_name, view in VIEWS.items():
        for split_name in SPLITS:
            table = read_table(first_run.tables_dir / view_name / f"{split_name}.parquet")
            assert table.pixels.dtype == np.uint8
            assert len(set(table.sources)) == len(table.sources)
            for row, source in enumerate(table.sources):
                label = source.split("/")[0]
                assert table.class_names[table.labels[row]] == label
                data = (first_run.split_dir / split_name / source).read_bytes()
                np.testing.assert_array_equal(table.pixels[row], decode_image(data, **view))


def test_rerun_gives_identical_split_and_tables(first_run: Run, second_run: Run) -> None:
    assert first_run.tables_dir is not None and second_run.tables_dir is not None
    assert _split_files(first_run.split_dir) == _split_files(second_run.split_dir)
    assert first_run.report["counts"] == second_run.report["counts"]
    for view_name in VIEWS:
        for split_name in SPLITS:
            first = read_table(first_run.tables_dir / view_name / f"{split_name}.parquet")
            second = read_table(second_run.tables_dir / view_name / f"{split_name}.parquet")
            assert first.pixels.tobytes() == second.pixels.tobytes()
            np.testing.assert_array_equal(first.labels, second.labels)
            assert first.sources == second.sources


def _tabulate_with(
    directory: Path,
    split_dir: Path,
    name: str,
    *,
    workers: int,
    per_task: int,
    task_bytes: int = tabulating.TASK_BYTES,
) -> Path:
    """Run tabulate on split_dir with the given worker count and task size limits."""
    params = yaml.safe_load((directory / "params.yaml").read_text(encoding="utf-8"))
    params["tabulate"]["workers"] = workers
    (directory / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    out = directory / name
    setup = (
        "import imgpipe.tabulating as tabulating\n"
        f"tabulating.IMAGES_PER_TASK = {per_task}\n"
        f"tabulating.TASK_BYTES = {task_bytes}\n"
    )
    run_forking_stage("tabulate", "--split", str(split_dir), "--out", str(out), setup=setup)
    return out


def test_tables_do_not_depend_on_workers_or_task_size(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    first_run: Run,
    class_folder_raw: tuple[Path, dict[str, bytes]],
    corrupt_bytes: dict[str, bytes],
) -> None:
    split_dir = tmp_path / "split"
    shutil.copytree(first_run.split_dir, split_dir)
    broken = split_dir / "train" / CLASSES[0] / "zz_broken.jpg"  # sorts last in its class
    broken.write_bytes(next(iter(corrupt_bytes.values())))
    _write_params(tmp_path, class_folder_raw[0])
    monkeypatch.chdir(tmp_path)

    one = _tabulate_with(tmp_path, split_dir, "one", workers=1, per_task=3)
    three = _tabulate_with(tmp_path, split_dir, "three", workers=3, per_task=64)
    # rgb24 rows are 1,728 bytes: tasks of 2 rgb24 images, 6 gray16 ones
    small = _tabulate_with(tmp_path, split_dir, "small", workers=2, per_task=64, task_bytes=3500)
    rows_per_group = 5
    for view_name in VIEWS:
        for split_name in SPLITS:
            path = one / view_name / f"{split_name}.parquet"
            for other in (three, small):
                assert path.read_bytes() == (other / view_name / path.name).read_bytes()
            on_disk = sum(1 for p in (split_dir / split_name).rglob("*") if p.is_file())
            expected = on_disk - (split_name == "train")  # the broken file is skipped
            metadata = pq.ParquetFile(path).metadata
            groups = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            assert sum(groups) == expected
            assert all(rows == rows_per_group for rows in groups[:-1])  # full groups ...
            assert not groups or 0 < groups[-1] <= rows_per_group  # ... then the rest
        table = read_table(one / view_name / "train.parquet")
        assert broken.name not in {s.rsplit("/", 1)[-1] for s in table.sources}
        assert table.sources == sorted(table.sources)  # file order, whatever finished first
    report = json.loads((one / tabulating.SKIPPED_REPORT).read_text(encoding="utf-8"))
    assert [(s["view"], s["split"], Path(s["path"]).name) for s in report["skipped"]] == [
        (view_name, "train", broken.name) for view_name in VIEWS
    ]
    assert all(s["reason"] for s in report["skipped"])


def test_task_size_keeps_a_tasks_pixels_within_task_bytes() -> None:
    assert tabulating.task_size((96, 96, 1)) == tabulating.IMAGES_PER_TASK  # 64 x 9 KB: 0.6 MB
    per_task = tabulating.task_size((224, 224, 3))  # 150 KB an image
    assert per_task * 224 * 224 * 3 <= tabulating.TASK_BYTES < (per_task + 1) * 224 * 224 * 3
    assert tabulating.task_size((2048, 2048, 3)) == 1  # larger than TASK_BYTES: one at a time


def test_decode_chunk_fills_the_rows_of_decoded_files_and_reports_the_others(
    tmp_path: Path,
    image_factory: Callable[[str, int], bytes],
    corrupt_bytes: dict[str, bytes],
) -> None:
    names = ["a.jpg", "broken.jpg", "c.png", "missing.png"]
    (tmp_path / "a.jpg").write_bytes(image_factory("rgb.jpg", 1))
    (tmp_path / "broken.jpg").write_bytes(corrupt_bytes["truncated.jpg"])
    (tmp_path / "c.png").write_bytes(image_factory("palette.png", 2))
    out = np.full((5, 6, 7, 3), 9, dtype=np.uint8)  # one row more than there are files
    view = (6, 7, "rgb")
    decoded, errors = tabulating.decode_chunk([str(tmp_path / n) for n in names], view, out)
    assert decoded == [0, 2]
    assert [index for index, _ in errors] == [1, 3]
    assert "FileNotFoundError" in errors[1][1]
    for index in decoded:
        expected = decode_image(
            (tmp_path / names[index]).read_bytes(), height=6, width=7, color="rgb"
        )
        np.testing.assert_array_equal(out[index], expected)
    assert (out[[1, 3, 4]] == 9).all()  # rows of files not decoded, and spare rows, untouched


def test_workers_decode_into_the_parents_task_slots(
    tmp_path: Path, image_factory: Callable[[str, int], bytes]
) -> None:
    shape = (5, 4, 1)
    slots = tabulating.TaskSlots(count=3, slot_bytes=2 * 5 * 4)
    paths = []
    for index in range(8):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(image_factory("gray.png", index))
    view = (5, 4, "grayscale")
    jobs = [([str(p) for p in paths[i : i + 2]], view, shape, i // 2) for i in (0, 2, 4)]
    fork = multiprocessing.get_context("fork")
    with fork.Pool(2, initializer=tabulating._init_worker, initargs=(slots,)) as pool:
        results = pool.map(tabulating._decode_job, jobs)
        assert results == [([0, 1], [])] * 3
        for task_number in range(3):  # written by the workers, read here: no pixels were sent
            for row in range(2):
                data = paths[2 * task_number + row].read_bytes()
                expected = decode_image(data, height=5, width=4, color="grayscale")
                np.testing.assert_array_equal(slots.view(task_number, 2, shape)[row], expected)
        # task 3 reuses task 0's slot
        assert pool.map(tabulating._decode_job, [([str(paths[6])], view, shape, 3)])
        expected = decode_image(paths[6].read_bytes(), height=5, width=4, color="grayscale")
        np.testing.assert_array_equal(slots.view(0, 1, shape)[0], expected)


def test_split_files_lists_each_class_folders_files_sorted(tmp_path: Path) -> None:
    names = ["b/2.jpg", "b/10.jpg", "b/.DS_Store", "b/Thumbs.db", "a/z.png", "a/B.png", "a/a.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "nested").mkdir()  # not a file: skipped
    (tmp_path / "stray.jpg").write_bytes(b"x")  # not in a class folder: skipped
    (tmp_path / "b" / "link.jpg").symlink_to(tmp_path / "a" / "a.png")
    assert split_files(tmp_path) == [
        "a/B.png",
        "a/a.png",
        "a/z.png",
        "b/10.jpg",
        "b/2.jpg",
        "b/link.jpg",
    ]


def test_row_group_buffer_cuts_exact_groups_in_order() -> None:
    buffer = tabulating.RowGroupBuffer((2, 1, 1), rows_per_group=4)
    groups = []
    for start, count in [(0, 3), (3, 6), (9, 0), (9, 2)]:
        values = np.arange(start, start + count, dtype=np.uint8)
        pixels = np.repeat(values[:, None, None, None], 2, axis=1)  # (count, 2, 1, 1)
        labels = np.arange(start, start + count, dtype=np.int16)
        sources = [f"s{i}" for i in range(start, start + count)]
        groups += [
            (p.copy(), lab.copy(), list(s)) for p, lab, s in buffer.add(pixels, labels, sources)
        ]
    groups += [(p.copy(), lab.copy(), list(s)) for p, lab, s in buffer.flush()]
    assert [len(lab) for _, lab, _ in groups] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([lab for _, lab, _ in groups]), np.arange(11))
    np.testing.assert_array_equal(
        np.concatenate([p[:, 1, 0, 0] for p, _, _ in groups]), np.arange(11, dtype=np.uint8)
    )
    assert [s for _, _, sources in groups for s in sources] == [f"s{i}" for i in range(11)]
    assert list(buffer.flush()) == []


class _FakePool:
    """Runs each job when its result is asked for; records how many jobs were in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0

    def apply_async(self, function, args):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        pool = self

        class _Result:
            def get(self):
                pool.in_flight -= 1
                return args[0]

        return _Result()


def test_ordered_results_keeps_order_and_bounds_work_in_flight() -> None:
    pool = _FakePool()
    results = list(tabulating.ordered_results(pool, range(50), in_flight=4))
    assert results == list(range(50))
    assert pool.most_in_flight == 4
    assert pool.in_flight == 0


# --------------------------------------------------------------------------- other inputs


def test_kaggle_style_zip(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    image_factory: Callable[[str, int], bytes],
    zip_writer: Callable,
) -> None:
    entries = {}
    for index in range(8):
        entries[f"train/cat.{index}.jpg"] = image_factory("rgb.jpg", 1000 + index)
        entries[f"train/dog.{index}.jpg"] = image_factory("cmyk.jpg", 2000 + index)
    system = {"__MACOSX/train/._cat.0.jpg": b"\x00\x05", "train/.DS_Store": b"Bud1"}
    archive = zip_writer(tmp_path / "train.zip", {**entries, **system}, directories=("train",))
    _write_params(tmp_path, archive, ratios={"train": 0.75, "val": 0.0, "test": 0.25})
    monkeypatch.chdir(tmp_path)

    run = _run(tmp_path)
    assert run.report["classes"] == ["cat", "dog"]
    assert run.report["files_found"] == len(entries) + len(system)
    assert run.report["system_files_ignored"] == len(system)
    assert run.report["skipped"] == []
    assert run.report["selected"] == len(entries)
    assert run.report["totals"]["val"] == 0
    written = _split_files(run.split_dir)
    for relative, data in written.items():
        split_name, label, name = relative.split("/")
        assert name.startswith(f"{label}.")
        assert entries[f"train/{name}"] == data
    assert run.tables_dir is not None
    for split_name in SPLITS:
        rows = table_info(run.tables_dir / "rgb24" / f"{split_name}.parquet")[3]
        assert rows == run.report["totals"][split_name]
    empty = read_table(run.tables_dir / "gray16" / "val.parquet")
    assert empty.pixels.shape == (0, 16, 16, 1)


def test_same_file_name_in_several_folders_keeps_every_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    image_factory: Callable[[str, int], bytes],
    tree_writer: Callable,
) -> None:
    # a pre-split data set: {test,train,val}/<class>/<name>, where train and val share a copy;
    # test/ sorts first and takes the plain name, so both copies need a made-up one
    files = {}
    for offset, label in enumerate(("cat", "dog")):
        shared = image_factory("gray.png", 3000 + offset)
        files[f"test/{label}/1.png"] = image_factory("gray.png", 3100 + offset)
        files[f"train/{label}/1.png"] = shared
        files[f"val/{label}/1.png"] = shared
        for index in range(2, 6):
            files[f"train/{label}/{index}.png"] = image_factory(
                "gray.png", 3200 + 10 * offset + index
            )
    raw = tree_writer(tmp_path / "raw", files)
    _write_params(tmp_path, raw)
    monkeypatch.chdir(tmp_path)

    split_dir, report = _run_split(tmp_path)
    assert report["selected"] == len(files)
    assert len(_split_files(split_dir)) == len(files)


def test_destination_names_are_unique() -> None:
    same = "ab" * 16
    records = [
        Record("a/cat/1.jpg", "cat", "01" * 16),
        Record("b/cat/1.jpg", "cat", same),
        Record("c/cat/1.jpg", "cat", same),
        Record("d/cat/1.jpg", "cat", same),
        Record("e/dog/1.jpg", "dog", same),
    ]
    names = destination_names(records)
    assert set(names) == {r.path for r in records}
    assert len(set(names.values())) == len(records)
    for record in records:
        assert names[record.path].startswith(f"{record.label}/")
        assert names[record.path].endswith("1.jpg")


def test_fewer_than_two_classes_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    image_factory: Callable[[str, int], bytes],
    tree_writer: Callable,
) -> None:
    raw = tree_writer(
        tmp_path / "raw",
        {f"cat/cat.{i}.png": image_factory("gray.png", 4000 + i) for i in range(5)},
    )
    _write_params(tmp_path, raw)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="need at least two") as caught:
        _run_split(tmp_path)
    assert "cat" in str(caught.value.code)
    assert not (tmp_path / "split").exists()


def test_max_per_class_is_respected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, class_folder_raw: tuple[Path, dict[str, bytes]]
) -> None:
    cap = 5
    _write_params(tmp_path, class_folder_raw[0], max_per_class=cap)
    monkeypatch.chdir(tmp_path)
    split_dir, report = _run_split(tmp_path)
    assert report["max_per_class"] == cap
    for label in CLASSES:
        on_disk = sum(_count_on_disk(split_dir, name, label) for name in SPLITS)
        in_report = sum(report["counts"][name].get(label, 0) for name in SPLITS)
        assert on_disk == in_report
        assert cap - 1 <= on_disk <= cap  # a duplicate pair moves whole
    assert report["not_selected_by_cap"] == report["readable"] - report["selected"] - len(CONFLICTS)
    assert report["not_selected_by_cap"] > 0


def test_bad_params_stop_the_stage_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_params(tmp_path, tmp_path, ratios={"train": 0.9, "val": 0.2, "test": 0.1})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"split\.ratios"):
        _run_split(tmp_path)
    with pytest.raises(SystemExit, match=r"split\.ratios"):
        run_forking_stage(
            "tabulate", "--split", str(tmp_path / "split"), "--out", str(tmp_path / "tables")
        )
    assert not (tmp_path / "split").exists() and not (tmp_path / "tables").exists()


def test_tabulate_without_fork_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_run: Run
) -> None:
    _write_params(tmp_path, tmp_path)
    monkeypatch.chdir(tmp_path)
    windows = "import multiprocessing\nmultiprocessing.get_all_start_methods = lambda: ['spawn']\n"
    with pytest.raises(SystemExit, match=r"'fork' start method.*WSL"):
        run_forking_stage(
            "tabulate",
            *("--split", str(first_run.split_dir), "--out", str(tmp_path / "tables")),
            setup=windows,
        )
    assert not (tmp_path / "tables").exists()


def test_missing_raw_data_names_the_param(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_params(tmp_path, tmp_path / "no-such.zip")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"data\.raw"):
        _run_split(tmp_path)


# --------------------------------------------------------------------------- demo


def test_demo_writes_the_digits_as_class_folders(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert write_demo_images(out) == (1797, 10)
    class_dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in class_dirs] == [str(digit) for digit in range(10)]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 1797  # the size of scikit-learn's bundled digits
    for path in files[:: len(files) // 20]:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (8, 8))
