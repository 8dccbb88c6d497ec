"""A watchdog that turns a training run which has stopped making progress into a prompt exit.

TensorFlow's CPU thread pools can deadlock: seen here once in a 20-epoch CNN run, after 6
epochs, a Conv2D waited forever on its Eigen worker threads, at 0% CPU, with no error. Nothing
in this process can unstick that, but the run is checkpointed after every epoch: exiting and
rerunning the stage resumes it exactly. So while a Keras net trains, a watchdog thread checks
that batches keep finishing; after `stall_seconds()` without one it logs what happened and what
to do, and ends the process with STALL_EXIT_STATUS (as a kill would, so the checkpoint and the
MLflow run are resumed by the rerun).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType

from imgpipe.runtime import StageError

log = logging.getLogger("imgpipe.stall")

# seconds without a finished batch before a run counts as stalled (an operational setting, like
# a timeout: it changes no result, so it is an environment variable, not a param)
STALL_SECONDS_ENV = "IMGPIPE_STALL_SECONDS"
DEFAULT_STALL_SECONDS = 900.0  # a batch takes well under a second to a few seconds here
STALL_EXIT_STATUS = 75  # EX_TEMPFAIL from sysexits.h: temporary failure, try again


def stall_seconds() -> float:
    """The stall limit: IMGPIPE_STALL_SECONDS if set (0 = no watchdog), else 900."""
    text = os.environ.get(STALL_SECONDS_ENV, "").strip()
    if not text:
        return DEFAULT_STALL_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0 or value != value:  # negative, or NaN
        raise StageError(
            f"{STALL_SECONDS_ENV}={text!r} is not a number of seconds >= 0 "
            "(0 turns the stall watchdog off; unset it for the default 900)"
        )
    return value


def exit_stalled(message: str) -> None:
    """Log the message and end the process at once with STALL_EXIT_STATUS."""
    log.error(message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(STALL_EXIT_STATUS)  # the main thread is stuck in native code: nothing else ends it


class StallWatchdog:
    """A context manager: while it is open, `beat()` must be called at least every `limit`
    seconds, or `on_stall(message)` runs (once) on the watchdog's thread.

    `advice()` is asked at that moment for what the user should do next (it names the epoch to
    resume from). A limit of 0 turns the watchdog off.
    """

    def __init__(
        self,
        limit: float,
        advice: Callable[[], str],
        on_stall: Callable[[str], None] = exit_stalled,
    ) -> None:
        self.limit = limit
        self.advice = advice
        self.on_stall = on_stall
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Progress was made (a batch finished)."""
        self._last = time.monotonic()

    def __enter__(self) -> StallWatchdog:
        self.beat()
        if self.limit > 0:
            self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        poll = min(10.0, self.limit / 4)
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.limit:
                self.on_stall(
                    f"no training batch has finished for {idle:.0f} s "
                    f"(limit {self.limit:.0f} s, {STALL_SECONDS_ENV}): training has stalled, "
                    f"most likely a deadlock inside TensorFlow. Stopping with exit status "
                    f"{STALL_EXIT_STATUS}; {self.advice()}"
                )
                return
