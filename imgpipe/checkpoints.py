"""Per-epoch training checkpoints that let an interrupted `train` stage resume where it stopped.

A checkpoint is a folder outside the stage's DVC output (DVC deletes outputs before it reruns a
stage): `state.json` (epochs done, history, the MLflow run id, a fingerprint of everything that
shapes training) and `state-<epoch>.npz` (every model variable, random-seed states included, and
every optimizer variable as plain arrays, no pickle). `state.json` is written last and atomically,
so a process killed at any moment leaves the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.runtime import write_bytes_atomic, write_json_atomic

log = logging.getLogger("imgpipe.checkpoints")
STATE_FILE = "state.json"
FORMAT_VERSION = 1


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A short hash of everything that shapes training: params, data hash, model name."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass
class CheckpointState:
    """What a resumed training run needs: where it stopped and what it had learned."""

    epochs_done: int
    history: dict[str, list[float]]
    arrays: dict[str, np.ndarray]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingCheckpoint:
    """Reads and writes one model's checkpoint folder; ignores one made for other params or data."""

    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.extra: dict[str, Any] = {}  # saved with every epoch (e.g. the MLflow run id)

    def saved_extra(self) -> dict[str, Any] | None:
        """Extra values of a matching checkpoint (e.g. its MLflow run id), without its arrays."""
        try:
            state = json.loads((self.directory / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if state.get("fingerprint") != self.fingerprint:
            return None
        return dict(state.get("extra", {}))

    def load(self) -> CheckpointState | None:
        """The last complete checkpoint made with the same fingerprint, else None."""
        state_path = self.directory / STATE_FILE
        if not state_path.is_file():
            return None
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if state.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {state.get('format_version')!r}")
            if state["fingerprint"] != self.fingerprint:
                log.info(
                    "ignoring checkpoint %s: it was made with other params or data; "
                    "training starts from epoch 1",
                    self.directory,
                )
                return None
            with np.load(self.directory / state["arrays"], allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, KeyError) as error:
            log.warning(
                "ignoring unreadable checkpoint %s (%s): training starts from epoch 1",
                self.directory,
                error,
            )
            return None
        return CheckpointState(
            epochs_done=int(state["epochs_done"]),
            history={k: [float(v) for v in vs] for k, vs in state["history"].items()},
            arrays=arrays,
            seconds=float(state.get("seconds", 0.0)),
            extra=dict(state.get("extra", {})),
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
        """Remove the checkpoint: training finished and its outputs are written."""
        shutil.rmtree(self.directory, ignore_errors=True)
