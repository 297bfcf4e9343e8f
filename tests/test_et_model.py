"""Tests of the ET encoder, its heads and the full per-device model (mspec.models).

Everything runs on small models (F=32, 2 layers, 4 heads, 8 RBFs) except the parameter counts,
which only trace ``init`` with ``jax.eval_shape``.
"""

from __future__ import annotations

import math

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mspec.models import EquivariantTransformer, Model, count_params
from mspec.models import et as et_lib
from mspec.models.heads import GatedEquivariantBlock, safe_norm

SMALL = dict(hidden=32, num_layers=2, num_heads=4, num_rbf=8)
CUTOFF = 5.0


# -------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------


def random_molecule(seed: int, n_atoms: int = 8, box: float = 2.2) -> tuple[np.ndarray, np.ndarray]:
    """A generic (non-planar, no symmetry) molecule: ``(atomic_numbers [n], positions [n, 3])``."""
    rng = np.random.default_rng(seed)
    pos: list[np.ndarray] = []
    while len(pos) < n_atoms:
        p = rng.uniform(-box, box, 3)
        if all(np.linalg.norm(p - q) > 0.9 for q in pos):
            pos.append(p)
    z = rng.choice([1, 6, 7, 8, 9], n_atoms).astype(np.int32)
    return z, np.asarray(pos, np.float32)


def build_batch(
    molecules, *, n_pad_nodes: int = 0, n_pad_edges: int = 0, edge_radius: float = CUTOFF
) -> dict:
    """Pack molecules into one device batch (mspec.types layout, model keys only).

    Edges are every ordered pair (j -> i) within ``edge_radius`` in a molecule, self-loops
    included, sorted by receiver then sender. Padding atoms have Z=0, position 0 and mask False;
    padding edges are masked self-loops on the last padding atom.
    """
    zs, poss, senders, receivers = [], [], [], []
    offset = 0
    for z, pos in molecules:
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        recv, send = np.nonzero(d < edge_radius)  # row-major: sorted by receiver, then sender
        senders.append(send + offset)
        receivers.append(recv + offset)
        zs.append(z)
        poss.append(pos)
        offset += len(z)
    n_real, e_real = offset, sum(len(s) for s in senders)
    pad_atom = n_real + n_pad_nodes - 1
    batch = dict(
        atomic_numbers=np.concatenate(zs + [np.zeros(n_pad_nodes, np.int32)]),
        positions=np.concatenate(poss + [np.zeros((n_pad_nodes, 3), np.float32)]),
        node_mask=np.arange(n_real + n_pad_nodes) < n_real,
        senders=np.concatenate(senders + [np.full(n_pad_edges, pad_atom)]).astype(np.int32),
        receivers=np.concatenate(receivers + [np.full(n_pad_edges, pad_atom)]).astype(np.int32),
        edge_mask=np.arange(e_real + n_pad_edges) < e_real,
    )
    return {k: jnp.asarray(v) for k, v in batch.items()}


def perturb(params, seed: int = 0, scale: float = 0.1):
    """Add noise to every parameter so that biases are non-zero (zero biases hide masking bugs:
    SiLU(0) = 0 would silence dk / dv for a zero RBF even without the mask)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def rel_err(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def rotate_vectors(rot, y):
    """Apply ``rot [3, 3]`` to ``[N, 3]`` or ``[N, 3, F]`` outputs."""
    return y @ rot.T if y.ndim == 2 else jnp.einsum("ij,njf->nif", rot, y)


@pytest.fixture(scope="module")
def small_model():
    """A small affine (MolSpectra) model with perturbed params and a jitted apply."""
    model = Model(**SMALL, interlayer_norm="affine")
    batch = build_batch([random_molecule(0), random_molecule(1, 5)])
    params = perturb(model.init(jax.random.key(0), batch))
    return model, params, jax.jit(model.apply)


# -------------------------------------------------------------------------------------------------
# Sizes, options, initialisation
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(hidden=256, num_layers=8, num_heads=8, num_rbf=64, interlayer_norm="affine"), 7_216_388),
        (dict(hidden=128, num_layers=6, num_heads=8, num_rbf=32, interlayer_norm="none"), 1_426_564),
        (dict(hidden=256, num_layers=8, num_heads=8, num_rbf=64, interlayer_norm="shared_noaffine"), 7_212_292),
    ],
)
def test_parameter_counts(kwargs, expected):
    batch = build_batch([random_molecule(0, 3)])
    params = jax.eval_shape(Model(**kwargs, heads=("scalar", "noise")).init, jax.random.key(0), batch)
    n = count_params(params)
    print(f"{kwargs['interlayer_norm']}: {n:,} parameters")
    assert n == expected


def test_unknown_options_raise():
    batch = build_batch([random_molecule(0, 3)])
    for kwargs, word in [
        (dict(interlayer_norm="frad"), "interlayer_norm"),
        (dict(vector_norm="l2"), "vector_norm"),
        (dict(heads=("scalar", "dipole")), "heads"),
    ]:
        with pytest.raises(ValueError, match=word):
            jax.eval_shape(Model(**SMALL, **kwargs).init, jax.random.key(0), batch)


def test_initialisation_matches_torch():
    """Xavier-uniform kernels, zero biases, N(0, 1) embeddings, unit LayerNorm / EqLN weights."""
    batch = build_batch([random_molecule(0, 3)])
    params = Model(**SMALL, interlayer_norm="affine").init(jax.random.key(0), batch)["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    seen = set()
    for path, x in flat:
        names = [p.key for p in path]
        leaf = names[-1]
        seen.add(leaf)
        if leaf == "kernel":
            fan_in, fan_out = x.shape
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            assert float(jnp.max(jnp.abs(x))) <= limit, names
            if x.size >= 1000:  # U(-a, a) has std a / sqrt(3)
                assert abs(float(jnp.std(x)) / (limit / math.sqrt(3)) - 1) < 0.1, names
        elif leaf == "bias":
            assert float(jnp.max(jnp.abs(x))) == 0.0, names
        elif leaf in ("scale", "weight"):  # LayerNorm scale, EqLN weight
            assert bool(jnp.all(x == 1.0)), names
        elif leaf == "embedding":
            assert x.shape == (100, SMALL["hidden"])
            assert abs(float(jnp.std(x)) - 1.0) < 0.1 and abs(float(jnp.mean(x))) < 0.1
        else:
            raise AssertionError(f"unexpected parameter {names}")
    assert seen == {"kernel", "bias", "scale", "weight", "embedding"}


def test_output_keys_and_shapes():
    batch = build_batch([random_molecule(0, 4)], n_pad_nodes=1, n_pad_edges=1)
    n, f = batch["atomic_numbers"].shape[0], SMALL["hidden"]
    for heads, keys in [((), set()), (("scalar",), {"scalar"}), (("noise",), {"noise"})]:
        out = jax.eval_shape(
            lambda b: Model(**SMALL, heads=heads).init_with_output(jax.random.key(0), b)[0], batch
        )
        assert set(out) == {"node_features", "vectors"} | keys
        assert out["node_features"].shape == (n, f) and out["vectors"].shape == (n, 3, f)
        if "scalar" in keys:
            assert out["scalar"].shape == (n,)
        if "noise" in keys:
            assert out["noise"].shape == (n, 3)


# -------------------------------------------------------------------------------------------------
# Radial features
# -------------------------------------------------------------------------------------------------


def test_rbf_constants_and_cutoff():
    for k, beta in [(64, 1037.94), (32, 259.485)]:
        means, betas, alpha = et_lib.expnorm_rbf_params(k, CUTOFF)
        np.testing.assert_allclose(np.asarray(betas), beta, rtol=1e-5)
        np.testing.assert_allclose(float(means[0]), math.exp(-5.0), rtol=1e-6)
        np.testing.assert_allclose(float(means[-1]), 1.0, rtol=1e-6)
        assert alpha == 1.0

    r = jnp.array([0.0, 1.25, 2.5, 4.999, 5.0, 6.0])
    np.testing.assert_allclose(
        np.asarray(et_lib.cosine_cutoff(r, CUTOFF)),
        [1.0, 0.5 * (math.cos(math.pi / 4) + 1), 0.5, 0.5 * (math.cos(math.pi * 4.999 / 5) + 1), 0.0, 0.0],
        atol=1e-7,
    )

    # f_k(r) against a float64 numpy reference; zero beyond the cutoff; r = 0 peaks last.
    r = np.array([0.0, 0.7, 1.5, 3.3, 4.9, 5.2])
    mu = np.linspace(math.exp(-5.0), 1.0, 32)
    c = np.where(r < 5.0, 0.5 * (np.cos(np.pi * r / 5.0) + 1.0), 0.0)
    ref = c[:, None] * np.exp(-259.485 * (np.exp(-r)[:, None] - mu) ** 2)
    got = np.asarray(et_lib.expnorm_rbf(jnp.asarray(r, jnp.float32), 32, CUTOFF))
    np.testing.assert_allclose(got, ref, atol=2e-5)
    assert np.all(got[-1] == 0.0) and np.argmax(got[0]) == 31


def test_edge_geometry_self_loops_have_finite_gradients():
    pos = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    senders, receivers = jnp.array([0, 1, 1]), jnp.array([0, 0, 1])

    def f(p):
        r, unit, _ = et_lib.edge_geometry(p, senders, receivers)
        return jnp.sum(r) + jnp.sum(unit), (r, unit)

    g, (r, unit) = jax.grad(f, has_aux=True)(pos)
    np.testing.assert_allclose(np.asarray(r), [0.0, 3.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(unit[1]), [1 / 3, 2 / 3, 2 / 3], atol=1e-6)  # pos_j - pos_i
    assert np.all(np.asarray(unit[0]) == 0) and np.all(np.asarray(unit[2]) == 0)
    assert np.all(np.isfinite(np.asarray(g)))


# -------------------------------------------------------------------------------------------------
# Equivariant layer norm and gated block
# -------------------------------------------------------------------------------------------------


def _eqln_reference(v, weight):
    """Plain-autodiff reference of the whitened EqLN (eigh gradient, no custom JVP)."""
    v = v - v.mean(-1, keepdims=True)
    cov = jnp.einsum("nif,njf->nij", v, v) / v.shape[-1] + 1e-5 * jnp.diag(jnp.array([1.0, 2.0, 3.0]))
    w, q = jnp.linalg.eigh(cov)
    inv = jnp.einsum("nik,nk,njk->nij", q, 1.0 / jnp.sqrt(w + 1e-5), q)
    return jnp.einsum("nij,njf->nif", inv, v) * weight


def test_equivariant_layer_norm():
    f = 32
    ln = et_lib.EquivariantLayerNorm()
    v = jax.random.normal(jax.random.key(0), (6, 3, f))
    v = v.at[-1].set(0.0)  # a padding atom
    params = {"params": {"weight": jnp.full((f,), 1.5)}}
    out = ln.apply(params, v)

    # Equivariance: the lab-frame diag(1, 2, 3) regulariser limits it to O(1e-5 / lambda).
    rot = e3nn.rand_matrix(jax.random.key(1), ())
    assert rel_err(ln.apply(params, rotate_vectors(rot, v)), rotate_vectors(rot, out)) < 1e-4

    # Whitening: the output covariance is weight^2 * identity; padding stays exactly 0.
    cov = jnp.einsum("nif,njf->nij", out, out) / f
    np.testing.assert_allclose(np.asarray(cov[:-1]), np.broadcast_to(2.25 * np.eye(3), (5, 3, 3)), atol=1e-3)
    assert np.all(np.asarray(out[-1]) == 0.0)

    # Forward and gradient agree with plain autodiff through eigh (non-degenerate case), and
    # the gradient at the all-zero padding row is finite.
    t = jax.random.normal(jax.random.key(2), v.shape)
    loss = lambda fn: (lambda x: jnp.sum(fn(x) * t))  # noqa: E731
    np.testing.assert_allclose(np.asarray(out), np.asarray(_eqln_reference(v, 1.5)), atol=1e-5)
    g = jax.grad(loss(lambda x: ln.apply(params, x)))(v)
    g_ref = jax.grad(loss(lambda x: _eqln_reference(x, 1.5)))(v)
    assert np.all(np.isfinite(np.asarray(g)))
    assert rel_err(g, g_ref) < 1e-4

    # Exactly degenerate covariance (isotropic V, regulariser removed): the eigenvector gradient
    # of eigh has 1 / (w_a - w_b) terms, the Daleckii-Krein JVP does not.
    iso = jnp.concatenate([jnp.eye(3), -jnp.eye(3)], axis=1)[None] * 2.0  # [1, 3, 6], mean 0
    gp = jax.grad(lambda x: jnp.sum(et_lib._inv_sqrt_psd(x) * jnp.arange(9.0).reshape(3, 3)))(
        jnp.einsum("nif,njf->nij", iso, iso) / 6
    )
    assert np.all(np.isfinite(np.asarray(gp)))

    # float64 path (x64 on): same result up to float32 round-off, output stays float32.
    with jax.enable_x64(True):
        out64 = ln.apply(params, v)
    assert out64.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out64), np.asarray(out), atol=1e-5)


def test_gated_block_safe_norm():
    g = jax.grad(lambda v: jnp.sum(safe_norm(v, axis=-2)))(jnp.zeros((2, 3, 4)))
    assert np.all(np.asarray(g) == 0.0)
    block = GatedEquivariantBlock(3, scalar_activation=True)
    x, v = jnp.ones((2, 8)), jnp.zeros((2, 3, 8))
    params = block.init(jax.random.key(0), x, v)
    grads = jax.grad(lambda p, v: sum(jnp.sum(o) for o in block.apply(p, x, v)), argnums=(0, 1))(params, v)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(grads))


# -------------------------------------------------------------------------------------------------
# Symmetries
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interlayer_norm", ["none", "affine", "shared_noaffine"])
def test_e3_equivariance(interlayer_norm, monkeypatch):
    """Rotation + inversion + translation: scalars invariant, noise and vectors rotate as R y.

    The EqLN covariance regulariser 1e-5 diag(1, 2, 3) is fixed in the lab frame, so with it the
    model (like the torch original) is only approximately equivariant: at init the vector
    covariances have eigenvalues of 1e-5 .. 1e-2, and the error is ~1e-3 .. 1e-2. The exact test
    therefore sets the regulariser to 0 (the root's +1e-5 stays); ``test_translation_and_
    approximate_rotation`` covers the real constant.
    """
    monkeypatch.setattr(et_lib, "_EQLN_COV_EPS", 0.0)
    model = Model(**SMALL, interlayer_norm=interlayer_norm)
    batch = build_batch([random_molecule(3, 10)])
    params = perturb(model.init(jax.random.key(0), batch), scale=0.02)
    shift = jnp.array([0.3, -1.2, 2.0])

    def fun(pos: e3nn.IrrepsArray):
        out = model.apply(params, {**batch, "positions": pos.array + shift})
        n = pos.shape[0]
        return e3nn.concatenate(
            [
                e3nn.IrrepsArray("32x0e", out["node_features"]),
                e3nn.IrrepsArray("0e", out["scalar"][:, None]),
                e3nn.IrrepsArray("1o", out["noise"]),
                e3nn.IrrepsArray("32x1o", jnp.swapaxes(out["vectors"], 1, 2).reshape(n, 96)),
            ]
        )

    pos = e3nn.IrrepsArray("1o", batch["positions"] - shift)
    out1, out2 = e3nn.utils.equivariance_test(fun, jax.random.key(7), pos)
    # node_features, scalar, noise, vectors: each part separately.
    for part in [slice(0, 32), slice(32, 33), slice(33, 36), slice(36, 132)]:
        assert rel_err(out1.array[:, part], out2.array[:, part]) < 5e-5, (interlayer_norm, part)
    # Without any EqLN only float32 round-off remains.
    if interlayer_norm == "none":
        plain = Model(**SMALL, interlayer_norm="none", vector_norm="none")
        p2 = plain.init(jax.random.key(0), batch)
        rot = e3nn.rand_matrix(jax.random.key(5), ())
        o = plain.apply(p2, batch)
        o_r = plain.apply(p2, {**batch, "positions": batch["positions"] @ rot.T + shift})
        assert rel_err(o_r["scalar"], o["scalar"]) < 1e-5
        assert rel_err(o_r["node_features"], o["node_features"]) < 1e-5
        assert rel_err(o_r["noise"], rotate_vectors(rot, o["noise"])) < 1e-5
        assert rel_err(o_r["vectors"], rotate_vectors(rot, o["vectors"])) < 1e-5


def test_translation_and_approximate_rotation(small_model):
    """With the real EqLN regulariser: translations are exact, rotations approximate."""
    _, params, apply = small_model
    batch = build_batch([random_molecule(0), random_molecule(1, 5)])
    out = apply(params, batch)
    moved = apply(params, {**batch, "positions": batch["positions"] + jnp.array([5.0, -3.0, 1.0])})
    for key in out:
        np.testing.assert_allclose(np.asarray(moved[key]), np.asarray(out[key]), atol=2e-4, rtol=1e-4)
    rot = e3nn.rand_matrix(jax.random.key(3), ())
    rotated = apply(params, {**batch, "positions": batch["positions"] @ rot.T})
    assert rel_err(rotated["scalar"], out["scalar"]) < 5e-2
    assert rel_err(rotated["noise"], rotate_vectors(rot, out["noise"])) < 5e-2


def test_atom_permutation(small_model):
    _, params, apply = small_model
    z, pos = random_molecule(4, 9)
    perm = np.random.default_rng(0).permutation(9)
    out = apply(params, build_batch([(z, pos)]))
    out_p = apply(params, build_batch([(z[perm], pos[perm])]))
    for key in out:
        np.testing.assert_allclose(np.asarray(out_p[key]), np.asarray(out[key])[perm], atol=2e-5, rtol=1e-4)


# -------------------------------------------------------------------------------------------------
# Padding, masking and gradients
# -------------------------------------------------------------------------------------------------


def test_padding_invariance(small_model):
    _, params, apply = small_model
    mols = [random_molecule(0), random_molecule(1, 5)]
    out = apply(params, build_batch(mols))
    padded = apply(params, build_batch(mols, n_pad_nodes=3, n_pad_edges=7))
    n = out["scalar"].shape[0]
    for key in out:
        np.testing.assert_allclose(np.asarray(padded[key][:n]), np.asarray(out[key]), atol=1e-6)
        assert np.all(np.asarray(padded[key][n:]) == 0.0), key


def test_no_nan_gradients_with_padding_and_self_loops(small_model):
    model, params, _ = small_model
    batch = build_batch([random_molecule(0), random_molecule(1, 5)], n_pad_nodes=3, n_pad_edges=7)

    def loss(p, pos):
        out = model.apply(p, {**batch, "positions": pos})
        return sum(jnp.sum(v) for v in out.values())

    g_params, g_pos = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, batch["positions"])
    for leaf in jax.tree_util.tree_leaves(g_params) + [g_pos]:
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert float(jnp.max(jnp.abs(g_pos[-3:]))) == 0.0  # padding atoms do not influence anything


def test_edges_beyond_cutoff_and_masked_edges_change_nothing(small_model):
    _, params, apply = small_model
    # A stretched molecule so that some pairs lie between 5 and 7 Å.
    z, pos = random_molecule(5, 8)
    pos = pos * np.array([2.0, 1.0, 1.0], np.float32)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    assert np.any((d > CUTOFF) & (d < 7.0))
    out = apply(params, build_batch([(z, pos)]))
    # The pipeline's skin: edges up to 7 Å with mask True.
    skin = apply(params, build_batch([(z, pos)], edge_radius=7.0))
    for key in out:
        np.testing.assert_allclose(np.asarray(skin[key]), np.asarray(out[key]), atol=1e-6)
    # A masked real edge inside the cutoff contributes nothing either: drop the real (j -> i) edge,
    # then append it again with mask False.
    b = build_batch([(z, pos)])
    i, j = np.argwhere((d < 3.0) & (d > 0))[0]
    keep = ~((b["senders"] == j) & (b["receivers"] == i))
    b_ref = {**b, **{k: b[k][keep] for k in ("senders", "receivers", "edge_mask")}}
    b_masked = {
        **b_ref,
        "senders": jnp.append(b_ref["senders"], j),
        "receivers": jnp.append(b_ref["receivers"], i),
        "edge_mask": jnp.append(b_ref["edge_mask"], False),
    }
    ref, masked = apply(params, b_ref), apply(params, b_masked)
    for key in ref:
        np.testing.assert_allclose(np.asarray(masked[key]), np.asarray(ref[key]), atol=1e-6)
    assert rel_err(ref["scalar"], out["scalar"]) > 1e-3  # the edge did matter when active


def test_encoder_matches_model_and_padding_rows_unmasked():
    """The bare encoder is exported and agrees with the model's node features on real atoms."""
    batch = build_batch([random_molecule(2, 4)], n_pad_nodes=1, n_pad_edges=1)
    enc = EquivariantTransformer(**SMALL)
    model = Model(**SMALL, heads=())
    params = model.init(jax.random.key(0), batch)
    x, vec = enc.apply(
        {"params": params["params"]["representation"]},
        batch["atomic_numbers"], batch["positions"], batch["senders"], batch["receivers"], batch["edge_mask"],
    )
    out = model.apply(params, batch)
    np.testing.assert_allclose(np.asarray(out["node_features"][:-1]), np.asarray(x[:-1]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["vectors"][:-1]), np.asarray(vec[:-1]), atol=1e-6)
