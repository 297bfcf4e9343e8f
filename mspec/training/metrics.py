"""Metric writing: TensorBoard event files (tensorboardX, no TensorFlow) plus ``metrics.jsonl``.

Only process 0 writes; other processes get a writer that does nothing.

A resumed run continues from its checkpoint's step, so the records written after that step by
the interrupted run are re-written by the resumed one. To keep one record per step,
``MetricWriter(workdir, resume_step=S)`` first rewrites ``metrics.jsonl`` without the records
after ``S`` (and without a torn last line, e.g. from a full disk), and starts the TensorBoard
writer with ``purge_step = S + 1``, which tells TensorBoard to discard the earlier events from
step ``S + 1`` on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax


class MetricsFileError(ValueError):
    """A ``metrics.jsonl`` line that is not a JSON record (names the file and line)."""


def _parse(path: str, text: str, lenient: bool = False) -> tuple[list[dict], int]:
    """``(records, damaged)``: the records of a metrics.jsonl text and the number of damaged
    lines left out: an incomplete last line (a write cut short), and with ``lenient`` any line
    that is not a JSON record (e.g. a torn line a resumed run of an older version appended to)."""
    lines = text.split("\n")
    records, torn = [], 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) or lenient:  # the last line, without a newline: a torn write
                torn += 1
                continue
            raise MetricsFileError(f"{path} line {i}: not a metrics record ({e})") from None
        records.append(rec)
    return records, torn


def repair(path: str, resume_step: int) -> tuple[int, int]:
    """Rewrites ``path`` without records after ``resume_step`` and without damaged lines.

    Returns:
      ``(records dropped, damaged lines dropped)``; the file is untouched when both are 0.
    """
    if not os.path.isfile(path):
        return 0, 0
    with open(path) as f:
        records, torn = _parse(path, f.read(), lenient=True)
    keep = [r for r in records if int(r.get("step", 0)) <= resume_step]
    dropped = len(records) - len(keep)
    if dropped or torn:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, path)
    return dropped, torn


class MetricWriter:
    """Writes scalars to ``workdir/tensorboard`` and appends JSON lines to ``workdir/metrics.jsonl``.

    ``resume_step``: the step the run (re)starts from; records after it are removed first (see the
    module docstring). ``None`` appends to whatever is there.
    """

    def __init__(self, workdir: str, resume_step: int | None = None):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        purge = None
        if resume_step is not None:
            dropped, torn = repair(path, resume_step)
            if torn:
                print(f"{path}: removed {torn} torn line(s) (an interrupted write)", file=sys.stderr)
            if dropped:
                print(f"{path}: removed {dropped} record(s) after step {resume_step}, which this "
                      "run repeats", file=sys.stderr)
            if os.path.isdir(os.path.join(workdir, "tensorboard")):
                purge = resume_step + 1
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)
        self._jsonl = open(path, "a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._active:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
        # One write call per record: a failure leaves at most one torn line, repaired on resume.
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        if self._active:
            self._tb.add_text(tag, text, step)

    def write_image(self, tag: str, image, step: int) -> None:
        """Logs an ``[H, W, 3|4]`` uint8 image to TensorBoard."""
        if self._active:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self._active:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self._active:
            self._tb.close()
            try:
                self._jsonl.close()
            except OSError as e:  # the flush of a full disk; the torn line is repaired on resume
                print(f"WARNING: closing metrics.jsonl: {e}", file=sys.stderr)


def read_jsonl(path: str) -> list[dict]:
    """Reads a ``metrics.jsonl`` file (for tests and analysis); a torn last line is skipped.

    Raises:
      MetricsFileError: a damaged line elsewhere (names the file and line).
    """
    with open(path) as f:
        return _parse(path, f.read())[0]
