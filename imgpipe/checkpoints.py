"""Per-epoch training checkpoints that let an interrupted `train` stage resume where it stopped.

A checkpoint is a folder outside the stage's DVC output (DVC deletes outputs before it reruns a
stage): `state.json` (epochs done, history, the MLflow run id, a fingerprint of the params and
data, and a digest of the code that shapes training) and `state-<epoch>.npz` (every model
variable, random-seed states included, and every optimizer variable as plain arrays, no pickle).
`state.json` is written last and atomically, so a process killed at any moment leaves the
previous complete checkpoint or the new one.

A checkpoint made with other params, data or code is not resumed: training starts over and says
why. One that cannot be read or restored is set aside (moved to `<folder>.set-aside`) with a
message, and training starts over: no checkpoint can make every rerun fail.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.runtime import write_bytes_atomic, write_json_atomic

log = logging.getLogger("imgpipe.checkpoints")
STATE_FILE = "state.json"
FORMAT_VERSION = 2  # 2: state.json holds the code digest
ROOT = Path(__file__).resolve().parents[1]  # the folder that holds imgpipe/ (and stages/)
# Modules that shape no trained model, left out of the code digest as they are out of dvc.yaml's
# deps (tests/test_dvc_deps.py's NOT_OUTPUT_SHAPING says why for each): not covered, not followed
NOT_MODEL_SHAPING = frozenset(
    {
        "imgpipe/params.py",
        "imgpipe/runtime.py",
        "imgpipe/stall.py",
        "imgpipe/tracking/connection.py",
    }
)
# Libraries whose release shapes a training state (its variables, their order, optimizer slots)
LIBRARIES = ("keras", "tensorflow", "numpy")


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A short hash of the values that shape training: params, data hash, model name."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def code_digest(model_name: str, root: Path = ROOT) -> dict[str, str]:
    """{path: hash of its bytes} of every module train@<model_name> runs (stages/train.py where
    it exists, imgpipe/training.py, the model's module, and every project module they import,
    transitively: the .py deps dvc.yaml lists for the stage) and {library: version} of LIBRARIES."""
    starts = ["stages.train", "imgpipe.training", f"imgpipe.models.{model_name}"]
    digest = {
        path: hashlib.blake2b((root / path).read_bytes(), digest_size=8).hexdigest()
        for path in code_files(starts, root)
    }
    for name in LIBRARIES:
        try:
            digest[name] = version(name)
        except PackageNotFoundError:
            digest[name] = "not installed"
    return digest


def code_files(modules: Iterable[str], root: Path = ROOT) -> list[str]:
    """The source files (relative to root) of `modules` and of every project module they import
    when they run, transitively; imports inside functions count, `if TYPE_CHECKING:` ones do not.
    Package __init__ files and NOT_MODEL_SHAPING are left out; a module not under root is
    skipped."""
    seen: set[str] = set()
    todo = [path for path in (_source(name, root) for name in modules) if path]
    while todo:
        path = todo.pop()
        if path in seen or path in NOT_MODEL_SHAPING:
            continue
        seen.add(path)
        tree = ast.parse((root / path).read_text(encoding="utf-8"))
        for name in _imported_names(tree):
            found = _source(name, root)
            if found and not found.endswith("__init__.py"):
                todo.append(found)
    return sorted(seen)


def _source(module: str, root: Path) -> str | None:
    """imgpipe.models.cnn -> imgpipe/models/cnn.py (or a package's __init__.py), if under root."""
    if not module.startswith(("imgpipe", "stages")):
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def _imported_names(tree: ast.AST) -> Iterator[str]:
    """Every module name an import statement names (`from a import b`: a and a.b), outside
    `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                yield from _imported_names(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        yield from _imported_names(node)


def code_changes(saved: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """What differs between two code digests: `imgpipe/x.py`, `keras 3.11.0 -> 3.12.0`."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        before, now = saved.get(key), current.get(key)
        if before == now:
            continue
        if key in LIBRARIES:
            changes.append(f"{key} {before} -> {now}")
        else:
            state = "new" if before is None else "gone" if now is None else "changed"
            changes.append(f"{key} {state}")
    return changes


@dataclass
class CheckpointState:
    """What a resumed training run needs: where it stopped and what it had learned."""

    epochs_done: int
    history: dict[str, list[float]]
    arrays: dict[str, np.ndarray]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingCheckpoint:
    """Reads and writes one model's checkpoint folder; ignores one made for other params, data
    or code, and sets aside one that cannot be read or restored."""

    def __init__(
        self, directory: str | Path, fingerprint: str, code: Mapping[str, str] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.code = dict(code or {})  # code_digest() of the training that writes it
        self.extra: dict[str, Any] = {}  # saved with every epoch (e.g. the MLflow run id)

    @property
    def set_aside_directory(self) -> Path:
        """Where a checkpoint that cannot be restored is moved: `<folder>.set-aside`."""
        return self.directory.with_name(f"{self.directory.name}.set-aside")

    def _state(self) -> dict[str, Any] | None:
        """state.json, or None when there is none; an unreadable one is set aside."""
        state_path = self.directory / STATE_FILE
        if not state_path.is_file():
            return None
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError("state.json is not a JSON object")
        except (OSError, ValueError) as error:
            self.set_aside(f"its state.json cannot be read: {error}")
            return None
        return state

    def _mismatch(self, state: Mapping[str, Any]) -> str | None:
        """Why a checkpoint cannot be resumed by this training (None when it can)."""
        if state.get("format_version") != FORMAT_VERSION:
            return (
                f"was made by other code (checkpoint format {state.get('format_version')!r}, "
                f"this code writes {FORMAT_VERSION})"
            )
        if state.get("fingerprint") != self.fingerprint:
            return "was made with other params or data"
        changes = code_changes(state.get("code") or {}, self.code)
        if changes:
            shown = ", ".join(changes[:6]) + (
                f" and {len(changes) - 6} more" if len(changes) > 6 else ""
            )
            return f"was made by other code ({shown})"
        return None

    def saved_extra(self) -> dict[str, Any] | None:
        """Extra values of a matching checkpoint (e.g. its MLflow run id), without its arrays."""
        state = self._state()
        if state is None or self._mismatch(state) is not None:
            return None
        return dict(state.get("extra") or {})

    def load(self) -> CheckpointState | None:
        """The last complete checkpoint made with the same params, data and code, else None
        (saying why); one that cannot be read is set aside."""
        state = self._state()
        if state is None:
            return None
        mismatch = self._mismatch(state)
        if mismatch is not None:
            log.info("checkpoint %s %s: starting over", self.directory, mismatch)
            return None
        try:
            with np.load(self.directory / state["arrays"], allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            return CheckpointState(
                epochs_done=int(state["epochs_done"]),
                history={k: [float(v) for v in vs] for k, vs in state["history"].items()},
                arrays=arrays,
                seconds=float(state.get("seconds", 0.0)),
                extra=dict(state.get("extra") or {}),
            )
        except Exception as error:  # a damaged file of any kind: start over, never fail each rerun
            self.set_aside(f"{type(error).__name__}: {error}")
            return None

    def set_aside(self, reason: str) -> None:
        """Move a checkpoint that cannot be restored to `<folder>.set-aside` (replacing an earlier
        one), saying why; training starts over."""
        target = self.set_aside_directory
        shutil.rmtree(target, ignore_errors=True)
        try:
            self.directory.rename(target)
        except OSError:  # e.g. gone meanwhile: nothing is left to resume from either way
            shutil.rmtree(self.directory, ignore_errors=True)
        log.warning(
            "checkpoint %s cannot be restored (%s): set aside as %s; starting over",
            self.directory,
            reason.splitlines()[0][:300] if reason else "unknown reason",
            target,
        )

    def save(
        self,
        epochs_done: int,
        history: Mapping[str, list[float]],
        arrays: Mapping[str, np.ndarray],
        seconds: float,
    ) -> None:
        """Record a finished epoch: arrays first, then state.json (the commit point)."""
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        arrays_name = f"state-{epochs_done:05d}.npz"
        write_bytes_atomic(self.directory / arrays_name, buffer.getvalue())
        write_json_atomic(
            self.directory / STATE_FILE,
            {
                "format_version": FORMAT_VERSION,
                "fingerprint": self.fingerprint,
                "code": self.code,
                "epochs_done": epochs_done,
                "arrays": arrays_name,
                "seconds": seconds,
                "history": {k: list(v) for k, v in history.items()},
                "extra": self.extra,
            },
        )
        for stale in self.directory.glob("state-*.npz"):
            if stale.name != arrays_name:
                stale.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the checkpoint (and any set aside): training finished and its outputs are
        written."""
        shutil.rmtree(self.directory, ignore_errors=True)
        shutil.rmtree(self.set_aside_directory, ignore_errors=True)
