"""Process-level helpers shared by the stages: errors and logging, CPU count, atomic writes."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class StageError(Exception):
    """A problem the user can fix (bad params, missing or unusable inputs): the stage stops with
    this message, which says what to do next, and no traceback."""


@contextmanager
def stage_errors(stage: str) -> Iterator[None]:
    """Turn a StageError raised inside the block into `[stage] message` and exit status 1."""
    try:
        yield
    except StageError as error:
        raise SystemExit(f"[{stage}] {error}") from None


def setup_logging(stage: str) -> logging.Logger:
    """Log `[split] wrote 400 images to data/split` lines on stderr; quiet TensorFlow's C++ logs
    and its Python INFO lines (a MirroredStrategy notes every reduction it plans)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(
        level=os.environ.get("IMGPIPE_LOG_LEVEL", "INFO"),
        format=f"[{stage}] %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    return logging.getLogger(f"imgpipe.{stage}")


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see the old file or the whole new one, never a part.

    The new file gets the permissions a plain open() would give (0o666 less the umask: the
    kernel applies it, so no process-wide umask is read or changed). A symlink at `path` is
    replaced by the file, never written through.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial, fd = _create_partial(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _create_partial(path: Path) -> tuple[Path, int]:
    """A new, uniquely named `.<name>.<random>.partial` beside path, open for writing.

    Not tempfile.mkstemp: that makes every file 0600 whatever the umask.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        partial = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
        try:  # O_EXCL: never an existing file, nor a symlink planted under the name
            return partial, os.open(partial, flags, 0o666)
        except FileExistsError:
            continue


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON atomically, pretty-printed and with a trailing newline."""
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name; it replaces `path` only if the block succeeds.

    A process killed at any moment (SIGKILL included) leaves `path` as the old complete
    directory or the new complete one, never a mix: on Linux the two are swapped in one
    renameat2(RENAME_EXCHANGE) call, so once a complete directory exists `path` is never
    absent. Where that call is missing, the old directory is renamed aside first, and a kill in
    the instant between the two renames leaves `path` absent. Leftover `.<name>.partial` and
    `.<name>.old` siblings are debris that the next call removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.is_dir() and not path.is_symlink() and _exchange(partial, path):
        shutil.rmtree(partial, ignore_errors=True)  # partial now holds the old directory
        return
    if path.exists() or path.is_symlink():
        os.replace(path, old)  # one rename: never a half-deleted old output under the real name
    os.replace(partial, path)
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 with RENAME_EXCHANGE).

    False where the C library or the file system does not offer it; other errors are raised.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library older than glibc 2.28
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))
