"""Neighbour lists, packing into static budgets, and the in-step cutoff / neighbour cap."""

import jax.numpy as jnp
import numpy as np
import pytest

from mspec import graph


def _random_molecule(rng, n, box=4.0):
    return rng.uniform(0, box, size=(n, 3)).astype(np.float32)


def test_radius_graph_matches_brute_force_and_is_sorted():
    rng = np.random.default_rng(0)
    pos = _random_molecule(rng, 12, box=8.0)
    senders, receivers = graph.radius_graph(pos, 5.0)
    expected = {(j, i) for i in range(12) for j in range(12) if np.linalg.norm(pos[j] - pos[i]) < 5.0}
    assert set(zip(senders.tolist(), receivers.tolist())) == expected
    assert all((i, i) in expected for i in range(12))  # self-loops included
    order = np.lexsort((senders, receivers))
    np.testing.assert_array_equal(order, np.arange(len(senders)))


def _mol(rng, n):
    pos = _random_molecule(rng, n)
    s, r = graph.radius_graph(pos, 5.5)
    return {
        "atomic_numbers": rng.integers(1, 10, n).astype(np.int32),
        "positions": pos,
        "senders": s,
        "receivers": r,
        "torsions": np.array([[0, 1, 2, 3]], np.int32) if n >= 4 else np.zeros((0, 4), np.int32),
        "moving": (np.arange(n) >= 2)[None] if n >= 4 else np.zeros((0, n), bool),
    }


def test_pack_layout_and_masks():
    rng = np.random.default_rng(1)
    mols = [_mol(rng, 5), _mol(rng, 3), _mol(rng, 7)]
    budget = graph.Budget(n_node=20, n_edge=120, n_graph=5, max_torsions=2)
    b = graph.pack(mols, budget)
    assert b["positions"].shape == (20, 3) and b["senders"].shape == (120,)
    assert b["node_mask"].sum() == 15 and b["graph_mask"].tolist() == [True] * 3 + [False] * 2
    np.testing.assert_array_equal(b["n_node"], [5, 3, 7, 0, 0])
    np.testing.assert_array_equal(b["node_graph"][:15], [0] * 5 + [1] * 3 + [2] * 7)
    assert (b["node_graph"][15:] == 4).all()  # padding atoms belong to the last (padding) graph
    # Pair layout: [P pairs j < i | the same pairs reversed | one self-loop per node slot].
    P = budget.n_pair
    assert P == (120 - 20) // 2 and b["pair_layout"]
    snd, rcv, m = b["senders"], b["receivers"], b["edge_mask"]
    n_pairs = sum((len(x["senders"]) - len(x["atomic_numbers"])) // 2 for x in mols)
    assert m[:P].sum() == n_pairs and m[:n_pairs].all() and (snd[:n_pairs] < rcv[:n_pairs]).all()
    np.testing.assert_array_equal(snd[P : 2 * P], rcv[:P])
    np.testing.assert_array_equal(rcv[P : 2 * P], snd[:P])
    np.testing.assert_array_equal(m[P : 2 * P], m[:P])
    np.testing.assert_array_equal(snd[100:], np.arange(20))
    np.testing.assert_array_equal(rcv[100:], np.arange(20))
    np.testing.assert_array_equal(m[100:], b["node_mask"])
    # Same directed edges as the molecules' lists, offset by each molecule's first node.
    offsets = [0, 5, 8]
    expected = {
        (int(j) + o, int(i) + o)
        for x, o in zip(mols, offsets)
        for j, i in zip(x["senders"], x["receivers"])
    }
    got = list(zip(snd[m].tolist(), rcv[m].tolist()))
    assert len(got) == len(expected) and set(got) == expected
    assert ((snd[~m] == rcv[~m])).all()  # padding slots are self-loops
    # Torsions are in batch node indices; the moving mask is per node.
    np.testing.assert_array_equal(b["torsion_atoms"][2, 0], [8, 9, 10, 11])
    assert b["torsion_mask"][:, 0].tolist() == [True, False, True, False, False]
    assert b["node_moving"][10:15, 0].all() and not b["node_moving"][8:10, 0].any()


def test_pack_rejects_asymmetric_edges_and_missing_self_loops():
    rng = np.random.default_rng(4)
    budget = graph.Budget(n_node=20, n_edge=120, n_graph=5, max_torsions=2)
    mol = _mol(rng, 5)
    one_way = dict(mol)
    drop = int(np.flatnonzero(mol["senders"] != mol["receivers"])[0])
    one_way["senders"] = np.delete(mol["senders"], drop)
    one_way["receivers"] = np.delete(mol["receivers"], drop)
    with pytest.raises(ValueError, match="molecule 1: the edge list is not symmetric"):
        graph.pack([mol, one_way], budget)
    no_loops = dict(mol)
    keep = mol["senders"] != mol["receivers"]
    no_loops["senders"], no_loops["receivers"] = mol["senders"][keep], mol["receivers"][keep]
    with pytest.raises(ValueError, match="molecule 0: the edge list must hold exactly one self-loop"):
        graph.pack([no_loops], budget)


@pytest.mark.parametrize("n_edge", [60, 61])
def test_pair_filter_rows_and_their_expansion(n_edge):
    n_node = 10
    p = graph.num_pairs(n_edge, n_node)
    rows = graph.pair_filter_rows(n_edge, n_node)
    assert rows.shape == (n_edge,) and rows.max() == p
    np.testing.assert_array_equal(rows[:p], np.arange(p))
    np.testing.assert_array_equal(rows[p : 2 * p], np.arange(p))
    assert (rows[2 * p :] == p).all()
    values = jnp.arange(p + 1, dtype=jnp.float32)[:, None] * jnp.ones((1, 2))
    np.testing.assert_array_equal(graph.expand_pair_rows(values, n_edge), np.asarray(values)[rows])
    per_edge = graph.expand_pair_rows(values, n_edge)
    np.testing.assert_array_equal(graph.pair_rows(per_edge, n_node), values)


def test_pack_rejects_overflow_and_too_many_torsions():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="does not fit"):
        graph.pack([_mol(rng, 8)], graph.Budget(n_node=8, n_edge=100, n_graph=2, max_torsions=1))
    with pytest.raises(ValueError, match="max_torsions"):
        graph.pack([_mol(rng, 5)], graph.Budget(n_node=8, n_edge=100, n_graph=2, max_torsions=0))


def _reference_active(pos, senders, receivers, edge_mask, cutoff, cap):
    """torch_cluster rule: per receiver, keep the first `cap` within-cutoff senders by index."""
    keep = np.zeros(len(senders), bool)
    counts = {}
    for e in np.lexsort((senders, receivers)):  # by receiver, then sender index
        s, r = senders[e], receivers[e]
        if edge_mask[e] and np.linalg.norm(pos[s] - pos[r]) < cutoff:
            counts[r] = counts.get(r, 0) + 1
            keep[e] = counts[r] <= cap
    return keep


@pytest.mark.parametrize("cap", [3, 32])
def test_active_edges_applies_cutoff_and_neighbour_cap(cap):
    rng = np.random.default_rng(3)
    mols = [_mol(rng, 9), _mol(rng, 11)]
    budget = graph.Budget(n_node=24, n_edge=260, n_graph=3, max_torsions=1)
    b = graph.pack(mols, budget)
    # Move atoms so that some skin edges exceed the 5 Å cutoff.
    pos = b["positions"] + rng.normal(0, 0.3, b["positions"].shape).astype(np.float32)
    got = graph.active_edges(
        jnp.asarray(pos), jnp.asarray(b["senders"]), jnp.asarray(b["receivers"]),
        jnp.asarray(b["edge_mask"]), 4.0, cap,
    )
    ref = _reference_active(pos, b["senders"], b["receivers"], b["edge_mask"], 4.0, cap)
    np.testing.assert_array_equal(np.asarray(got), ref)
    assert ref.sum() < b["edge_mask"].sum()  # the test exercises dropped edges


def test_budget_from_stats_fits_largest_molecule():
    b = graph.budget_from_stats(18.0, 300.0, 29, 841, 8, molecules_per_device=4, slack=1.1)
    assert b.n_graph == 5 and b.max_torsions == 8
    assert b.fits(29, 841, 1)
    assert b.n_node >= 4 * 18 * 1.1
    assert b.n_edge == b.n_node + 2 * b.n_pair
    assert b.n_pair >= 4 * (300 - 18) / 2 * 1.1 and b.n_pair >= (841 - 1) // 2
