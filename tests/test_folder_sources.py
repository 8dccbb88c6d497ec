"""Folder sources of the split stage: a symlink is followed only to a regular file inside the
project (DVC's cache included) or the raw folder; other symlinks and files over the size bound
are skipped with the reason in the split report. Real symlinks in a temporary project."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from imgpipe import images
from imgpipe.images import RawSource
from tests.support import BIN, command_env, load_repo_params, make_image, run_stage_subprocess

REPORT = "data/split-report.json"


def write_params(project: Path, raw: str) -> None:
    """The repository's params with data.raw set, in the project."""
    params = load_repo_params()
    params["data"]["raw"] = raw
    params["split"]["ratios"] = {"train": 0.5, "val": 0.25, "test": 0.25}
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def class_folders(raw: Path, per_class: int = 4) -> None:
    """raw/cat/ and raw/dog/ with per_class small JPEGs each."""
    for offset, label in ((0, "cat"), (50, "dog")):
        (raw / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            (raw / label / f"{index}.jpg").write_bytes(make_image("rgb.jpg", offset + index))


def split_in(project: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict[str, str]]:
    """Run split in project; (the report, skipped path -> reason)."""
    monkeypatch.chdir(project)
    # its own process, as DVC runs it: split forks workers, and a fork of a test worker that
    # holds TensorFlow's threads can deadlock (seen once in CI)
    run_stage_subprocess(
        ["stages.split", "--out", "data/split", "--report", REPORT], project, project / "split.log"
    )
    report = json.loads((project / REPORT).read_text())
    return report, {item["path"]: item["reason"] for item in report["skipped"]}


def copied_files(project: Path) -> list[bytes]:
    """The bytes of every file split copied into data/split."""
    return [p.read_bytes() for p in (project / "data" / "split").rglob("*") if p.is_file()]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """tmp/project with data/raw/{cat,dog}/ of 4 images each, and tmp/outside/ beside it."""
    root = tmp_path / "project"
    class_folders(root / "data" / "raw")
    write_params(root, "data/raw")
    outside = tmp_path / "outside"
    (outside / "more").mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(make_image("rgb.jpg", 90))
    (outside / "more" / "9.jpg").write_bytes(make_image("rgb.jpg", 91))
    return root


def test_symlinks_leaving_the_project_are_skipped_with_the_reason(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, outside = project / "data" / "raw", project.parent / "outside"
    (raw / "cat" / "secret.jpg").symlink_to(outside / "secret.jpg")
    (raw / "cat" / "hostname.jpg").symlink_to("/etc/hostname")
    (raw / "cat" / "zero.jpg").symlink_to("/dev/zero")
    (raw / "dog" / "more").symlink_to(outside / "more", target_is_directory=True)
    (raw / "dog" / "relative.jpg").symlink_to("../../../../outside/secret.jpg")
    report, skipped = split_in(project, monkeypatch)
    outside_links = {"cat/secret.jpg", "cat/hostname.jpg", "cat/zero.jpg", "dog/more"}
    assert set(skipped) == outside_links | {"dog/relative.jpg"}
    for path in skipped:
        assert "outside the project" in skipped[path] and "not followed" in skipped[path], path
    assert report["readable"] == report["selected"] == 8
    assert report["files_found"] == report["system_files_ignored"] + len(skipped) + 8
    secret = (outside / "secret.jpg").read_bytes()
    assert secret not in copied_files(project)  # never copied into data/split (nor DVC's cache)


def test_symlinks_inside_the_project_are_followed(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DVC's cache.type symlink: data files link into .dvc/cache; other in-project links too."""
    raw, cache = project / "data" / "raw", project / ".dvc" / "cache" / "files" / "md5" / "ab"
    cache.mkdir(parents=True)
    (cache / "cdef0123").write_bytes(make_image("rgb.jpg", 70))
    (raw / "cat" / "cached.jpg").symlink_to(cache / "cdef0123")
    (project / "elsewhere.jpg").write_bytes(make_image("rgb.jpg", 71))
    (raw / "dog" / "relative.jpg").symlink_to("../../../elsewhere.jpg")
    (raw / "dog" / "same-folder.jpg").symlink_to("0.jpg")
    (raw / "cat" / "folder").symlink_to(raw / "dog", target_is_directory=True)
    (raw / "cat" / "dangling.jpg").symlink_to(project / "gone.jpg")
    (raw / "cat" / "loop.jpg").symlink_to("loop.jpg")
    report, skipped = split_in(project, monkeypatch)
    assert set(skipped) == {"cat/folder", "cat/dangling.jpg", "cat/loop.jpg"}
    assert "loop" in skipped["cat/loop.jpg"]
    assert "not a regular file" in skipped["cat/folder"]
    assert "not a regular file" in skipped["cat/dangling.jpg"]
    assert report["readable"] == report["selected"] == 8 + 3
    assert report["duplicate_groups"] == 1  # dog/same-folder.jpg is dog/0.jpg's bytes
    assert (cache / "cdef0123").read_bytes() in copied_files(project)
    assert (project / "elsewhere.jpg").read_bytes() in copied_files(project)


def test_files_over_the_size_bound_are_skipped_unread(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = project / "data" / "raw" / "cat" / "huge.jpg"
    with huge.open("wb") as handle:  # sparse: takes no disk space
        handle.truncate(images.MAX_ENTRY_BYTES + 1)
    report, skipped = split_in(project, monkeypatch)
    assert list(skipped) == ["cat/huge.jpg"]
    assert f"limit {images.MAX_ENTRY_BYTES:,}" in skipped["cat/huge.jpg"]
    assert report["selected"] == 8
    with pytest.raises(ValueError, match="limit"):
        RawSource(project / "data" / "raw").read("cat/huge.jpg")


def test_links_inside_the_raw_folder_are_followed_when_it_is_outside_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.raw may name a folder outside the project: links within that folder are followed."""
    raw, project = tmp_path / "datasets" / "pets", tmp_path / "project"
    class_folders(raw)
    (raw / "dog" / "copy.jpg").symlink_to(raw / "cat" / "0.jpg")
    (raw / "dog" / "passwd.jpg").symlink_to("/etc/passwd")
    project.mkdir()
    write_params(project, str(raw))
    monkeypatch.chdir(project)
    source = RawSource(raw)
    refused = source.refused(source.list_files())
    assert list(refused) == ["dog/passwd.jpg"]
    assert source.read("dog/copy.jpg") == (raw / "cat" / "0.jpg").read_bytes()
    with pytest.raises(ValueError, match="outside the project"):
        source.read("dog/passwd.jpg")
    monkeypatch.chdir("/")  # run by hand from /: the file system is not "the project"
    source = RawSource(raw)
    assert list(source.refused(source.list_files())) == ["dog/passwd.jpg"]


@pytest.mark.slow
def test_dvc_symlink_cache_keeps_working(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc add` with cache.type symlink turns every raw file into a link into .dvc/cache."""
    project = tmp_path / "project"
    class_folders(project / "data" / "raw")
    write_params(project, "data/raw")
    env = command_env()
    for args in (
        ["init", "--no-scm"],
        ["config", "cache.type", "symlink"],
        ["add", "data/raw"],
    ):
        subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, check=True)
    links = list((project / "data" / "raw").rglob("*.jpg"))
    assert len(links) == 8 and all(p.is_symlink() for p in links)
    assert all(".dvc/cache" in os.readlink(p) for p in links)
    report, skipped = split_in(project, monkeypatch)
    assert skipped == {}
    assert report["readable"] == report["selected"] == 8
