"""Input pipeline: TFDS source -> grain (shuffle, per-host shard, featurise) -> greedy packing.

Each global batch is ``D`` device batches (layout of :mod:`mspec.types`) stacked on a leading
axis. The iterator position is one integer (the index, in the shuffled and repeated grain
dataset, of the first molecule not yet delivered), so a checkpoint can store it and a resumed run
sees exactly the batches an uninterrupted one would.

Neighbour lists are built here, per molecule, with radius ``cutoff + skin`` (see
:mod:`mspec.types`), never inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Iterator, Mapping

import grain
import numpy as np

from mspec import graph


class BadRecordError(ValueError):
    """A record cannot be used by the model (e.g. an element outside the embedding table)."""


@dataclasses.dataclass(frozen=True)
class Featurizer:
    """Turns a decoded TFDS example into the per-molecule arrays that :func:`graph.pack` takes.

    Attributes:
      radius: neighbour-list radius in Å (model cutoff + skin).
      max_z: size of the model's element embedding table; atomic numbers must be in [1, max_z).
      dataset: dataset name, used in error messages.
      spectra: ``(name, length)`` of the spectra to carry (e.g. ``(("uv", 701),)``); each must
        be a finite float vector of that length in every example.
    """

    radius: float
    max_z: int
    dataset: str = "dataset"
    spectra: tuple[tuple[str, int], ...] = ()

    def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        z = np.asarray(example["atomic_numbers"], np.int32)
        pos = np.asarray(example["positions"], np.float32)
        record = example.get("index", "?")
        if z.ndim != 1 or pos.shape != (len(z), 3):
            raise BadRecordError(
                f"{self.dataset} record {record}: atomic_numbers {z.shape} and positions "
                f"{pos.shape} disagree"
            )
        bad = z[(z < 1) | (z >= self.max_z)]
        if bad.size:
            raise BadRecordError(
                f"{self.dataset} record {record}: element Z={int(bad[0])} is outside the model's "
                f"embedding table (1 <= Z < max_z={self.max_z}); raise config.model.max_z or "
                "remove the molecule"
            )
        if not np.all(np.isfinite(pos)):
            raise BadRecordError(f"{self.dataset} record {record}: non-finite coordinates")
        senders, receivers = graph.radius_graph(pos, self.radius)
        tors = np.asarray(example.get("torsions", np.zeros((0, 4))), np.int32).reshape(-1, 4)
        moving = np.asarray(
            example.get("torsion_moving", np.zeros((0, len(z)))), bool
        ).reshape(len(tors), len(z))
        out = {
            "atomic_numbers": z,
            "positions": pos,
            "senders": senders,
            "receivers": receivers,
            "torsions": tors,
            "moving": moving,
        }
        if self.spectra:
            out["spectra"] = {
                name: self._spectrum(example, name, length, record) for name, length in self.spectra
            }
        return out

    def _spectrum(self, example, name: str, length: int, record) -> np.ndarray:
        if name not in example:
            raise BadRecordError(
                f"{self.dataset} record {record}: no spectrum {name!r} (the config declares it; "
                f"the record has {sorted(example)})"
            )
        s = np.asarray(example[name], np.float32)
        if s.shape != (length,):
            raise BadRecordError(
                f"{self.dataset} record {record}: spectrum {name!r} has shape {s.shape}, "
                f"expected ({length},)"
            )
        if not np.all(np.isfinite(s)):
            raise BadRecordError(f"{self.dataset} record {record}: spectrum {name!r} is not finite")
        return s


def molecule_stats(featurized: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Mean/max atoms, edges and torsions over featurised molecules (for choosing budgets)."""
    nodes = np.array([len(m["atomic_numbers"]) for m in featurized])
    edges = np.array([len(m["senders"]) for m in featurized])
    tors = np.array([len(m["torsions"]) for m in featurized])
    return {
        "mean_nodes": float(nodes.mean()),
        "max_nodes": int(nodes.max()),
        "mean_edges": float(edges.mean()),
        "max_edges": int(edges.max()),
        "max_torsions": int(tors.max()),
    }


def make_grain_dataset(
    source,
    featurizer: Featurizer,
    *,
    seed: int,
    shuffle: bool,
    repeat: bool,
    process_index: int = 0,
    process_count: int = 1,
    limit: int | None = None,
) -> grain.MapDataset:
    """Random-access dataset of featurised molecules: optional limit, host shard, shuffle, repeat.

    The training loop uses :mod:`mspec.data.sharding` instead (one stream per device slot), whose
    global batches do not depend on the number of processes; this per-process shard does.
    """
    ds = grain.MapDataset.source(source)
    if limit is not None:
        ds = ds[: min(limit, len(ds))]
    ds = ds[process_index::process_count]
    if shuffle:
        ds = ds.seed(seed).shuffle()  # a global index permutation, re-drawn every epoch
    if repeat:
        ds = ds.repeat(None)
    return ds.map(featurizer)


def _ensure_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags; outside ``absl.app.run`` they are unparsed."""
    from absl import flags  # noqa: PLC0415

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class PackedBatchIterator:
    """Iterates global batches ``[D, ...]`` packed greedily into a static :class:`graph.Budget`.

    A background thread reads and packs ahead (``prefetch`` batches). ``state()`` after receiving
    a batch is the position to resume from to get the batches that follow it.

    Molecules are read and featurised (neighbour lists) either inline in that thread
    (``num_threads = num_workers = 0``), by grain with ``num_threads`` reader threads, or by grain
    with ``num_workers`` worker processes (``mp_prefetch``). The molecule order, and therefore
    every batch and the resume position, are the same in all three modes.

    Args:
      dataset: a grain ``MapDataset`` of featurised molecules (see :func:`make_grain_dataset`).
      budget: per-device static shapes.
      num_devices: device batches per global batch (local devices of this process).
      start: iterator position to start from (from a checkpoint).
      prefetch: packed global batches to prepare ahead.
      num_threads: grain reader threads (0: read inline).
      num_workers: grain worker processes (0: none). Each re-imports the dataset's code, so they
        pay off only when featurisation dominates (large molecules, many cores).
      read_buffer: featurised molecules grain keeps ready ahead of the packer.
      pack_fn: ``(molecules, budget) -> device batch``; :func:`graph.pack` by default (a
        fine-tuning pipeline passes one that also packs labels).
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        budget: graph.Budget,
        num_devices: int,
        start: int = 0,
        prefetch: int = 4,
        num_threads: int = 0,
        num_workers: int = 0,
        read_buffer: int = 256,
        pack_fn=graph.pack,
    ):
        self._pack_fn = pack_fn
        self._dataset = dataset
        self._budget = budget
        self._num_devices = num_devices
        self._num_threads = num_threads
        self._num_workers = num_workers
        self._read_buffer = read_buffer
        self._position = start
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start,), daemon=True)
        self._thread.start()

    def _length(self) -> int | None:
        try:
            return len(self._dataset)
        except (OverflowError, TypeError):
            return None

    def _molecules(self, start: int) -> Iterator[dict]:
        """Featurised molecules from dataset position ``start`` on, in dataset order."""
        length = self._length()
        if self._num_threads <= 0 and self._num_workers <= 0:
            index = start
            while length is None or index < length:
                yield self._dataset[index]
                index += 1
            return
        if length is not None and start >= length:
            return
        ds = self._dataset[start:].to_iter_dataset(
            grain.ReadOptions(num_threads=max(1, self._num_threads),
                              prefetch_buffer_size=self._read_buffer)
        )
        if self._num_workers > 0:
            _ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
        yield from ds

    def _produce(self, index: int) -> None:
        try:
            budget = self._budget
            molecules = self._molecules(index)
            pending = None  # A molecule read but not yet placed (it did not fit the last batch).
            while not self._stop.is_set():
                devices = []
                for _ in range(self._num_devices):
                    mols, nodes, edges = [], 0, 0
                    while True:
                        if pending is None:
                            mol = next(molecules, None)
                            if mol is None:
                                break
                            pending = (index, mol)
                            index += 1
                        mol = pending[1]
                        n, e = len(mol["atomic_numbers"]), len(mol["senders"])
                        if not budget.fits(nodes + n, edges + e, len(mols) + 1):
                            if not mols:
                                raise ValueError(
                                    f"molecule at dataset position {pending[0]} ({n} atoms, {e} "
                                    f"edges) does not fit an empty device batch {budget}; increase "
                                    "the node/edge budgets"
                                )
                            break
                        mols.append(mol)
                        nodes, edges = nodes + n, edges + e
                        pending = None
                    devices.append(self._pack_fn(mols, budget))
                if not any(d["graph_mask"].any() for d in devices):
                    break  # A finite dataset is exhausted.
                resume_at = pending[0] if pending is not None else index
                self._put((graph.stack(devices), resume_at))
            self._put(None)
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer thread)
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self._queue.get()
        if item is None:
            self._queue.put(None)  # Stay exhausted.
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self._position = item
        return batch

    def state(self) -> dict[str, int]:
        """JSON-serialisable position: the batches after the last one received start here."""
        return {"next_index": int(self._position)}

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)


def fill(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Packing fill of one global batch: real / budgeted nodes and edges, molecules per batch."""
    return {
        "node_fill": float(batch["node_mask"].mean()),
        "edge_fill": float(batch["edge_mask"].mean()),
        "molecules": float(batch["graph_mask"].sum()),
    }
