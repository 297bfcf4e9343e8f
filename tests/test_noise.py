"""Tests for mspec/noise.py: exact parity of the torsion kernel with RDKit, noise statistics."""

import csv
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import rdMolTransforms

from data_pipelines import torsions as tor
from mspec import noise

# --------------------------------------------------------------------------------------------
# Fixtures: real QM9 molecules and a numpy packer to the mspec/types.py layout.

N_QM9 = 24  # molecules with at least one rotatable torsion used for the parity tests
_FIRST_ROW = 3000  # 7-heavy-atom region of QM9: several, often nested, torsions per molecule


def _parse_floats(text):
    # Fortran/Mathematica-style numbers ("0.", "-7.E-6") break json.loads
    # (docs/spec/data-notes.md §1).
    return np.array(
        [float(tok) for tok in text.replace("[", " ").replace("]", " ").replace(",", " ").split()]
    )


@functools.lru_cache(maxsize=None)
def _qm9_molecules():
    """The first N_QM9 QM9 molecules from row _FIRST_ROW on that have torsions.

    Returns a tuple of dicts with the RDKit mol (perceived from the xyz; its conformer holds the
    float64 CSV geometry), z [n], positions [n, 3] float64, torsions [T, 4], moving [T, n].
    """
    import qm9pack

    path = os.path.join(os.path.dirname(qm9pack.__file__), "data", "qm9_part1.csv")
    table = Chem.GetPeriodicTable()
    molecules = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.DictReader(f)):
            if n < _FIRST_ROW:
                continue
            symbols = [s.strip(" '\"") for s in row["Elements"].strip("[]").split(",")]
            z = np.array([table.GetAtomicNumber(s) for s in symbols], dtype=np.int32)
            pos = _parse_floats(row["XYZ_Ang"]).reshape(-1, 3)
            mol = tor.mol_from_xyz(z, pos, smiles=row["SMILES"])
            if mol is None:
                continue
            torsions = tor.find_torsions(mol)
            if len(torsions) == 0:
                continue
            molecules.append(
                dict(
                    index=int(row["Index"]),
                    mol=mol,
                    z=z,
                    positions=pos,
                    torsions=torsions,
                    moving=tor.moving_masks(mol, torsions),
                )
            )
            if len(molecules) == N_QM9:
                break
    assert len(molecules) == N_QM9
    return tuple(molecules)


def pack_batch(molecules, n_node, n_graph, max_torsions, dtype=np.float32):
    """Packs molecules into one device batch in the layout of mspec/types.py (numpy).

    Args:
        molecules: dicts with ``z [n]``, ``positions [n, 3]``, ``torsions [T_m, 4]`` (local atom
            indices) and ``moving [T_m, n]``.
        n_node, n_graph, max_torsions: static budgets N, G, T. The last node and graph slots must
            stay padding.

    Returns:
        dict of numpy arrays (the node/graph/torsion keys of mspec/types.py; no edges).
    """
    n_real = sum(len(m["z"]) for m in molecules)
    assert n_real < n_node and len(molecules) < n_graph
    batch = dict(
        atomic_numbers=np.zeros(n_node, np.int32),
        positions=np.zeros((n_node, 3), dtype),
        node_mask=np.zeros(n_node, bool),
        node_graph=np.full(n_node, n_graph - 1, np.int32),
        node_moving=np.zeros((n_node, max_torsions), bool),
        graph_mask=np.zeros(n_graph, bool),
        n_node=np.zeros(n_graph, np.int32),
        torsion_atoms=np.zeros((n_graph, max_torsions, 4), np.int32),
        torsion_mask=np.zeros((n_graph, max_torsions), bool),
    )
    offset = 0
    for g, m in enumerate(molecules):
        n, t = len(m["z"]), len(m["torsions"])
        assert t <= max_torsions
        sl = slice(offset, offset + n)
        batch["atomic_numbers"][sl] = m["z"]
        batch["positions"][sl] = m["positions"]
        batch["node_mask"][sl] = True
        batch["node_graph"][sl] = g
        batch["node_moving"][sl, :t] = np.asarray(m["moving"]).T
        batch["graph_mask"][g] = True
        batch["n_node"][g] = n
        batch["torsion_atoms"][g, :t] = np.asarray(m["torsions"]) + offset
        batch["torsion_mask"][g, :t] = True
        offset += n
    return batch


def _budgets(molecules):
    n = sum(len(m["z"]) for m in molecules) + 7  # a few padding atoms
    t = max(len(m["torsions"]) for m in molecules) + 1  # an all-padding torsion slot too
    return n, len(molecules) + 2, t  # one empty graph slot + the final padding slot


def _qm9_batch(dtype=np.float32):
    molecules = _qm9_molecules()
    return molecules, pack_batch(molecules, *_budgets(molecules), dtype=dtype)


def _rotate_args(batch):
    keys = ("positions", "node_graph", "torsion_atoms", "torsion_mask", "node_moving")
    return [jnp.asarray(batch[k]) for k in keys]


def _rdkit_reference(molecule, angles_deg):
    """RDKit's Frad loop: absolute SetDihedralDeg(original + eps_t), torsion by torsion."""
    conf = Chem.Conformer(molecule["mol"].GetConformer())
    originals = [rdMolTransforms.GetDihedralDeg(conf, *map(int, t)) for t in molecule["torsions"]]
    for t, (torsion, original) in enumerate(zip(molecule["torsions"], originals)):
        rdMolTransforms.SetDihedralDeg(conf, *map(int, torsion), original + float(angles_deg[t]))
    return conf.GetPositions()


def _draw_angles(batch, scale=60.0, seed=0):
    # Large angles (not Frad's 2 degrees) so that any error in the axis or sign is visible.
    return np.random.default_rng(seed).normal(0.0, scale, batch["torsion_mask"].shape)


def _max_deviation_vs_rdkit(dtype):
    molecules, batch = _qm9_batch(dtype)
    angles = _draw_angles(batch).astype(dtype)
    out = np.asarray(jax.jit(noise.rotate_torsions)(*_rotate_args(batch), jnp.asarray(angles)))
    assert out.dtype == dtype
    worst, offset = 0.0, 0
    for g, m in enumerate(molecules):
        n = len(m["z"])
        reference = _rdkit_reference(m, angles[g].astype(np.float64))
        worst = max(worst, float(np.abs(out[offset : offset + n] - reference).max()))
        offset += n
    # Padding rows untouched.
    np.testing.assert_array_equal(out[offset:], 0.0)
    return worst


# --------------------------------------------------------------------------------------------
# Parity with RDKit.


def test_rotate_torsions_matches_rdkit_float32():
    worst = _max_deviation_vs_rdkit(np.float32)
    print(f"max |dx| vs RDKit SetDihedralDeg, float32: {worst:.3e} A")
    assert worst < 1e-5


def test_rotate_torsions_matches_rdkit_float64():
    with jax.enable_x64(True):
        worst = _max_deviation_vs_rdkit(np.float64)
    print(f"max |dx| vs RDKit SetDihedralDeg, float64: {worst:.3e} A")
    assert worst < 1e-9


def test_qm9_parity_set_has_nested_torsions():
    """The parity set must exercise sequential composition: several torsions per molecule."""
    molecules = _qm9_molecules()
    assert sum(len(m["torsions"]) >= 2 for m in molecules) >= 10
    assert sum(len(m["torsions"]) >= 3 for m in molecules) >= 3


# --------------------------------------------------------------------------------------------
# Internal coordinates.


def _bond_angle_deg(p, a, b, c):
    u, v = p[a] - p[b], p[c] - p[b]
    cos = np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _dihedral_deg(mol, positions, torsion):
    conf = Chem.Conformer(mol.GetConformer())
    for idx, xyz in enumerate(np.asarray(positions, np.float64)):
        conf.SetAtomPosition(idx, xyz.tolist())
    return rdMolTransforms.GetDihedralDeg(conf, *map(int, torsion))


def _wrap(deg):
    return (deg + 180.0) % 360.0 - 180.0


@pytest.mark.parametrize("x64", [False, True])
def test_internal_coordinates(x64):
    """Bond lengths and bond angles are unchanged; every torsion moved by exactly its angle."""
    dtype = np.float64 if x64 else np.float32
    tol_len, tol_angle, tol_dihedral = (1e-12, 1e-9, 1e-9) if x64 else (1e-5, 1e-4, 1e-3)
    with jax.enable_x64(x64):
        molecules, batch = _qm9_batch(dtype)
        angles = _draw_angles(batch, seed=1).astype(dtype)
        out = np.asarray(noise.rotate_torsions(*_rotate_args(batch), jnp.asarray(angles)))
    clean = batch["positions"].astype(np.float64)
    out = out.astype(np.float64)
    offset = 0
    worst = dict(length=0.0, angle=0.0, dihedral=0.0)
    for g, m in enumerate(molecules):
        sl = slice(offset, offset + len(m["z"]))
        p0, p1 = clean[sl], out[sl]
        mol = m["mol"]
        for bond in mol.GetBonds():
            a, b = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
            d = abs(np.linalg.norm(p1[a] - p1[b]) - np.linalg.norm(p0[a] - p0[b]))
            worst["length"] = max(worst["length"], d)
            for nb in mol.GetAtomWithIdx(b).GetNeighbors():
                c = nb.GetIdx()
                if c != a:
                    d = abs(_bond_angle_deg(p1, a, b, c) - _bond_angle_deg(p0, a, b, c))
                    worst["angle"] = max(worst["angle"], d)
        for t, torsion in enumerate(m["torsions"]):
            shift = _dihedral_deg(mol, p1, torsion) - _dihedral_deg(mol, p0, torsion)
            worst["dihedral"] = max(worst["dihedral"], abs(_wrap(shift - float(angles[g, t]))))
        offset += len(m["z"])
    assert worst["length"] < tol_len, worst
    assert worst["angle"] < tol_angle, worst
    assert worst["dihedral"] < tol_dihedral, worst


def test_masked_slots_do_nothing():
    molecules, batch = _qm9_batch()
    args = _rotate_args(batch)
    angles = jnp.asarray(_draw_angles(batch), jnp.float32)
    # No real torsion: bit-identical output, whatever the angles and the padded atom indices.
    no_torsions = dict(batch, torsion_mask=np.zeros_like(batch["torsion_mask"]))
    out = noise.rotate_torsions(*_rotate_args(no_torsions), angles)
    np.testing.assert_array_equal(np.asarray(out), batch["positions"])
    # Masking graph 0's torsions only leaves graph 0's atoms exactly in place.
    partial = dict(batch, torsion_mask=batch["torsion_mask"].copy())
    partial["torsion_mask"][0] = False
    out = np.asarray(noise.rotate_torsions(*_rotate_args(partial), angles))
    full = np.asarray(noise.rotate_torsions(*args, angles))
    in_g0 = batch["node_graph"] == 0
    np.testing.assert_array_equal(out[in_g0], batch["positions"][in_g0])
    np.testing.assert_array_equal(out[~in_g0], full[~in_g0])


# --------------------------------------------------------------------------------------------
# Cartesian noise and the Frad composition.


def test_coord_noise_statistics_and_padding():
    n, n_real, tau = 4096, 4000, 0.04
    positions = jnp.asarray(np.random.default_rng(0).normal(size=(n, 3)), jnp.float32)
    positions = positions.at[n_real:].set(0.0)
    node_mask = jnp.arange(n) < n_real
    noisy, target = jax.jit(noise.coord_noise)(jax.random.key(0), positions, node_mask, tau)
    noisy, target = np.asarray(noisy), np.asarray(target)
    real = target[:n_real]
    assert abs(real.std() / tau - 1.0) < 0.03
    assert np.all(np.abs(real.mean(axis=0)) < 5 * tau / np.sqrt(n_real))
    # Padding: exactly +0.0 noise and untouched coordinates.
    np.testing.assert_array_equal(target[n_real:], 0.0)
    assert not np.any(np.signbit(target[n_real:]))
    np.testing.assert_array_equal(noisy[n_real:], 0.0)
    np.testing.assert_allclose(noisy - np.asarray(positions), target, atol=1e-6)


# One jitted instance shared by the tests, so each (shape, fractional) pair compiles once.
_frad_jit = jax.jit(noise.frad_noise, static_argnames="fractional")


def _frad_args(batch):
    keys = ("positions", "node_mask", "node_graph", "torsion_atoms", "torsion_mask", "node_moving")
    return [jnp.asarray(batch[k]) for k in keys]


def _mixed_batch():
    """QM9 molecules with torsions plus one (benzene-like) molecule without: Coord fallback."""
    molecules = list(_qm9_molecules()[:6])
    no_torsion = dict(molecules[0])
    no_torsion.update(
        torsions=np.zeros((0, 4), np.int32), moving=np.zeros((0, len(no_torsion["z"])), bool)
    )
    molecules.insert(2, no_torsion)
    n, _, t = _budgets(molecules)
    return molecules, pack_batch(molecules, n, len(molecules) + 1, t)


def test_frad_noise_targets():
    molecules, batch = _mixed_batch()
    args = _frad_args(batch)
    rng = jax.random.key(42)
    sigma, tau = 20.0, 0.04
    frad = _frad_jit
    noisy, target = map(np.asarray, frad(rng, *args, sigma, tau, fractional=True))
    noisy_nf, target_nf = map(np.asarray, frad(rng, *args, sigma, tau, fractional=False))
    clean = batch["positions"]

    # Same key -> same noisy input in both modes; only the regression target differs.
    np.testing.assert_array_equal(noisy, noisy_nf)
    # Fractional target = noisy - after-torsion (the documented key split).
    rng_torsion, _ = jax.random.split(rng)
    after = np.asarray(
        noise.apply_torsion_noise(rng_torsion, *[a for i, a in enumerate(args) if i != 1], sigma)
    )
    np.testing.assert_allclose(target, noisy - after, atol=1e-6)
    # Non-fractional target = noisy - clean.
    np.testing.assert_allclose(target_nf, noisy - clean, atol=1e-6)
    # Padding rows are exactly zero everywhere.
    pad = ~batch["node_mask"]
    for arr in (noisy, target, noisy_nf, target_nf):
        np.testing.assert_array_equal(arr[pad], 0.0)
    # Torsion displacement: zero for the no-torsion molecule (pure Coord noise), non-zero else.
    displacement = np.abs(after - clean).max(axis=1)
    for g, m in enumerate(molecules):
        in_g = batch["node_graph"] == g
        if len(m["torsions"]):
            assert displacement[in_g].max() > 1e-2
        else:
            np.testing.assert_array_equal(after[in_g], clean[in_g])
            np.testing.assert_allclose(target[in_g], target_nf[in_g], atol=1e-6)
    # The Cartesian part has std ~ tau over the real atoms (loose: only ~100 atoms).
    assert abs(target[~pad].std() / tau - 1.0) < 0.25


def test_frad_noise_determinism_and_device_vmap():
    _, batch = _mixed_batch()
    args = _frad_args(batch)
    frad = _frad_jit
    a = frad(jax.random.key(7), *args, 20.0, 0.04, fractional=True)
    b = frad(jax.random.key(7), *args, 20.0, 0.04, fractional=True)
    c = frad(jax.random.key(8), *args, 20.0, 0.04, fractional=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))

    # The train step vmaps over a leading device axis: stacked batches with per-device keys give
    # the same result as per-device calls.
    keys = jax.random.split(jax.random.key(3), 2)
    stacked = [jnp.stack([x, x]) for x in args]
    noisy, target = jax.jit(
        jax.vmap(lambda k, *xs: noise.frad_noise(k, *xs, 20.0, 0.04))
    )(keys, *stacked)
    for d in range(2):
        ref = frad(keys[d], *args, 20.0, 0.04, fractional=True)
        np.testing.assert_allclose(np.asarray(noisy[d]), np.asarray(ref[0]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(target[d]), np.asarray(ref[1]), atol=1e-6)


def _dihedral_np(p):
    """Dihedral angles in degrees of ``p [..., 4, 3]`` (atan2 form; sign convention irrelevant)."""
    b0 = p[..., 0, :] - p[..., 1, :]
    b1 = p[..., 2, :] - p[..., 1, :]
    b2 = p[..., 3, :] - p[..., 2, :]
    n1, n2 = np.cross(b0, b1), np.cross(b1, b2)
    m1 = np.cross(n1, b1 / np.linalg.norm(b1, axis=-1, keepdims=True))
    return np.degrees(np.arctan2((m1 * n2).sum(-1), (n1 * n2).sum(-1)))


def test_torsion_noise_angle_distribution():
    """Dihedral shifts drawn by apply_torsion_noise have mean 0 and std sigma."""
    _, batch = _qm9_batch()
    sigma, n_draws = 20.0, 256
    _, node_graph, torsion_atoms, torsion_mask, node_moving = _rotate_args(batch)
    positions = jnp.asarray(batch["positions"])
    draw = jax.jit(
        jax.vmap(
            lambda k: noise.apply_torsion_noise(
                k, positions, node_graph, torsion_atoms, torsion_mask, node_moving, sigma
            )
        )
    )
    samples = np.asarray(draw(jax.random.split(jax.random.key(0), n_draws)), np.float64)
    # Measure every real torsion's dihedral in every sample.
    idx = batch["torsion_atoms"][batch["torsion_mask"]]  # [n_torsions, 4]
    dihedral = _dihedral_np(samples[:, idx])  # [n_draws, n_torsions]
    dihedral0 = _dihedral_np(batch["positions"].astype(np.float64)[idx])  # [n_torsions]
    shifts = _wrap(dihedral - dihedral0).ravel()  # the sign is tested against RDKit above
    assert abs(shifts.mean()) < 4 * sigma / np.sqrt(shifts.size), shifts.mean()
    assert abs(shifts.std() / sigma - 1.0) < 0.05, shifts.std()
