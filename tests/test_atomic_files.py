"""Atomic file writes (runtime.write_bytes_atomic): whole files with the umask's permissions,
never written through a symlink."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imgpipe.runtime import write_bytes_atomic, write_json_atomic


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """This process's umask set to mask for the block."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_umask_permissions(tmp_path: Path, mask: int, mode: int) -> None:
    with umask(mask):
        write_bytes_atomic(tmp_path / "new.bin", b"data")
        write_json_atomic(tmp_path / "new.json", {"a": 1})
        write_bytes_atomic(tmp_path / "new.json", b"replaced")  # a replaced file too
    for name in ("new.bin", "new.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    with umask(mask):
        (tmp_path / "plain.txt").write_text("as open() makes it")
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode


def test_a_symlink_at_the_path_is_replaced_not_written_through(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    link = tmp_path / "out.txt"
    link.symlink_to(target)
    write_bytes_atomic(link, b"new\n")
    assert not link.is_symlink() and link.read_bytes() == b"new\n"
    assert target.read_text() == "precious\n"


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    write_bytes_atomic(path, b"old")
    with pytest.raises(TypeError, match="bytes-like"):  # fails after the partial file exists
        write_bytes_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json"]
