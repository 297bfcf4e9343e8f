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
      ``(senders [e], receivers [e])`` int32, sorted by receiver then sender. Symmetric (every
      ``j -> i`` comes with its ``i -> j``), as :func:`pack` requires for its pair layout.
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

    @property
    def n_pair(self) -> int:
        """Slots for undirected atom pairs (each stored in both directions; see :func:`pack`)."""
        return num_pairs(self.n_edge, self.n_node)

    def fits(self, nodes: int, edges: int, graphs: int) -> bool:
        """Whether molecules with these totals fit (``edges`` counts both directions and the
        self-loops, as :func:`radius_graph` returns them: ``edges - nodes`` is twice the pairs)."""
        return (
            nodes <= self.n_node - 1
            and edges - nodes <= 2 * self.n_pair
            and graphs <= self.n_graph - 1
        )


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

    Node and pair budgets are ``slack`` times the expected totals (rounded up to a multiple of 8),
    but never below what the largest molecule needs, so every molecule fits on its own. Edge
    counts are as :func:`radius_graph` returns them (both directions plus self-loops), so
    ``edges - nodes`` is twice the number of pairs; ``n_edge = n_node + 2 * n_pair``.
    """

    def round8(x: float) -> int:
        return int(8 * math.ceil(x / 8))

    n_node = max(round8(molecules_per_device * mean_nodes * slack) + 1, max_nodes + 1)
    # A molecule with e edges has at least one atom (one self-loop): at most e - 1 pair edges.
    pair_edges = max(round8(molecules_per_device * (mean_edges - mean_nodes) * slack), max_edges - 1)
    n_edge = n_node + pair_edges + pair_edges % 2
    return Budget(
        n_node=n_node,
        n_edge=n_edge,
        n_graph=molecules_per_device + 1,
        max_torsions=max(1, max_torsions),
        spectra=tuple(spectra),
    )


def pack(molecules: Sequence[Mapping[str, np.ndarray]], budget: Budget) -> dict[str, np.ndarray]:
    """Packs molecules into one padded device batch (layout of :mod:`mspec.types`).

    Edges go into the pair layout (see :func:`num_pairs`): with ``P = budget.n_pair``, slots
    ``[0, P)`` hold each undirected pair once as ``(j -> i)`` with ``j < i``, slots ``[P, 2P)`` the
    same pairs reversed, in the same order, and the last ``N`` slots the self-loop of every node
    slot (masked for padding nodes). The model computes its distance filters once per pair.

    Args:
      molecules: each a mapping with ``atomic_numbers [n]``, ``positions [n, 3]``,
        ``senders [e]``, ``receivers [e]`` (molecule-local indices; a symmetric edge list with one
        self-loop per atom, as :func:`radius_graph` returns), ``torsions [t, 4]`` and
        ``moving [t, n]``; plus ``spectra: {name: [length]}`` for every spectrum in
        ``budget.spectra``.
      budget: the static shapes; the molecules must fit (see :meth:`Budget.fits`).

    Returns:
      A dict of numpy arrays with the shapes of :mod:`mspec.types`.

    Raises:
      ValueError: a molecule does not fit, or its edge list is not symmetric with self-loops.
    """
    N, E, G, T = budget.n_node, budget.n_edge, budget.n_graph, budget.max_torsions
    P = budget.n_pair
    self_start = E - N
    batch = {
        "atomic_numbers": np.zeros(N, np.int32),
        "positions": np.zeros((N, 3), np.float32),
        "node_mask": np.zeros(N, bool),
        "node_graph": np.full(N, G - 1, np.int32),
        "node_moving": np.zeros((N, T), bool),
        # Padding pair slots are self-loops on the last (always padding) node; the self-loop
        # section holds node k's self-loop at slot E - N + k.
        "senders": np.full(E, N - 1, np.int32),
        "receivers": np.full(E, N - 1, np.int32),
        "edge_mask": np.zeros(E, bool),
        "graph_mask": np.zeros(G, bool),
        "n_node": np.zeros(G, np.int32),
        "torsion_atoms": np.zeros((G, T, 4), np.int32),
        "torsion_mask": np.zeros((G, T), bool),
        # Marks the pair layout of the edges (the model shares distance filters only then).
        "pair_layout": np.array(True),
    }
    for name, length in budget.spectra:
        batch[spectrum_key(name)] = np.zeros((G, length), np.float32)
    batch["senders"][self_start:] = np.arange(N, dtype=np.int32)
    batch["receivers"][self_start:] = np.arange(N, dtype=np.int32)
    node, edge, pair = 0, 0, 0
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
        lo, hi = _pair_halves(np.asarray(mol["senders"]), np.asarray(mol["receivers"]), n, g)
        p = len(lo)
        for start, snd, rcv in ((pair, lo, hi), (P + pair, hi, lo)):
            batch["senders"][start : start + p] = snd + node
            batch["receivers"][start : start + p] = rcv + node
            batch["edge_mask"][start : start + p] = True
        batch["edge_mask"][self_start + node : self_start + node + n] = True
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
        pair += p
    return batch


def _pair_halves(senders: np.ndarray, receivers: np.ndarray, n: int, g: int):
    """One molecule's undirected pairs ``(lo [p], hi [p])`` with ``lo < hi``, checking that the
    edge list holds each pair in both directions and exactly one self-loop per atom."""
    loops = senders == receivers
    if loops.sum() != n or not np.array_equal(np.sort(senders[loops]), np.arange(n)):
        raise ValueError(
            f"molecule {g}: the edge list must hold exactly one self-loop per atom ({n} atoms, "
            f"{int(loops.sum())} self-loops); build it with mspec.graph.radius_graph"
        )
    up, down = senders < receivers, senders > receivers
    lo, hi = senders[up], receivers[up]
    key = lambda a, b: np.sort(a.astype(np.int64) * n + b)
    if up.sum() != down.sum() or not np.array_equal(key(lo, hi), key(receivers[down], senders[down])):
        raise ValueError(
            f"molecule {g}: the edge list is not symmetric (every j -> i needs its i -> j); build "
            "it with mspec.graph.radius_graph"
        )
    return lo, hi


def spectrum_key(name: str) -> str:
    """Batch key of the per-molecule spectrum ``name`` (``[G, L]``, zeros in padding slots)."""
    return f"spectrum_{name}"


def stack(device_batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks per-device batches on a leading device axis ``[D, ...]``."""
    return {k: np.stack([b[k] for b in device_batches]) for k in device_batches[0]}


# --------------------------------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------------------------------


def num_pairs(n_edge: int, n_node: int) -> int:
    """Pair slots ``P`` of the edge layout that :func:`pack` writes for these static sizes.

    Edge slots ``[0, P)`` hold undirected pairs, ``[P, 2P)`` the same pairs reversed (slot
    ``P + p`` is slot ``p`` with sender and receiver swapped), ``[n_edge - n_node, n_edge)`` the
    self-loops of node slots ``0 .. n_node - 1``; when ``n_edge - n_node`` is odd, slot ``2P`` is
    padding. Both directions of a pair have the same length, so distance filters are computed
    once per pair (see :func:`pair_filter_rows`).
    """
    if n_edge < n_node:
        raise ValueError(f"n_edge={n_edge} is smaller than n_node={n_node}: no room for self-loops")
    return (n_edge - n_node) // 2


def pair_filter_rows(n_edge: int, n_node: int) -> np.ndarray:
    """``[E] int32``: the distance-filter row of each edge slot in the :func:`pack` layout.

    Row ``p < P`` serves pair slot ``p`` in both directions; row ``P`` serves every self-loop and
    spare slot (their length is 0, so their filters are all the same). ``P + 1`` rows in all.
    """
    p = num_pairs(n_edge, n_node)
    slots = np.arange(n_edge, dtype=np.int32)
    return np.where(slots < p, slots, np.where(slots < 2 * p, slots - p, p)).astype(np.int32)


def pair_rows(edge_values: jax.Array, n_node: int) -> jax.Array:
    """Per-edge values (equal in both directions of a pair) -> one row per filter row.

    Args:
      edge_values: ``[E, ...]`` in the :func:`pack` layout, e.g. edge lengths.
      n_node: N.

    Returns:
      ``[P + 1, ...]``: the pair slots, then the first self-loop slot's value.
    """
    e = edge_values.shape[0]
    p = num_pairs(e, n_node)
    return jnp.concatenate([edge_values[:p], edge_values[e - n_node : e - n_node + 1]])


def expand_pair_rows(rows: jax.Array, n_edge: int) -> jax.Array:
    """Inverse of :func:`pair_rows`: ``[P + 1, ...]`` filter rows -> ``[E, ...]`` per edge slot."""
    p = rows.shape[0] - 1
    rest = jnp.broadcast_to(rows[p:], (n_edge - 2 * p, *rows.shape[1:]))
    return jnp.concatenate([rows[:p], rows[:p], rest])


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
    The cap may keep ``j -> i`` and drop ``i -> j``.

    Args:
      positions: ``[N, 3]``.
      senders, receivers: ``[E]``, in any order (a node's sender index order within a molecule
        is its atom order, as :func:`pack` lays molecules out contiguously).
      edge_mask: ``[E]`` bool.
      cutoff: Å.
      max_neighbors: cap per receiver, self-loop included.

    Returns:
      ``[E]`` bool mask.
    """
    vec = positions[senders] - positions[receivers]
    within = edge_mask & (jnp.sum(vec * vec, axis=-1) < cutoff * cutoff)
    # Rank of each valid edge among the valid edges of its receiver: sort by (receiver, sender),
    # take a running count minus the count before the receiver's first edge, and scatter back.
    n_node = positions.shape[0]
    order = jnp.lexsort((senders, receivers))  # [E]
    within_sorted = within[order]
    receivers_sorted = receivers[order]
    count = jnp.cumsum(within_sorted.astype(jnp.int32))
    slot = jnp.arange(senders.shape[0])
    first = jax.ops.segment_min(slot, receivers_sorted, num_segments=n_node)[receivers_sorted]
    before = count[first] - within_sorted[first].astype(jnp.int32)
    keep_sorted = within_sorted & (count - before <= max_neighbors)  # 1-based rank
    return jnp.zeros_like(within).at[order].set(keep_sorted, unique_indices=True)
