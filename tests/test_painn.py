"""Tests of the PaiNN encoder (mspec.models.painn) and of the ET's heads on its outputs.

Small models (F=16, 2 blocks, 8 RBFs) on hand-built molecules of a few atoms; the parameter
counts of the published configuration only trace ``init`` with ``jax.eval_shape``. The exact
symmetry, reference and cutoff checks run in float64 (``jax.enable_x64``); a handful of jitted
functions are compiled once each and shared between tests.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mspec.models import count_params
from mspec.models.heads import EquivariantScalar, EquivariantVectorOutput
from mspec.models.painn import PaiNN, sine_rbf

SMALL = {"hidden": 16, "num_layers": 2, "num_rbf": 8, "cutoff": 5.0}
F = SMALL["hidden"]
CUTOFF = SMALL["cutoff"]
ENCODER_KEYS = ("atomic_numbers", "positions", "senders", "receivers", "edge_mask")


# -------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------


class WithHeads(nn.Module):
    """PaiNN under the name ``representation`` (as Model builds it) plus the ET's scalar and
    vector heads; the energy is the sum of the scalar head over the real atoms."""

    shared_filters: bool = False
    dtype: object = None

    @nn.compact
    def __call__(self, batch):
        x, vec = PaiNN(
            **SMALL, shared_filters=self.shared_filters, dtype=self.dtype, name="representation"
        )(*(batch[k] for k in ENCODER_KEYS))
        scalar = EquivariantScalar(name="scalar_head")(x, vec)  # [N]
        noise = EquivariantVectorOutput(name="noise_head")(x, vec)  # [N, 3]
        energy = jnp.sum(scalar * batch["node_mask"])
        return {"x": x, "vec": vec, "scalar": scalar, "noise": noise}, energy


def molecule(seed: int, n_atoms: int = 7, box: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A generic molecule (no symmetry, atoms at least 0.9 Å apart): ``(z [n], pos [n, 3])``."""
    rng = np.random.default_rng(seed)
    pos: list[np.ndarray] = []
    while len(pos) < n_atoms:
        p = rng.uniform(-box, box, 3)
        if all(np.linalg.norm(p - q) > 0.9 for q in pos):
            pos.append(p)
    return rng.choice([1, 6, 7, 8, 9], n_atoms).astype(np.int32), np.asarray(pos)


def pair_edges(pos: np.ndarray, radius: float, self_loops: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ordered pairs ``(senders, receivers)`` within ``radius``, sorted by receiver then sender."""
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    keep = d < radius
    if not self_loops:
        keep &= ~np.eye(len(pos), dtype=bool)
    receivers, senders = np.nonzero(keep)
    return senders.astype(np.int32), receivers.astype(np.int32)


def batch_of(z, pos, senders, receivers, edge_mask, node_mask, dtype=np.float32) -> dict:
    return {
        "atomic_numbers": jnp.asarray(z, jnp.int32),
        "positions": jnp.asarray(np.asarray(pos, dtype)),
        "senders": jnp.asarray(senders, jnp.int32),
        "receivers": jnp.asarray(receivers, jnp.int32),
        "edge_mask": jnp.asarray(edge_mask, bool),
        "node_mask": jnp.asarray(node_mask, bool),
    }


def padded_batch(z, pos, n_pad: int, e_pad: int, dtype=np.float32) -> dict:
    """One molecule with self-loops (mask True, as the pipeline sends them), ``n_pad`` padding
    atoms (Z = 0 at the origin) and ``e_pad`` masked padding self-loops on the last one."""
    n = len(z)
    s, r = pair_edges(pos, CUTOFF, self_loops=True)
    pad = n + n_pad - 1
    return batch_of(
        np.concatenate([z, np.zeros(n_pad, np.int32)]),
        np.concatenate([pos, np.zeros((n_pad, 3))]),
        np.concatenate([s, np.full(e_pad, pad)]),
        np.concatenate([r, np.full(e_pad, pad)]),
        np.arange(len(s) + e_pad) < len(s),
        np.arange(n + n_pad) < n,
        dtype,
    )


def perturb(params, seed: int = 0, scale: float = 0.1):
    """Add noise to every parameter so that biases are non-zero (zero biases hide masking bugs)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype),
        params,
    )


def to64(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x, np.float64)), tree)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_rotation(seed: int) -> np.ndarray:
    """A random proper rotation ``[3, 3]`` (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def rotate(rot, y):
    """``rot`` applied to ``[N, 3]`` or ``[N, 3, F]`` arrays (spatial axis 1)."""
    return np.einsum("ij,nj...->ni...", rot, np.asarray(y))


MODEL = WithHeads()


def _outputs_and_forces(params, batch):
    """Outputs, energy, forces ``-dE/dpositions [N, 3]`` and ``dE/dparams``."""

    def energy(p, pos):
        out, e = MODEL.apply(p, {**batch, "positions": pos})
        return e, out

    (e, out), (g_params, g_pos) = jax.value_and_grad(energy, argnums=(0, 1), has_aux=True)(
        params, batch["positions"]
    )
    return {**out, "energy": e, "forces": -g_pos, "param_grads": g_params}


# One compile per (shapes, dtype, x64) combination, shared by the tests.
outputs_and_forces = jax.jit(_outputs_and_forces)


def small_batch() -> dict:
    """7 atoms + 2 padding atoms, float32: the fixture's, the encoder's and the bfloat16 tests'
    batch (one shape, so ``outputs_and_forces`` compiles once for them)."""
    z, pos = molecule(0)
    return padded_batch(z, pos, 2, 3)


@pytest.fixture(scope="module")
def params():
    """Perturbed float32 parameters of the small PaiNN with both heads."""
    return perturb(jax.jit(MODEL.init)(jax.random.key(0), small_batch()))


# -------------------------------------------------------------------------------------------------
# Sizes, basis
# -------------------------------------------------------------------------------------------------


def test_parameter_counts_of_the_published_configuration():
    f, k, layers, max_z = 128, 20, 3, 100
    # Worked out from the architecture (kernels + biases):
    embedding = max_z * f  # 12,800
    phi = (f * f + f) + (f * 3 * f + 3 * f)  # Dense(F) -> SiLU -> Dense(3F): 66,048
    filt = k * 3 * f + 3 * f  # Dense(K -> 3F) on the RBF: 8,064
    mixing = 2 * f * f  # U and V, F -> F each, no bias: 32,768
    context = (2 * f * f + f) + (f * 3 * f + 3 * f)  # Dense(2F -> F) -> SiLU -> Dense(3F): 82,432
    expected = embedding + layers * (phi + filt + mixing + context)
    expected_shared = embedding + filt + layers * (phi + mixing + context)
    assert (expected, expected_shared) == (580_736, 564_608)

    z, pos = molecule(0, 3)
    args = [padded_batch(z, pos, 1, 1)[k] for k in ENCODER_KEYS]
    for shared, want in ((False, expected), (True, expected_shared)):
        model = PaiNN(hidden=f, num_layers=layers, num_rbf=k, max_z=max_z, shared_filters=shared)
        shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
        assert count_params(shapes) == want, shared
        rep = shapes["params"]
        assert ("filter_net" in rep) == shared
        assert ("filter_net" in rep["message_0"]) != shared


def test_shared_filters_is_a_config_key_of_painn_and_an_error_for_the_et():
    from experiments.configs import common
    from mspec.models import get_model

    config = common.model_config("tiny")
    config.update(name="painn", heads=("noise",), hidden=32, num_layers=2, num_rbf=8)
    z, pos = molecule(0, 3)
    batch = padded_batch(z, pos, 1, 1)
    counts = {}
    for shared in (False, True):
        config.shared_filters = shared
        model = get_model(config)
        counts[shared] = count_params(jax.eval_shape(model.init, jax.random.key(0), batch))
    # One filter network (8 RBF -> 3 x 32) instead of two.
    assert counts[False] - counts[True] == 8 * 96 + 96
    config.name = "et"
    with pytest.raises(ValueError, match="model.shared_filters is an option of the 'painn' backbone only"):
        get_model(config)


def test_sine_basis_and_its_limit_at_zero():
    r = np.array([0.0, 0.3, 1.7, 4.99, 5.0])
    n = np.arange(1, 9)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.sin(n * np.pi * r[:, None] / CUTOFF) / r[:, None]
    ref[0] = n * np.pi / CUTOFF  # the limit
    # Values and d/dr of every basis function, in one compile.
    rbf_and_grad = jax.jit(jax.vmap(jax.jacfwd(lambda x: sine_rbf(x, 8, CUTOFF), has_aux=False)))
    got = np.asarray(jax.jit(sine_rbf, static_argnums=(1, 2))(jnp.asarray(r, jnp.float32), 8, 5.0))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    g = np.asarray(rbf_and_grad(jnp.asarray(r, jnp.float32)))  # [5, 8]
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g[0], 0.0, atol=1e-6)  # sin(a r) / r is even in r: flat at 0


# -------------------------------------------------------------------------------------------------
# Against a plain numpy reference of the paper's equations
# -------------------------------------------------------------------------------------------------


def _silu(x):
    return x / (1.0 + np.exp(-x))


def painn_reference(p, z, pos, num_layers, num_rbf, cutoff):
    """PaiNN by the paper's equations, dense over all atom pairs ``j != i`` within the cutoff.

    ``p``: the encoder's parameters (numpy float64). Returns ``(s [n, F], v [n, 3, F])``.
    """

    def lin(d, x):
        return x @ d["kernel"] + d.get("bias", 0.0)

    n = len(z)
    s = p["embedding"]["embedding"][z]
    f = s.shape[1]
    v = np.zeros((n, 3, f))
    rel = pos[None, :, :] - pos[:, None, :]  # [i, j, 3] = pos_j - pos_i
    r = np.linalg.norm(rel, axis=-1)
    adj = (r < cutoff) & ~np.eye(n, dtype=bool)
    safe_r = np.where(adj, r, 1.0)
    unit = np.where(adj[..., None], rel / safe_r[..., None], 0.0)
    k = np.arange(1, num_rbf + 1)
    rbf = np.sin(k * np.pi * safe_r[..., None] / cutoff) / safe_r[..., None]  # [i, j, K]
    cut = np.where(adj, 0.5 * (np.cos(np.pi * r / cutoff) + 1.0), 0.0)
    for layer in range(num_layers):
        m, u = p[f"message_{layer}"], p[f"update_{layer}"]
        w = lin(m["filter_net"], rbf) * cut[..., None]  # [i, j, 3F]
        phi = lin(m["phi_2"], _silu(lin(m["phi_0"], s)))  # [n, 3F]
        x = phi[None, :, :] * w
        x_vv, x_s, x_vs = x[..., :f], x[..., f : 2 * f], x[..., 2 * f :]
        s = s + x_s.sum(1)
        v = v + np.einsum("ijf,jcf->icf", x_vv, v) + np.einsum("ijf,ijc->icf", x_vs, unit)
        uv, vv = np.split(v @ u["mixing"]["kernel"], 2, axis=-1)  # [n, 3, F] each
        vv_norm = np.sqrt((vv**2).sum(1) + 1e-8)
        a = lin(u["context_2"], _silu(lin(u["context_0"], np.concatenate([s, vv_norm], -1))))
        a_vv, a_sv, a_ss = a[:, :f], a[:, f : 2 * f], a[:, 2 * f :]
        v = v + a_vv[:, None, :] * uv
        s = s + a_sv * (uv * vv).sum(1) + a_ss
    return s, v


def test_matches_reference_equations(params):
    z, pos = molecule(1, 8, box=2.6)  # some pairs beyond the cutoff
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    assert np.any(d > CUTOFF)
    with jax.enable_x64(True):
        out = outputs_and_forces(to64(params), padded_batch(z, pos, 2, 4, np.float64))
        # To numpy inside the context: a jax op on float64 arrays outside it gives float32.
        out = jax.tree_util.tree_map(np.asarray, out)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    p = p["params"]["representation"]
    s_ref, v_ref = painn_reference(p, z, pos, SMALL["num_layers"], SMALL["num_rbf"], CUTOFF)
    np.testing.assert_allclose(np.asarray(out["x"][:8]), s_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(out["vec"][:8]), v_ref, rtol=1e-10, atol=1e-10)
    assert np.abs(v_ref).max() > 1e-2  # the vector stream is not trivially 0


# -------------------------------------------------------------------------------------------------
# Symmetries (float64), forces and heads
# -------------------------------------------------------------------------------------------------


def test_symmetries_forces_and_heads(params):
    """Rotations (proper and improper), translations and atom permutations.

    ``x``, the scalar head and the energy are invariant; ``vec``, the vector (noise) head and the
    forces rotate with the molecule (polar vectors: ``R y`` for improper ``R`` too); forces sum to
    0 (translation invariance) and padding atoms get exactly zero force.
    """
    z, pos = molecule(2, 8)
    n = len(z)
    p64 = to64(params)
    with jax.enable_x64(True):
        batch = padded_batch(z, pos, 2, 5, np.float64)

        def run(**changes):  # numpy inside the x64 context (jax ops outside give float32)
            return jax.tree_util.tree_map(
                np.asarray, outputs_and_forces(p64, {**batch, **changes})
            )

        out = run()
        rot = random_rotation(3)
        shift = np.array([0.7, -2.1, 3.3])
        cases = {"rotation": rot, "reflection": -rot, "rotoreflection": rot @ np.diag([1, 1, -1])}
        transformed = {
            name: (r_, run(positions=np.asarray(batch["positions"]) @ r_.T + shift))
            for name, r_ in cases.items()
        }
        # Permute the real atoms, remap the edges and shuffle the edge order.
        perm = np.random.default_rng(0).permutation(n)
        index = np.concatenate([perm, np.arange(n, n + 2)])  # new atom k is old atom index[k]
        inverse = np.argsort(index)
        order = np.random.default_rng(1).permutation(batch["senders"].shape[0])
        host = {k: np.asarray(v) for k, v in batch.items()}  # numpy: no eager jax ops
        permuted = run(
            atomic_numbers=host["atomic_numbers"][index],
            positions=host["positions"][index],
            node_mask=host["node_mask"][index],
            senders=inverse[host["senders"][order]].astype(np.int32),
            receivers=inverse[host["receivers"][order]].astype(np.int32),
            edge_mask=host["edge_mask"][order],
        )

    real = slice(0, n)
    assert np.all(np.isfinite(out["forces"])) and np.abs(out["forces"][real]).min() > 0
    assert np.all(out["forces"][n:] == 0.0)  # padding atoms influence nothing
    scale = np.abs(out["forces"]).max()
    assert np.abs(out["forces"].sum(0)).max() < 1e-10 * scale  # translation invariance
    assert np.abs(out["vec"][real]).max() > 1e-2 and np.abs(out["noise"][real]).max() > 1e-3

    for name, (r_, o) in transformed.items():
        for key in ("x", "scalar"):
            np.testing.assert_allclose(o[key][real], out[key][real], rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(o["energy"], out["energy"], rtol=1e-10)
        for key in ("vec", "noise", "forces"):
            assert rel_err(o[key][real], rotate(r_, out[key][real])) < 1e-10, (name, key)
    # Translation alone (the identity "rotation").
    with jax.enable_x64(True):
        moved = run(positions=np.asarray(batch["positions"]) + shift)
    for key in ("x", "vec", "scalar", "noise", "forces"):
        np.testing.assert_allclose(moved[key][real], out[key][real], atol=1e-10)

    for key in ("x", "vec", "scalar", "noise", "forces"):
        np.testing.assert_allclose(permuted[key][inverse[:n]], out[key][real], atol=1e-10)
    np.testing.assert_allclose(permuted["energy"], out["energy"], rtol=1e-12)


def test_shared_filters_are_equivariant(params):
    """One top-level ``filter_net`` used by every block (the unshared model's first filter)."""
    model = WithHeads(shared_filters=True)
    batch = small_batch()
    rep = dict(params["params"]["representation"])
    rep["filter_net"] = rep["message_0"]["filter_net"]
    for layer in range(SMALL["num_layers"]):
        rep[f"message_{layer}"] = {
            k: v for k, v in rep[f"message_{layer}"].items() if k != "filter_net"
        }
    shared = {"params": {**params["params"], "representation": rep}}
    shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
    assert jax.tree.structure(shapes) == jax.tree.structure(shared)

    apply = jax.jit(lambda p, pos: model.apply(p, {**batch, "positions": pos})[0])
    rot = random_rotation(5)
    out = apply(shared, batch["positions"])
    moved = apply(shared, batch["positions"] @ jnp.asarray(rot.T, jnp.float32))
    n = 7
    assert rel_err(moved["x"][:n], out["x"][:n]) < 1e-5
    assert rel_err(moved["vec"][:n], rotate(rot, out["vec"][:n])) < 1e-5
    assert rel_err(moved["noise"][:n], rotate(rot, out["noise"][:n])) < 1e-5
    # With layer-specific filters the outputs differ (the second block's filter changed).
    unshared = outputs_and_forces(params, batch)
    assert rel_err(out["x"][:n], unshared["x"][:n]) > 1e-3


# -------------------------------------------------------------------------------------------------
# Padding, masking, cutoff
# -------------------------------------------------------------------------------------------------


def test_padding_masked_edges_self_loops_and_skin_change_nothing(params):
    """The real atoms' outputs and forces are the same with and without: real self-loops
    (mask True), real edges beyond the cutoff (the pipeline's skin, mask True), padding atoms
    (one on top of a real atom, one near them with a non-zero Z) and masked edges between padding
    and real atoms in both directions. Gradients stay finite (the zero-length masked edge)."""
    z, pos = molecule(6, 7)
    pos = pos * np.array([2.2, 1.0, 1.0])  # stretched: some pairs between 5 and 7 Å
    n = len(z)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    assert np.any((d > CUTOFF) & (d < 7.0))

    s, r = pair_edges(pos, CUTOFF, self_loops=False)
    bare = batch_of(z, pos, s, r, np.ones(len(s), bool), np.ones(n, bool))

    # Padding atoms n (on atom 0), n + 1 (Z = 6, near atom 1), n + 2 (origin).
    pad_pos = np.stack([pos[0], pos[1] + [0.6, 0.5, 0.0], np.zeros(3)])
    s7, r7 = pair_edges(pos, 7.0, self_loops=True)  # relative order of the real edges kept
    masked = np.array([[n, 0], [n + 1, 1], [2, n + 1], [0, n], [n + 1, n], [n + 2, n + 2]])
    padded = batch_of(
        np.concatenate([z, [0, 6, 0]]),
        np.concatenate([pos, pad_pos]),
        np.concatenate([s7, masked[:, 0]]),
        np.concatenate([r7, masked[:, 1]]),
        np.arange(len(s7) + len(masked)) < len(s7),
        np.arange(n + 3) < n,
    )
    a, b = outputs_and_forces(params, bare), outputs_and_forces(params, padded)
    for key in ("x", "vec", "scalar", "noise", "forces"):
        np.testing.assert_allclose(
            np.asarray(b[key][:n]), np.asarray(a[key][:n]), rtol=1e-6, atol=1e-6, err_msg=key
        )
    assert np.all(np.isfinite(np.asarray(b["forces"])))
    assert np.all(np.asarray(b["forces"][n:]) == 0.0)

    # Parameter gradients are finite too (padding atoms, zero-length and masked edges), and
    # equal without them.
    for g, g_bare in zip(
        jax.tree_util.tree_leaves(b["param_grads"]), jax.tree_util.tree_leaves(a["param_grads"])
    ):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_bare), rtol=1e-5, atol=1e-5)


def test_cutoff_is_smooth(params):
    """Atom 2 moves along a line through the cutoff sphere of atom 1 (atom 0 stays out of its
    reach): the outputs approach the no-edge values continuously (the edge's effect decays like
    ``delta^2`` as ``r -> r_c``) and are exactly those beyond the cutoff; the force on atom 2
    vanishes at the cutoff too."""
    z = np.array([6, 8, 7], np.int32)
    direction = np.array([0.6, 0.0, 0.8])
    base = np.array([[-1.2, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    deltas = np.array([0.5, 0.1, 0.01, 1e-3, -1e-4, -0.3])  # r = r_c - delta
    positions = np.stack([base + np.outer([0, 0, 1], (CUTOFF - dl) * direction) for dl in deltas])
    assert np.linalg.norm(positions[-1, 2] - positions[-1, 0]) > CUTOFF
    s, r = pair_edges(np.zeros((3, 3)), 1.0, self_loops=True)  # all 9 edges, mask True
    with jax.enable_x64(True):
        batch = batch_of(z, base, s, r, np.ones(9, bool), np.ones(3, bool), np.float64)
        axes = {k: 0 if k == "positions" else None for k in batch}
        many = jax.jit(jax.vmap(_outputs_and_forces, in_axes=(None, axes)))
        out = many(to64(params), {**batch, "positions": jnp.asarray(positions)})
        out = jax.tree_util.tree_map(np.asarray, out)

    del out["param_grads"]
    far = {k: v[-1] for k, v in out.items()}
    for key in ("x", "vec", "noise", "forces"):  # beyond r_c: as with no edge at all
        np.testing.assert_allclose(out[key][-2], far[key], rtol=1e-13, atol=1e-14, err_msg=key)
    for key in ("x", "vec", "noise"):
        diff = [np.abs(out[key][i] - far[key]).max() for i in range(4)]
        scale = np.abs(far[key]).max()
        assert diff[0] > 1e-3 * scale, key  # the edge matters inside the cutoff
        assert diff[1] < diff[0] and diff[2] < 0.03 * diff[1] and diff[3] < 0.03 * diff[2], diff
        assert diff[3] < 1e-6 * scale, key
    f2 = np.linalg.norm(out["forces"][:, 2], axis=-1)
    assert f2[0] > 0 and f2[-1] == 0.0 and f2[3] < 1e-2 * f2[0], f2


# -------------------------------------------------------------------------------------------------
# Mixed precision
# -------------------------------------------------------------------------------------------------


def test_bfloat16_compute_keeps_float32_outputs(params):
    batch = small_batch()
    bf16 = WithHeads(dtype=jnp.bfloat16)

    def run(pos):
        out, e = bf16.apply(params, {**batch, "positions": pos})
        return e, out

    (_, out), grad = jax.jit(jax.value_and_grad(run, has_aux=True))(batch["positions"])
    ref = outputs_and_forces(params, batch)
    assert out["x"].dtype == jnp.float32 and out["vec"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(grad)))
    n = 7
    errors = [
        rel_err(out["x"][:n], ref["x"][:n]),
        rel_err(out["vec"][:n], ref["vec"][:n]),
        rel_err(-grad[:n], ref["forces"][:n]),
    ]
    assert errors[0] < 3e-2 and errors[1] < 5e-2 and errors[2] < 1e-1, errors


def test_encoder_alone_matches_and_ignores_num_pairs(params):
    """The bare encoder (what Model builds) gives the same features; num_pairs changes nothing."""
    batch = small_batch()
    enc = PaiNN(**SMALL)
    rep = {"params": params["params"]["representation"]}
    args = [batch[k] for k in ENCODER_KEYS]
    both = jax.jit(lambda p, *a: (enc.apply(p, *a), enc.apply(p, *a, num_pairs=3)))
    (x, vec), (x_p, vec_p) = both(rep, *args)
    ref = outputs_and_forces(params, batch)
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref["x"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vec), np.asarray(ref["vec"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(vec_p), np.asarray(vec))
    np.testing.assert_array_equal(np.asarray(x_p), np.asarray(x))
    assert x.shape == (9, F) and vec.shape == (9, 3, F)
    assert x.dtype == jnp.float32 and vec.dtype == jnp.float32


# Every task with the PaiNN backbone (the tiny configs with only ``model.name`` changed: Frad,
# Coord, MolSpectra stage 2, QM9 and MD17 fine-tuning) runs in
# tests/test_configs.py::test_every_task_runs_with_painn_and_every_config_key_is_read.
