"""When the training loops checkpoint besides their step cadence: on SIGINT/SIGTERM (the signal a
cluster, Ctrl-C or a TPU preemption sends) and every ``checkpoint_every_minutes`` of wall clock.

The first SIGINT or SIGTERM asks the loop to save a checkpoint at the end of the current step and
stop (:class:`Stopped`, exit code 128 + signal number); a second one stops at once (Ctrl-C:
``KeyboardInterrupt``; SIGTERM: the default action). In a multi-process run every process must
save the same step, so the processes agree (one tiny all-gather) at the steps where they already
synchronise, every ``log_every`` steps; a single process checks after every step.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import jax
import numpy as np


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; re-running resumes from it."""

    def __init__(self, signum: int, step: int, where: str):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in {where}; "
            "re-run the same command to resume"
        )


class StopSignals:
    """Context manager: records the first SIGINT/SIGTERM instead of dying (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        self.signum = signum
        # A second signal of the same kind acts as usual (stop now, without saving).
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        if jax.process_index() == 0:
            print(
                f"{signal.Signals(signum).name} received: saving a checkpoint at the end of this step, "
                "then stopping (send it again to stop at once without saving)",
                file=sys.stderr, flush=True,
            )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def _any_process(flags: list[bool]) -> list[bool]:
    """Element-wise OR of per-process flags over all processes (a collective)."""
    from jax.experimental import multihost_utils

    mine = np.asarray(flags, np.int32)
    return list(np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(flags)).any(axis=0))


class ExtraSaves:
    """Decides, after each step, whether to save outside the step cadence and whether to stop.

    Args:
      signals: the run's :class:`StopSignals`.
      every_minutes: wall-clock cadence (0 = off), counted from the start and from each save.
      sync_every: in a multi-process run, the processes agree every this many steps.
    """

    def __init__(self, signals: StopSignals, every_minutes: float, sync_every: int):
        if not every_minutes >= 0:
            raise ValueError(f"checkpoint_every_minutes must be >= 0, got {every_minutes!r}")
        self.signals = signals
        self.every_s = 60.0 * every_minutes
        self.sync_every = sync_every
        self.last_save = time.monotonic()

    def saved(self) -> None:
        """Restarts the wall-clock interval (call on every save)."""
        self.last_save = time.monotonic()

    def check(self, step: int) -> tuple[bool, bool]:
        """``(save now, stop after saving)`` after ``step``, the same on every process."""
        stop = self.signals.signum is not None
        due = bool(self.every_s) and time.monotonic() - self.last_save >= self.every_s
        if jax.process_count() > 1:
            if step % self.sync_every:
                return False, False
            due, stop = _any_process([due, stop])
        return due or stop, stop
