"""Tests of the ET encoder, its heads and the full per-device model (mspec.models).

Everything runs on small models (F=32, 2 layers, 4 heads, 8 RBFs) except the parameter counts,
which only trace ``init`` with ``jax.eval_shape``. To keep compiles few, most batches are padded
to one fixed budget (``N_BUDGET`` atoms, ``E_BUDGET`` edges) and share one jitted ``apply``.
"""

from __future__ import annotations

import math

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mspec import models
from mspec.models import EquivariantTransformer, Model, count_params
from mspec.models import et as et_lib
from mspec.models.heads import GatedEquivariantBlock, safe_norm

SMALL = dict(hidden=32, num_layers=2, num_heads=4, num_rbf=8)
F = SMALL["hidden"]
CUTOFF = 5.0
N_BUDGET, E_BUDGET = 24, 128
EDGE_KEYS = ("senders", "receivers", "edge_mask")


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
    molecules,
    *,
    n_node: int | None = N_BUDGET,
    n_edge: int | None = E_BUDGET,
    edge_radius: float = CUTOFF,
) -> dict:
    """Pack molecules into one device batch (the model's keys of the mspec.types layout).

    Edges are every ordered pair (j -> i) within ``edge_radius`` in a molecule, self-loops
    included, sorted by receiver then sender. The batch is padded to ``n_node`` atoms and
    ``n_edge`` edges (``None``: no padding): padding atoms have Z=0, position 0 and mask False;
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
    n_pad = 0 if n_node is None else n_node - n_real
    e_pad = 0 if n_edge is None else n_edge - e_real
    assert n_pad >= 0 and e_pad >= 0 and (e_pad == 0 or n_pad > 0), (n_real, e_real)
    pad_atom = n_real + n_pad - 1
    batch = dict(
        atomic_numbers=np.concatenate(zs + [np.zeros(n_pad, np.int32)]),
        positions=np.concatenate(poss + [np.zeros((n_pad, 3), np.float32)]),
        node_mask=np.arange(n_real + n_pad) < n_real,
        senders=np.concatenate(senders + [np.full(e_pad, pad_atom)]).astype(np.int32),
        receivers=np.concatenate(receivers + [np.full(e_pad, pad_atom)]).astype(np.int32),
        edge_mask=np.arange(e_real + e_pad) < e_real,
    )
    return {k: jnp.asarray(v) for k, v in batch.items()}


def perturb(params, seed: int = 0, scale: float = 0.1):
    """Add noise to every parameter so that biases are non-zero (zero biases hide masking bugs:
    SiLU(0) = 0 would silence dk / dv for a zero RBF even without the mask).

    The noise comes from numpy: jitted per-leaf threefry would take longer to compile than the
    model."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(
            np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32)
        ),
        params,
    )


def drop_params(params, prefixes: tuple[str, ...]):
    """Remove encoder submodules whose name starts with one of ``prefixes``."""
    rep = {
        k: v for k, v in params["params"]["representation"].items() if not k.startswith(prefixes)
    }
    return {"params": {**params["params"], "representation": rep}}


# Checks run in numpy: eager jnp ops would each compile a tiny XLA program.
def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def rotate_vectors(rot, y):
    """Apply ``rot [3, 3]`` to ``[N, 3]`` or ``[N, 3, F]`` outputs."""
    rot, y = np.asarray(rot), np.asarray(y)
    return y @ rot.T if y.ndim == 2 else np.einsum("ij,njf->nif", rot, y)


def assert_outputs_close(a: dict, b: dict, rows=slice(None), atol=1e-5, rtol=1e-5):
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(
            np.asarray(a[key][rows]), np.asarray(b[key][rows]), atol=atol, rtol=rtol, err_msg=key
        )


@pytest.fixture(scope="module")
def small():
    """The small affine (MolSpectra) model: init params, perturbed params and a jitted apply."""
    model = Model(**SMALL, interlayer_norm="affine")
    batch = build_batch([random_molecule(0), random_molecule(1, 5)])
    params = jax.jit(model.init)(jax.random.key(0), batch)
    return dict(model=model, params=params, perturbed=perturb(params), apply=jax.jit(model.apply))


# -------------------------------------------------------------------------------------------------
# Sizes, options, initialisation
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (
            dict(hidden=256, num_layers=8, num_heads=8, num_rbf=64, interlayer_norm="affine"),
            7_216_388,
        ),
        (
            dict(hidden=128, num_layers=6, num_heads=8, num_rbf=32, interlayer_norm="none"),
            1_426_564,
        ),
        (
            dict(
                hidden=256, num_layers=8, num_heads=8, num_rbf=64, interlayer_norm="shared_noaffine"
            ),
            7_212_292,
        ),
    ],
)
def test_parameter_counts(kwargs, expected):
    batch = build_batch([random_molecule(0, 3)], n_node=4, n_edge=10)
    params = jax.eval_shape(
        Model(**kwargs, heads=("scalar", "noise")).init, jax.random.key(0), batch
    )
    n = count_params(params)
    print(f"{kwargs['interlayer_norm']}: {n:,} parameters")
    assert n == expected


@pytest.mark.parametrize("module, norm, expected", [
    ("pretrain_frad", "shared_noaffine", 7_212_292),  # Frad fork: shared non-affine LayerNorm
    # MolSpectra: per-layer affine LayerNorm; stage 1 has only the noise head (7,216,388 with the
    # scalar head too, as in the fine-tuning configs).
    ("pretrain_molspectra", "affine", 7_216_388 - 345_090),
])
def test_pretraining_configs_build_their_papers_architecture(module, norm, expected):
    import importlib


    config = importlib.import_module(f"experiments.configs.{module}").get_config()
    assert config.model.interlayer_norm == norm
    batch = build_batch([random_molecule(0, 3)], n_node=4, n_edge=10)
    params = jax.eval_shape(models.get_model(config.model).init, jax.random.key(0), batch)
    assert count_params(params) == expected


def test_upstream_variant_has_the_reference_parameter_count():
    # torchmd-net 3.1.0's upstream ET (no per-layer norms, no whitened vector norm) with its
    # vector output head: 6,864,898 parameters (docs/spec/benchmark-protocol.md §1), the
    # benchmark's like-for-like model.
    batch = build_batch([random_molecule(0, 3)], n_node=4, n_edge=10)
    model = Model(
        hidden=256, num_layers=8, num_heads=8, num_rbf=64, interlayer_norm="none",
        vector_norm="none", heads=("noise",),
    )
    assert count_params(jax.eval_shape(model.init, jax.random.key(0), batch)) == 6_864_898


def test_unknown_options_raise():
    batch = build_batch([random_molecule(0, 3)], n_node=4, n_edge=10)
    for kwargs, word in [
        (dict(interlayer_norm="frad"), "interlayer_norm"),
        (dict(vector_norm="l2"), "vector_norm"),
        (dict(heads=("scalar", "polarizability")), "heads"),
        (dict(prior="zbl"), "prior"),
    ]:
        with pytest.raises(ValueError, match=word):
            jax.eval_shape(Model(**SMALL, **kwargs).init, jax.random.key(0), batch)


def test_output_keys_and_shapes():
    batch = build_batch([random_molecule(0, 4)], n_node=5, n_edge=17)
    for heads, keys in [((), set()), (("scalar",), {"scalar"}), (("noise",), {"noise"})]:
        model = Model(**SMALL, heads=heads)
        out = jax.eval_shape(lambda b, m=model: m.init_with_output(jax.random.key(0), b)[0], batch)
        assert set(out) == {"node_features", "vectors"} | keys
        assert out["node_features"].shape == (5, F) and out["vectors"].shape == (5, 3, F)
        if "scalar" in keys:
            assert out["scalar"].shape == (5,)
        if "noise" in keys:
            assert out["noise"].shape == (5, 3)


def test_initialisation_matches_torch(small):
    """Xavier-uniform kernels, zero biases, N(0, 1) embeddings, unit LayerNorm / EqLN weights."""
    seen = set()
    for path, x in jax.tree_util.tree_flatten_with_path(small["params"]["params"])[0]:
        names = [p.key for p in path]
        leaf, x = names[-1], np.asarray(x)
        seen.add(leaf)
        if leaf == "kernel":
            fan_in, fan_out = x.shape
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            assert np.max(np.abs(x)) <= limit, names
            if x.size >= 1000:  # U(-a, a) has std a / sqrt(3)
                assert abs(np.std(x) / (limit / math.sqrt(3)) - 1) < 0.1, names
        elif leaf == "bias":
            assert np.all(x == 0.0), names
        elif leaf in ("scale", "weight"):  # LayerNorm scale, EqLN weight
            assert np.all(x == 1.0), names
        elif leaf == "embedding":
            assert x.shape == (100, F)
            assert abs(np.std(x) - 1.0) < 0.1 and abs(np.mean(x)) < 0.1
        else:
            raise AssertionError(f"unexpected parameter {names}")
    assert seen == {"kernel", "bias", "scale", "weight", "embedding"}


# -------------------------------------------------------------------------------------------------
# Radial features and edge geometry
# -------------------------------------------------------------------------------------------------


def test_rbf_constants_and_cutoff():
    for k, beta in [(64, 1037.94), (32, 259.485)]:
        means, betas, alpha = et_lib.expnorm_rbf_params(k, CUTOFF)
        np.testing.assert_allclose(np.asarray(betas), beta, rtol=1e-5)
        np.testing.assert_allclose(float(means[0]), math.exp(-5.0), rtol=1e-6)
        np.testing.assert_allclose(float(means[-1]), 1.0, rtol=1e-6)
        assert alpha == 1.0

    r = np.array([0.0, 1.25, 2.5, 4.999, 5.0, 6.0])
    expected = np.where(r < 5.0, 0.5 * (np.cos(np.pi * r / 5.0) + 1.0), 0.0)
    got = np.asarray(jax.jit(et_lib.cosine_cutoff, static_argnums=1)(jnp.asarray(r), CUTOFF))
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert got[2] == pytest.approx(0.5)

    # f_k(r) against a float64 numpy reference; zero beyond the cutoff; r = 0 peaks last.
    r = np.array([0.0, 0.7, 1.5, 3.3, 4.9, 5.2])
    mu = np.linspace(math.exp(-5.0), 1.0, 32)
    c = np.where(r < 5.0, 0.5 * (np.cos(np.pi * r / 5.0) + 1.0), 0.0)
    ref = c[:, None] * np.exp(-259.485 * (np.exp(-r)[:, None] - mu) ** 2)
    got = np.asarray(
        jax.jit(et_lib.expnorm_rbf, static_argnums=(1, 2))(jnp.asarray(r, jnp.float32), 32, CUTOFF)
    )
    np.testing.assert_allclose(got, ref, atol=2e-5)
    assert np.all(got[-1] == 0.0) and np.argmax(got[0]) == 31


def test_edge_geometry_self_loops_have_finite_gradients():
    pos = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    senders, receivers = jnp.array([0, 1, 1]), jnp.array([0, 0, 1])

    def f(p):
        r, unit, _ = et_lib.edge_geometry(p, senders, receivers)
        return jnp.sum(r) + jnp.sum(unit), (r, unit)

    g, (r, unit) = jax.jit(jax.grad(f, has_aux=True))(pos)
    np.testing.assert_allclose(np.asarray(r), [0.0, 3.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(unit[1]), [1 / 3, 2 / 3, 2 / 3], atol=1e-6
    )  # pos_j - pos_i
    assert np.all(np.asarray(unit[0]) == 0) and np.all(np.asarray(unit[2]) == 0)
    assert np.all(np.isfinite(np.asarray(g)))


# -------------------------------------------------------------------------------------------------
# Equivariant layer norm and gated block
# -------------------------------------------------------------------------------------------------


def _eqln_reference(v, weight):
    """Plain-autodiff reference of the whitened EqLN (eigh gradient, no custom JVP)."""
    v = v - v.mean(-1, keepdims=True)
    cov = jnp.einsum("nif,njf->nij", v, v) / v.shape[-1] + 1e-5 * jnp.diag(
        jnp.array([1.0, 2.0, 3.0])
    )
    w, q = jnp.linalg.eigh(cov)
    inv = jnp.einsum("nik,nk,njk->nij", q, 1.0 / jnp.sqrt(w + 1e-5), q)
    return jnp.einsum("nij,njf->nif", inv, v) * weight


def test_equivariant_layer_norm():
    ln = et_lib.EquivariantLayerNorm()
    v = jax.random.normal(jax.random.key(0), (6, 3, F))
    v = v.at[-1].set(0.0)  # a padding atom
    params = {"params": {"weight": jnp.full((F,), 1.5)}}
    apply = jax.jit(ln.apply)
    out = apply(params, v)

    # Equivariance: the lab-frame diag(1, 2, 3) regulariser limits it to O(1e-5 / lambda).
    rot = e3nn.rand_matrix(jax.random.key(1), ())
    assert rel_err(apply(params, rotate_vectors(rot, v)), rotate_vectors(rot, out)) < 1e-4

    # Whitening: the output covariance is weight^2 * identity; padding stays exactly 0.
    cov = np.einsum("nif,njf->nij", out, out) / F
    np.testing.assert_allclose(
        np.asarray(cov[:-1]), np.broadcast_to(2.25 * np.eye(3), (5, 3, 3)), atol=1e-3
    )
    assert np.all(np.asarray(out[-1]) == 0.0)

    # Forward and gradient agree with plain autodiff through eigh (non-degenerate case), and
    # the gradient at the all-zero padding row is finite.
    t = jax.random.normal(jax.random.key(2), v.shape)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(jax.jit(_eqln_reference)(v, 1.5)), atol=1e-5
    )
    g = jax.jit(jax.grad(lambda x: jnp.sum(ln.apply(params, x) * t)))(v)
    g_ref = jax.jit(jax.grad(lambda x: jnp.sum(_eqln_reference(x, 1.5) * t)))(v)
    assert np.all(np.isfinite(np.asarray(g)))
    assert rel_err(g, g_ref) < 1e-4

    # Exactly degenerate covariance (isotropic V): the eigenvector gradient of eigh has
    # 1 / (w_a - w_b) terms; the Daleckii-Krein JVP has none and gives the analytic derivative
    # of (c I + eps)^-1/2, i.e. -1/2 (c + eps)^-3/2 on the diagonal.
    c = 4.0 / 3.0
    gp = jax.jit(jax.grad(lambda m: jnp.trace(et_lib._inv_sqrt_psd(m))))(c * jnp.eye(3))
    np.testing.assert_allclose(
        np.asarray(gp), -0.5 * (c + 1e-5) ** -1.5 * np.eye(3), rtol=1e-5, atol=1e-7
    )

    # float64 path (x64 on): same result up to float32 round-off, output stays float32.
    with jax.enable_x64(True):
        out64 = jax.jit(ln.apply)(params, v)
    assert out64.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out64), np.asarray(out), atol=1e-5)


def test_gated_block_safe_norm():
    g = jax.jit(jax.grad(lambda v: jnp.sum(safe_norm(v, axis=-2))))(jnp.zeros((2, 3, 4)))
    assert np.all(np.asarray(g) == 0.0)
    block = GatedEquivariantBlock(3, scalar_activation=True)
    x, v = jnp.ones((2, 8)), jnp.zeros((2, 3, 8))
    params = jax.jit(block.init)(jax.random.key(0), x, v)
    loss = lambda p, v: sum(jnp.sum(o) for o in block.apply(p, x, v))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, v)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(grads))


# -------------------------------------------------------------------------------------------------
# Symmetries
# -------------------------------------------------------------------------------------------------


def _as_irreps(out: dict) -> e3nn.IrrepsArray:
    n = out["scalar"].shape[0]
    return e3nn.concatenate(
        [
            e3nn.IrrepsArray(f"{F}x0e", out["node_features"]),
            e3nn.IrrepsArray("0e", out["scalar"][:, None]),
            e3nn.IrrepsArray("1o", out["noise"]),
            e3nn.IrrepsArray(f"{F}x1o", jnp.swapaxes(out["vectors"], 1, 2).reshape(n, 3 * F)),
        ]
    )


_PARTS = {
    "node_features": slice(0, F),
    "scalar": slice(F, F + 1),
    "noise": slice(F + 1, F + 4),
    "vectors": slice(F + 4, 4 * F + 4),
}


def test_e3_equivariance(small, monkeypatch):
    """Rotation + inversion + translation: scalars invariant, noise and vectors rotate as R y.

    The EqLN covariance regulariser 1e-5 diag(1, 2, 3) is fixed in the lab frame, so with it the
    model (like the torch original) is only approximately equivariant: at init the vector
    covariances have eigenvalues of 1e-5 .. 1e-2 and the error is 1e-3 .. 1e-2
    (``test_translation_and_approximate_rotation``). Here the regulariser is set to 0 (the
    root's +1e-5 stays), which leaves float32 round-off amplified by the whitening.

    The three inter-layer-norm variants share the affine model's parameters minus the modules
    they do not have.
    """
    monkeypatch.setattr(et_lib, "_EQLN_COV_EPS", 0.0)
    batch = build_batch([random_molecule(3, 10)], n_node=11, n_edge=101)
    shift = jnp.array([0.3, -1.2, 2.0])
    variants = [
        ("affine", "whitened", small["perturbed"], 5e-5),
        ("shared_noaffine", "whitened", drop_params(small["perturbed"], ("layer_norms_",)), 5e-5),
        (
            "none",
            "whitened",
            drop_params(small["perturbed"], ("layer_norms_", "vec_layer_norms_")),
            5e-5,
        ),
        # Without any EqLN only plain float32 round-off remains: the acceptance bound 1e-5.
        (
            "none",
            "none",
            drop_params(small["perturbed"], ("layer_norms_", "vec_layer_norms_", "out_norm_vec")),
            1e-5,
        ),
    ]
    for interlayer_norm, vector_norm, params, tol in variants:
        model = Model(**SMALL, interlayer_norm=interlayer_norm, vector_norm=vector_norm)
        # Jitted end to end, e3nn packing included (a fresh closure: traced after the patch).
        fun = jax.jit(
            lambda pos, model=model, params=params: _as_irreps(
                model.apply(params, {**batch, "positions": pos.array + shift})
            )
        )

        pos = e3nn.IrrepsArray("1o", batch["positions"] - shift)
        out1, out2 = e3nn.utils.equivariance_test(fun, jax.random.key(7), pos)
        for name, part in _PARTS.items():
            err = rel_err(out1.array[:, part], out2.array[:, part])
            assert err < tol, (interlayer_norm, vector_norm, name, err)


def test_translation_and_approximate_rotation(small):
    """With the real EqLN regulariser: translations are exact, rotations approximate."""
    apply, params = small["apply"], small["perturbed"]
    batch = build_batch([random_molecule(0), random_molecule(1, 5)])
    out = apply(params, batch)
    moved = apply(params, {**batch, "positions": batch["positions"] + jnp.array([5.0, -3.0, 1.0])})
    assert_outputs_close(moved, out, atol=2e-4, rtol=1e-4)
    rot = e3nn.rand_matrix(jax.random.key(3), ())
    rotated = apply(params, {**batch, "positions": batch["positions"] @ rot.T})
    assert rel_err(rotated["scalar"], out["scalar"]) < 5e-2
    assert rel_err(rotated["noise"], rotate_vectors(rot, out["noise"])) < 5e-2


def test_atom_permutation(small):
    apply, params = small["apply"], small["perturbed"]
    z, pos = random_molecule(4, 9)
    perm = np.random.default_rng(0).permutation(9)
    out = apply(params, build_batch([(z, pos)]))
    out_p = apply(params, build_batch([(z[perm], pos[perm])]))
    assert_outputs_close(
        out_p, {k: v[:9][perm] for k, v in out.items()}, rows=slice(0, 9), atol=2e-5, rtol=1e-4
    )


# -------------------------------------------------------------------------------------------------
# Padding, masking and gradients
# -------------------------------------------------------------------------------------------------


def test_padding_invariance(small):
    apply, params = small["apply"], small["perturbed"]
    mol_a, mol_b = random_molecule(0), random_molecule(1, 5)
    # No padding at all (its own compile) vs the padded budget vs another molecule + less padding.
    exact = jax.jit(small["model"].apply)(params, build_batch([mol_a], n_node=None, n_edge=None))
    padded = apply(params, build_batch([mol_a]))
    shared = apply(params, build_batch([mol_a, mol_b]))
    n = exact["scalar"].shape[0]
    # Only float32 summation order differs (other shapes), amplified a little by the whitening.
    assert_outputs_close(padded, exact, rows=slice(0, n), atol=2e-5, rtol=1e-5)
    assert_outputs_close(shared, exact, rows=slice(0, n), atol=2e-5, rtol=1e-5)
    for key, value in padded.items():
        assert np.all(np.asarray(value[n:]) == 0.0), key


def test_no_nan_gradients_with_padding_and_self_loops(small):
    model, params = small["model"], small["perturbed"]
    batch = build_batch([random_molecule(0), random_molecule(1, 5)])

    def loss(p, pos):
        out = model.apply(p, {**batch, "positions": pos})
        return sum(jnp.sum(v) for v in out.values())

    g_params, g_pos = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, batch["positions"])
    for leaf in jax.tree_util.tree_leaves(g_params) + [g_pos]:
        assert np.all(np.isfinite(leaf))
    n_real = int(batch["node_mask"].sum())
    g_pos = np.asarray(g_pos)
    assert np.all(g_pos[n_real:] == 0.0)  # padding atoms influence nothing
    assert np.all(np.abs(g_pos[:n_real]).sum(-1) > 0.0)


def test_edges_beyond_cutoff_and_masked_edges_change_nothing(small):
    apply, params = small["apply"], small["perturbed"]
    # A stretched molecule so that some pairs lie between 5 and 7 Å.
    z, pos = random_molecule(5, 8)
    pos = pos * np.array([2.0, 1.0, 1.0], np.float32)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    assert np.any((d > CUTOFF) & (d < 7.0))
    b = build_batch([(z, pos)])
    out = apply(params, b)
    # The pipeline's skin: edges up to 7 Å, with mask True.
    assert_outputs_close(apply(params, build_batch([(z, pos)], edge_radius=7.0)), out)

    # A masked real edge inside the cutoff contributes nothing either: drop the real (j -> i)
    # edge (a padding edge takes its slot), then put it back with mask False.
    i, j = np.argwhere((d < 3.0) & (d > 0))[0]
    slot = int(
        np.argwhere((np.asarray(b["senders"]) == j) & (np.asarray(b["receivers"]) == i))[0, 0]
    )
    pad_atom = N_BUDGET - 1
    b_ref = {
        **b,
        "senders": b["senders"].at[slot].set(pad_atom),
        "receivers": b["receivers"].at[slot].set(pad_atom),
        "edge_mask": b["edge_mask"].at[slot].set(False),
    }
    b_masked = {**b, "edge_mask": b["edge_mask"].at[slot].set(False)}
    ref = apply(params, b_ref)
    assert_outputs_close(apply(params, b_masked), ref)
    assert rel_err(ref["scalar"], out["scalar"]) > 1e-3  # the edge does matter when active


def test_encoder_matches_model(small):
    """The exported bare encoder gives the model's features on real atoms (unmasked padding)."""
    params = small["perturbed"]
    batch = build_batch([random_molecule(2, 4)])
    enc = EquivariantTransformer(**SMALL)
    x, vec = jax.jit(enc.apply)(
        {"params": params["params"]["representation"]},
        *(batch[k] for k in ("atomic_numbers", "positions", "senders", "receivers", "edge_mask")),
    )
    out = small["apply"](params, batch)
    np.testing.assert_allclose(np.asarray(out["node_features"][:4]), np.asarray(x[:4]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["vectors"][:4]), np.asarray(vec[:4]), atol=1e-6)


def test_first_layer_skips_the_zero_vector_stream_exactly():
    """With ``vec = 0`` the skipped ``vec_proj`` / ``o1, o2`` work changes no output and no
    gradient (those weights get exactly zero gradient either way)."""
    rng = np.random.default_rng(0)
    n, e = 10, 40
    x = jnp.asarray(rng.standard_normal((n, F)).astype(np.float32))
    vec = jnp.zeros((n, 3, F))
    s = jnp.asarray(rng.integers(0, n, e).astype(np.int32))
    r_ = jnp.asarray(rng.integers(0, n, e).astype(np.int32))
    r = jnp.asarray(rng.uniform(0.5, 6.0, e).astype(np.float32))
    rbf = et_lib.expnorm_rbf(r, 8, CUTOFF)
    unit = jnp.asarray(rng.standard_normal((e, 3)).astype(np.float32))
    mask = jnp.asarray(rng.random(e) > 0.2)
    args = (x, vec, r, rbf, unit, s, r_, mask)
    full = et_lib.EquivariantMultiHeadAttention(F, 4, CUTOFF)
    skip = et_lib.EquivariantMultiHeadAttention(F, 4, CUTOFF, zero_vec_input=True)
    params = perturb(full.init(jax.random.key(0), *args))
    assert jax.tree.structure(skip.init(jax.random.key(0), *args)) == jax.tree.structure(params)
    ct = (rng.standard_normal((n, F)).astype(np.float32), rng.standard_normal((n, 3, F)).astype(np.float32))

    def loss(module, p):
        dx, dvec = module.apply(p, *args)
        return jnp.sum(dx * ct[0]) + jnp.sum(dvec * ct[1])

    l1, g1 = jax.value_and_grad(lambda p: loss(full, p))(params)
    l2, g2 = jax.value_and_grad(lambda p: loss(skip, p))(params)
    assert float(l2) == pytest.approx(float(l1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, atol=1e-6 * (np.abs(a).max() + 1e-12), rtol=0)
    assert not np.any(g2["params"]["vec_proj"]["kernel"])
    assert not np.any(g2["params"]["o_proj"]["kernel"][:, : 2 * F])
