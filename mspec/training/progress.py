"""Progress lines: throughput and a smoothed ETA.

The time per step is an exponential moving average over log intervals (evaluation and
checkpoint time excluded), so one slow interval on a shared machine moves the ETA by a fraction
of its deviation instead of replacing it. The first interval after a (re)start holds the step's
compilation and does not enter the average.
"""

from __future__ import annotations

import math
import sys
import time

import jax

SMOOTHING = 0.2  # weight of the newest interval in the moving average of seconds per step


def note(msg: str) -> None:
    """Prints a line on process 0 only."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d{h:02d}h" if d else (f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s")


class Progress:
    """Throughput and ETA between log lines.

    Call :meth:`interval` at each log step with the molecules trained since the previous one,
    and :meth:`pause` after work that is not training (evaluation, checkpoints).
    """

    def __init__(self, start_step: int, end_step: int):
        self.end_step = end_step
        self.last_step = start_step
        self.last_time = time.time()
        self.seconds_per_step: float | None = None
        self.intervals = 0

    def pause(self) -> None:
        self.last_time = time.time()

    def interval(self, step: int, molecules: float) -> tuple[float, float]:
        """``(molecules per second, smoothed seconds to end_step)`` since the previous call."""
        now = time.time()
        elapsed = max(now - self.last_time, 1e-9)
        per_step = elapsed / max(step - self.last_step, 1)
        self.last_time, self.last_step = now, step
        self.intervals += 1
        if self.intervals == 1:  # includes the step's compilation: not a sample of the pace
            return molecules / elapsed, (self.end_step - step) * per_step
        if self.seconds_per_step is None:
            self.seconds_per_step = per_step
        else:
            self.seconds_per_step += SMOOTHING * (per_step - self.seconds_per_step)
        return molecules / elapsed, (self.end_step - step) * self.seconds_per_step
