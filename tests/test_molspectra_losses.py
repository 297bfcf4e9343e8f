"""MolSpectra losses: masked-patch MSE, InfoNCE and retrieval against direct numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mspec import losses


def _np_cos(a, b):
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
    return a @ b.T


def _np_info_nce(mol, spec, tau):
    """L = (1/B) sum_i [-c_ii / tau + log sum_j exp(c_ij / tau)], written out with loops."""
    c = _np_cos(mol.astype(np.float64), spec.astype(np.float64)) / tau
    b = len(mol)
    return sum(-c[i, i] + np.log(sum(np.exp(c[i, j]) for j in range(b))) for i in range(b)) / b


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)


def test_masked_patch_mse_matches_numpy_and_ignores_unmasked_patches():
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)  # [D, G, n, P]
    target = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    mask = rng.random((2, 3, 5)) < 0.4
    gm = np.array([[True, True, False], [True, False, False]])
    w = mask & gm[..., None]
    expected = sum(np.mean((pred[i] - target[i]) ** 2) for i in zip(*np.nonzero(w))) / w.sum()
    got = losses.masked_patch_mse(pred, target, mask, gm)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Changing unmasked predictions, or anything in padding slots, does not change the loss.
    pred2 = np.where(w[..., None], pred, 1e3)
    assert float(losses.masked_patch_mse(pred2, target, mask, gm)) == pytest.approx(
        float(got), rel=1e-6
    )
    # Its gradient is zero on every unmasked / padding patch.
    g = jax.grad(losses.masked_patch_mse)(jnp.asarray(pred), target, mask, gm)
    assert np.all(np.asarray(g)[~w] == 0) and np.any(np.asarray(g)[w] != 0)
    assert float(losses.masked_patch_mse(pred, target, np.zeros_like(mask), gm)) == 0.0


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_info_nce_matches_the_formula(pair, tau):
    mol, spec = pair
    gm = np.ones(6, bool)
    got = losses.info_nce(mol, spec, gm, temperature=tau)
    assert float(got) == pytest.approx(_np_info_nce(mol, spec, tau), rel=1e-5)
    sym = losses.info_nce(mol, spec, gm, temperature=tau, symmetric=True)
    expected_sym = 0.5 * (_np_info_nce(mol, spec, tau) + _np_info_nce(spec, mol, tau))
    assert float(sym) == pytest.approx(expected_sym, rel=1e-5)


def test_info_nce_is_invariant_to_padding_slots(pair):
    mol, spec = pair
    ref = float(losses.info_nce(mol, spec, np.ones(6, bool)))
    # Interleave padding slots (zero structure feature as the model emits, arbitrary spectrum
    # embedding) and split into a device axis [2, 5, D].
    junk = np.random.default_rng(5).normal(size=(4, 8)).astype(np.float32) * 100
    mol_p = np.concatenate([mol[:3], np.zeros((2, 8)), mol[3:], np.zeros((2, 8))]).reshape(2, 5, 8)
    spec_p = np.concatenate([spec[:3], junk[:2], spec[3:], junk[2:]]).reshape(2, 5, 8)
    gm = np.array([1, 1, 1, 0, 0, 1, 1, 1, 0, 0], bool).reshape(2, 5)
    for symmetric in (False, True):
        ref = float(losses.info_nce(mol, spec, np.ones(6, bool), symmetric=symmetric))
        got = losses.info_nce(mol_p, spec_p, gm, symmetric=symmetric)
        assert float(got) == pytest.approx(ref, rel=1e-6)
    grads = jax.grad(losses.info_nce, argnums=(0, 1))(jnp.asarray(mol_p), jnp.asarray(spec_p), gm)
    for g in grads:
        assert np.all(np.isfinite(g))
        assert np.all(np.asarray(g)[~gm] == 0)


def test_contrastive_gradient_pulls_the_positive_pair_together():
    """Toy pair: a gradient step raises c_ii and lowers c_ij (the loss falls)."""
    mol = jnp.array([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3]])
    spec = jnp.array(
        [[0.3, 1.0, 0.0], [1.0, 0.0, 0.2]]
    )  # each spectrum closer to the *other* molecule
    gm = jnp.ones(2, bool)
    g = jax.grad(losses.info_nce)(mol, spec, gm)
    cos = lambda m: np.asarray(losses.cosine_similarity_matrix(m, spec))
    moved = mol - 0.05 * g
    before, after = cos(mol), cos(moved)
    assert np.all(np.diag(after) > np.diag(before))
    off = ~np.eye(2, dtype=bool)
    assert np.all(after[off] < before[off])
    assert float(losses.info_nce(moved, spec, gm)) < float(losses.info_nce(mol, spec, gm))
    # The learnable temperature: a perfectly aligned batch prefers a smaller temperature.
    aligned = jnp.eye(3)
    dtau = jax.grad(lambda t: losses.info_nce(aligned, aligned, jnp.ones(3, bool), temperature=t))(
        0.5
    )
    assert float(dtau) > 0


def test_retrieval_hits_match_numpy():
    rng = np.random.default_rng(3)
    mol = rng.normal(size=(2, 6, 4)).astype(np.float32)
    spec = mol + 0.8 * rng.normal(size=(2, 6, 4)).astype(np.float32)
    gm = rng.random((2, 6)) < 0.8
    hits = losses.retrieval_hits(mol, spec, gm, ks=(1, 3))
    m, s, v = mol.reshape(12, 4), spec.reshape(12, 4), gm.reshape(12)
    real = np.nonzero(v)[0]
    c = _np_cos(m[real], s[real])
    for k in (1, 3):
        ranks = np.argsort(-c, axis=1)[:, :k]
        expected = np.zeros(12, bool)
        expected[real] = [i in ranks[i] for i in range(len(real))]
        np.testing.assert_array_equal(np.asarray(hits[k]), expected)
