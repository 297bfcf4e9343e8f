"""Per-device data streams: the global batch does not depend on the number of processes.

**The rule.** Let ``D`` be the number of devices on the mesh's ``"data"`` axis (over all
processes). The input stream is the dataset, optionally shuffled (one global permutation per
epoch, seeded by ``config.seed``) and repeated. Stream position ``i`` goes to device slot
``i mod D``; each slot packs its own sub-stream greedily into the static per-device budget. So
the device batch in slot ``d`` at step ``t`` depends only on (dataset, seed, ``D``, budget) — not
on how the ``D`` devices are spread over processes — and every process reads and featurises only
the sub-streams of the slots its devices hold (``L / D`` of the data for ``L`` local devices).
Together with the per-slot noise keys of the train step (``split(key, D)[d]``), a run gives the
same losses and gradients with 1, 2 or N processes for the same ``D``.

**The position** is one integer per slot (molecules of that sub-stream already delivered). The
checkpoint stores all ``D`` of them (:func:`global_state` gathers them from all processes); any
process layout with the same ``D`` resumes exactly. With a different ``D`` the positions are
translated (:func:`start_positions`): the run resumes at the first stream position that every
old slot had consumed, so no molecule is skipped and at most ``D_old`` molecules per slot are
seen twice (the batches then differ anyway, because the per-device budget depends on ``D``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from mspec import graph
from mspec.data import pipeline

log = logging.getLogger(__name__)


def slot_stream(
    source,
    featurizer: pipeline.Featurizer,
    *,
    slot: int,
    num_slots: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
    limit: int | None = None,
) -> grain.MapDataset:
    """Featurised molecules of device slot ``slot``: positions ``slot, slot + D, ...`` of the stream.

    The stream is ``source[:limit]``, then shuffled (a global permutation, re-drawn each epoch),
    then repeated; the slot's share is taken last, so it does not depend on the process layout.
    """
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} outside [0, {num_slots})")
    ds = grain.MapDataset.source(source)
    if limit is not None:
        ds = ds[: min(limit, len(ds))]
    if shuffle:
        ds = ds.seed(seed).shuffle()
    if repeat:
        ds = ds.repeat(None)
    return ds[slot::num_slots].map(featurizer)


def local_slots(sharding: jax.sharding.Sharding, num_slots: int) -> list[int]:
    """Global rows (device slots) of a ``[D, ...]`` batch held by this process, in local-row order.

    ``jax.make_array_from_process_local_data`` maps the process-local rows onto the process's
    shards in increasing global index, so local row ``j`` is slot ``local_slots(...)[j]``.
    """
    index_map = sharding.addressable_devices_indices_map((num_slots,))
    slots = set()
    for index in index_map.values():
        rows = range(num_slots)[index[0]]
        if len(rows) != 1:
            raise ValueError(
                f"expected one batch row per device, got rows {list(rows)} on one device; the "
                "global batch must have one row per device of the 'data' axis"
            )
        slots.add(rows[0])
    return sorted(slots)


class SlotBatchIterator:
    """Process-local rows ``[L, ...]`` of the global batch; row ``j`` packs slot ``slots[j]``.

    Each slot has its own :class:`pipeline.PackedBatchIterator` (with its own prefetch thread).
    For a finite dataset a slot that runs out yields all-padding device batches while others
    still have molecules; ``StopIteration`` comes when every local slot is exhausted. In a
    multi-process evaluation the processes must nevertheless run the same number of steps, so
    ``pad_forever=True`` never stops (the caller stops when a global batch has no molecule).

    Args:
      source: random-access data source (``len``, ``[i]``).
      featurizer: per-molecule featuriser.
      budget: per-device static shapes.
      slots: the device slots of this process (:func:`local_slots`).
      num_slots: ``D``, the number of device slots of the global batch.
      start: per-slot start positions (same order as ``slots``; default all 0).
      pad_forever: yield padding instead of stopping when every slot is exhausted.
      prefetch, seed, shuffle, repeat, limit: as in :func:`slot_stream` /
        :class:`pipeline.PackedBatchIterator`.
      num_threads, num_workers: grain reader threads / worker processes, per slot (see
        :class:`pipeline.PackedBatchIterator`).
      pack_fn: ``(molecules, budget) -> device batch`` (default :func:`graph.pack`; fine-tuning
        packs its labels too).
    """

    def __init__(
        self,
        source,
        featurizer: pipeline.Featurizer,
        budget: graph.Budget,
        *,
        slots: Sequence[int],
        num_slots: int,
        seed: int,
        shuffle: bool,
        repeat: bool,
        limit: int | None = None,
        start: Sequence[int] | None = None,
        pad_forever: bool = False,
        prefetch: int = 4,
        num_threads: int = 0,
        num_workers: int = 0,
        pack_fn=graph.pack,
    ):
        self.slots = list(slots)
        self.num_slots = num_slots
        start = list(start) if start is not None else [0] * len(self.slots)
        if len(start) != len(self.slots):
            raise ValueError(f"{len(start)} start positions for {len(self.slots)} slots")
        self._pad_forever = pad_forever
        self._padding = graph.stack([pack_fn([], budget)])
        self._iters = [
            pipeline.PackedBatchIterator(
                slot_stream(
                    source,
                    featurizer,
                    slot=s,
                    num_slots=num_slots,
                    seed=seed,
                    shuffle=shuffle,
                    repeat=repeat,
                    limit=limit,
                ),
                budget,
                1,
                start=k,
                prefetch=prefetch,
                num_threads=num_threads,
                num_workers=num_workers,
                pack_fn=pack_fn,
            )
            for s, k in zip(self.slots, start)
        ]
        self._positions = list(start)
        self._exhausted = [False] * len(self._iters)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for j, it in enumerate(self._iters):
            batch = None
            if not self._exhausted[j]:
                try:
                    batch = next(it)
                    self._positions[j] = it.state()["next_index"]
                except StopIteration:
                    self._exhausted[j] = True
            rows.append(self._padding if batch is None else batch)
        if all(self._exhausted) and not self._pad_forever:
            raise StopIteration
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def state(self) -> dict[str, Any]:
        """This process's positions: ``{"num_slots": D, "slots": [...], "positions": [...]}``."""
        return {
            "num_slots": self.num_slots,
            "slots": list(self.slots),
            "positions": [int(p) for p in self._positions],
        }

    def close(self) -> None:
        for it in self._iters:
            it.close()


def global_state(local: Mapping[str, Any]) -> dict[str, Any]:
    """All ``D`` slot positions, gathered from every process (a collective if there are several).

    Returns ``{"num_slots": D, "positions": [k_0, ..., k_{D-1}]}`` (JSON-serialisable), the same
    on every process.
    """
    num_slots = int(local["num_slots"])
    mine = np.full((num_slots,), -1, np.int64)
    mine[list(local["slots"])] = local["positions"]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # int32 travels everywhere (no x64 needed); positions stay far below 2**31.
        everyone = np.asarray(multihost_utils.process_allgather(mine.astype(np.int32)))
        mine = everyone.reshape(-1, num_slots).max(axis=0).astype(np.int64)
    if (mine < 0).any():
        raise RuntimeError(
            f"data position of device slots {np.flatnonzero(mine < 0).tolist()} is unknown: no "
            "process holds them"
        )
    return {"num_slots": num_slots, "positions": mine.tolist()}


def start_positions(saved: Mapping[str, Any], slots: Sequence[int], num_slots: int) -> list[int]:
    """Per-slot start positions for this process's ``slots`` from a checkpoint's data state.

    ``saved`` is :func:`global_state` output, or the older single-stream ``{"next_index": k}``
    (read as one slot). Exact when ``saved["num_slots"] == num_slots``; otherwise translated as
    the module docstring says (and logged).
    """
    if "positions" in saved:
        old_d, old = int(saved["num_slots"]), [int(p) for p in saved["positions"]]
    elif "next_index" in saved:
        old_d, old = 1, [int(saved["next_index"])]
    else:
        raise ValueError(f"checkpoint data state {dict(saved)} has no iterator position")
    if len(old) != old_d:
        raise ValueError(f"checkpoint data state has {len(old)} positions for {old_d} slots")
    if old_d == num_slots:
        return [old[s] for s in slots]
    # First stream position not yet consumed by every old slot (slot d consumed d + j*old_d, j < k).
    first_unseen = min(d + k * old_d for d, k in enumerate(old))
    new = [max(0, math.ceil((first_unseen - s) / num_slots)) for s in slots]
    log.warning(
        "checkpoint data state was written with %d device slots, this run has %d: resuming at "
        "stream position %d (no molecule skipped; up to %d seen twice)",
        old_d,
        num_slots,
        first_unseen,
        sum(old) - first_unseen,
    )
    return new
