"""Metric writing: TensorBoard event files (tensorboardX, no TensorFlow) plus ``metrics.jsonl``.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax


class MetricWriter:
    """Writes scalars to ``workdir/tensorboard`` and appends JSON lines to ``workdir/metrics.jsonl``."""

    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._active:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
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
            self._jsonl.close()


def read_jsonl(path: str) -> list[dict]:
    """Reads a ``metrics.jsonl`` file (for tests and analysis)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
