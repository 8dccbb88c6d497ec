"""The stall watchdog: a training run whose batches stop finishing ends with a clear message and
exit status 75, and the rerun resumes from its checkpoint."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from imgpipe.runtime import StageError
from imgpipe.stall import (
    DEFAULT_STALL_SECONDS,
    STALL_EXIT_STATUS,
    STALL_SECONDS_ENV,
    StallWatchdog,
    stall_seconds,
)
from tests.support import ROOT, command_env


def test_the_watchdog_fires_once_when_beats_stop() -> None:
    fired: list[str] = []
    with StallWatchdog(0.2, lambda: "do this next", on_stall=fired.append):
        time.sleep(1.0)
    assert len(fired) == 1
    assert "no training batch has finished" in fired[0]
    assert STALL_SECONDS_ENV in fired[0]
    assert fired[0].endswith("do this next")


def test_the_watchdog_stays_quiet_while_beats_come() -> None:
    fired: list[str] = []
    with StallWatchdog(0.3, lambda: "", on_stall=fired.append) as watchdog:
        for _ in range(12):  # 1.2 s in all, a beat every 0.1 s
            time.sleep(0.1)
            watchdog.beat()
    time.sleep(0.5)  # and nothing fires once it is closed
    assert fired == []


def test_a_zero_limit_turns_the_watchdog_off() -> None:
    fired: list[str] = []
    with StallWatchdog(0.0, lambda: "", on_stall=fired.append) as watchdog:
        time.sleep(0.3)
    assert fired == []
    assert watchdog._thread is None


@pytest.mark.parametrize(
    ("text", "expected"), [("", DEFAULT_STALL_SECONDS), ("0", 0.0), ("30", 30.0)]
)
def test_stall_seconds_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: float
) -> None:
    monkeypatch.setenv(STALL_SECONDS_ENV, text)
    assert stall_seconds() == expected


@pytest.mark.parametrize("text", ["soon", "-5", "nan"])
def test_a_bad_stall_limit_is_refused_with_what_to_set(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv(STALL_SECONDS_ENV, text)
    with pytest.raises(StageError, match=STALL_SECONDS_ENV) as raised:
        stall_seconds()
    assert "0 turns the stall watchdog off" in str(raised.value)


# A dense net on random pixels, checkpointed every epoch; with SLEEP set, the end of epoch 2
# (index 1) takes longer than the stall limit, as a deadlocked TensorFlow would.
TRAIN_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, time
    import numpy as np
    from imgpipe.checkpoints import TrainingCheckpoint
    from imgpipe.params import load_params
    from tests.support import fit

    logging.basicConfig(level="INFO", format="[train@dense] %(message)s")
    section = load_params("params.yaml").dense.model_copy(
        update={"hidden_units": [8], "epochs": 3, "batch_size": 16}
    )
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 4, 4, 1), dtype=np.uint8)
    y = rng.integers(0, 2, 64)

    def on_epoch_end(epoch, logs):
        if os.environ.get("SLEEP") and epoch == 1:
            time.sleep(30)

    checkpoint = TrainingCheckpoint(sys.argv[1], "fixed")
    result = fit("dense", section, x, y, x[:16], y[:16], num_classes=2, seed=0,
                 on_epoch_end=on_epoch_end, checkpoint=checkpoint)
    print("resumed_from_epoch", result.resumed_from_epoch)
    """
)


def run_training(tmp_path: Path, *, stall: bool) -> subprocess.CompletedProcess[str]:
    """TRAIN_SCRIPT in a subprocess with a 2 s stall limit, checkpointing to tmp_path/checkpoint;
    with `stall`, its second epoch end outlasts the limit."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**command_env(), "PYTHONPATH": str(ROOT), STALL_SECONDS_ENV: "2"}
    if stall:
        env["SLEEP"] = "1"
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "checkpoint")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_stalled_training_exits_75_and_the_rerun_resumes(tmp_path: Path) -> None:
    stalled = run_training(tmp_path, stall=True)
    assert stalled.returncode == STALL_EXIT_STATUS, stalled.stderr[-2000:]
    assert "training has stalled" in stalled.stderr
    checkpoint = tmp_path / "checkpoint"
    assert f"resume after epoch 1 from the checkpoint in {checkpoint}" in stalled.stderr

    rerun = run_training(tmp_path, stall=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed_from_epoch 1" in rerun.stdout
