"""Neighbour lists, greedy packing into static budgets, and the in-step edge filter.

Host side (numpy, runs in the input pipeline): :func:`radius_graph` builds one molecule's edge
list, :class:`Budget` holds the static per-device shapes, and :func:`pack` turns a list of
molecules into one padded device batch in the layout of :mod:`mspec.types`.

Device side (jax, runs inside the jitted step): :func:`active_edges` re-applies the cutoff and the
neighbour cap to the (noisy) positions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------


def radius_graph(positions: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (j -> i) of one molecule within ``radius``, self-loops included.

    Args:
      positions: ``[n, 3]`` coordinates in Å.
      radius: inclusion radius in Å (the model cutoff plus the pipeline skin).

    Returns:
      ``(senders [e], receivers [e])`` int32, sorted by receiver then sender, so that the
      neighbour cap (first 32 by atom index, as torch_cluster does) can be applied in order.
    """
    diff = positions[None, :, :] - positions[:, None, :]  # [i, j, 3] = p_j - p_i
    dist2 = np.einsum("ijc,ijc->ij", diff, diff)
    receivers, senders = np.nonzero(dist2 < radius * radius)  # row-major: sorted by (i, j)
    return senders.astype(np.int32), receivers.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Static per-device batch shapes. The last node and graph slots are always padding.

    ``spectra`` lists ``(name, length)`` of the per-molecule spectra carried in the batch (as
    ``spectrum_<name> [G, length]``); empty for structure-only training.
    """

    n_node: int
    n_edge: int
    n_graph: int
    max_torsions: int
    spectra: tuple[tuple[str, int], ...] = ()

    def fits(self, nodes: int, edges: int, graphs: int) -> bool:
        return nodes <= self.n_node - 1 and edges <= self.n_edge and graphs <= self.n_graph - 1


def budget_from_stats(
    mean_nodes: float,
    mean_edges: float,
    max_nodes: int,
    max_edges: int,
    max_torsions: int,
    molecules_per_device: int,
    slack: float = 1.1,
    spectra: tuple[tuple[str, int], ...] = (),
) -> Budget:
    """Chooses budgets so that about ``molecules_per_device`` molecules fit in one device batch.

    Node and edge budgets are ``slack`` times the expected totals (rounded up to a multiple of 8),
    but never below what the largest molecule needs, so every molecule fits on its own.
    """

    def round8(x: float) -> int:
        return int(8 * math.ceil(x / 8))

    n_node = max(round8(molecules_per_device * mean_nodes * slack) + 1, max_nodes + 1)
    n_edge = max(round8(molecules_per_device * mean_edges * slack), max_edges)
    return Budget(
        n_node=n_node,
        n_edge=n_edge,
        n_graph=molecules_per_device + 1,
        max_torsions=max(1, max_torsions),
        spectra=tuple(spectra),
    )


def pack(molecules: Sequence[Mapping[str, np.ndarray]], budget: Budget) -> dict[str, np.ndarray]:
    """Packs molecules into one padded device batch (layout of :mod:`mspec.types`).

    Args:
      molecules: each a mapping with ``atomic_numbers [n]``, ``positions [n, 3]``,
        ``senders [e]``, ``receivers [e]`` (molecule-local indices), ``torsions [t, 4]`` and
        ``moving [t, n]``; plus ``spectra: {name: [length]}`` for every spectrum in
        ``budget.spectra``.
      budget: the static shapes; the molecules must fit (see :meth:`Budget.fits`).

    Returns:
      A dict of numpy arrays with the shapes of :mod:`mspec.types`.
    """
    N, E, G, T = budget.n_node, budget.n_edge, budget.n_graph, budget.max_torsions
    batch = {
        "atomic_numbers": np.zeros(N, np.int32),
        "positions": np.zeros((N, 3), np.float32),
        "node_mask": np.zeros(N, bool),
        "node_graph": np.full(N, G - 1, np.int32),
        "node_moving": np.zeros((N, T), bool),
        # Padding edges are self-loops on the last (always padding) node.
        "senders": np.full(E, N - 1, np.int32),
        "receivers": np.full(E, N - 1, np.int32),
        "edge_mask": np.zeros(E, bool),
        "graph_mask": np.zeros(G, bool),
        "n_node": np.zeros(G, np.int32),
        "torsion_atoms": np.zeros((G, T, 4), np.int32),
        "torsion_mask": np.zeros((G, T), bool),
    }
    for name, length in budget.spectra:
        batch[spectrum_key(name)] = np.zeros((G, length), np.float32)
    node, edge = 0, 0
    for g, mol in enumerate(molecules):
        n = len(mol["atomic_numbers"])
        e = len(mol["senders"])
        t = len(mol["torsions"])
        if not budget.fits(node + n, edge + e, g + 1):
            raise ValueError(
                f"molecule {g} ({n} atoms, {e} edges) does not fit the budget {budget}"
            )
        if t > T:
            raise ValueError(
                f"molecule {g} has {t} rotatable torsions but the budget allows {T}; raise "
                "config.data.max_torsions"
            )
        batch["atomic_numbers"][node : node + n] = mol["atomic_numbers"]
        batch["positions"][node : node + n] = mol["positions"]
        batch["node_mask"][node : node + n] = True
        batch["node_graph"][node : node + n] = g
        batch["senders"][edge : edge + e] = mol["senders"] + node
        batch["receivers"][edge : edge + e] = mol["receivers"] + node
        batch["edge_mask"][edge : edge + e] = True
        batch["graph_mask"][g] = True
        batch["n_node"][g] = n
        if t:
            batch["torsion_atoms"][g, :t] = np.asarray(mol["torsions"]) + node
            batch["torsion_mask"][g, :t] = True
            batch["node_moving"][node : node + n, :t] = np.asarray(mol["moving"], bool).T
        for name, length in budget.spectra:
            spectrum = np.asarray(mol["spectra"][name], np.float32)
            if spectrum.shape != (length,):
                raise ValueError(
                    f"molecule {g}: spectrum {name!r} has shape {spectrum.shape}, the budget "
                    f"expects ({length},)"
                )
            batch[spectrum_key(name)][g] = spectrum
        node += n
        edge += e
    return batch


def spectrum_key(name: str) -> str:
    """Batch key of the per-molecule spectrum ``name`` (``[G, L]``, zeros in padding slots)."""
    return f"spectrum_{name}"


def stack(device_batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks per-device batches on a leading device axis ``[D, ...]``."""
    return {k: np.stack([b[k] for b in device_batches]) for k in device_batches[0]}


# --------------------------------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------------------------------


def active_edges(
    positions: jax.Array,
    senders: jax.Array,
    receivers: jax.Array,
    edge_mask: jax.Array,
    cutoff: float,
    max_neighbors: int,
) -> jax.Array:
    """Edges that the model uses for these positions: within the cutoff and the neighbour cap.

    The pipeline builds edges with a skin beyond the cutoff so the list stays valid after noise;
    here each edge is kept iff it is real, shorter than ``cutoff`` (self-loops always are), and
    among the first ``max_neighbors`` such edges of its receiver in sender-index order. That is
    the torch_cluster ``radius_graph(loop=True, max_num_neighbors=32)`` rule, self-loop counted.

    Args:
      positions: ``[N, 3]``.
      senders, receivers: ``[E]``, sorted by receiver then sender within each molecule.
      edge_mask: ``[E]`` bool.
      cutoff: Å.
      max_neighbors: cap per receiver, self-loop included.

    Returns:
      ``[E]`` bool mask.
    """
    vec = positions[senders] - positions[receivers]
    within = edge_mask & (jnp.sum(vec * vec, axis=-1) < cutoff * cutoff)
    # Rank of each valid edge among the valid edges of its receiver: a running count over the
    # (receiver-sorted) edge list minus the count before the receiver's first edge.
    n_node = positions.shape[0]
    count = jnp.cumsum(within.astype(jnp.int32))
    edge_index = jnp.arange(senders.shape[0])
    first = jax.ops.segment_min(edge_index, receivers, num_segments=n_node)[receivers]
    before = count[first] - within[first].astype(jnp.int32)
    rank = count - before  # 1-based rank for valid edges
    return within & (rank <= max_neighbors)
