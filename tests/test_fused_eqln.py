"""The fused equivariant-layer-norm kernels (mspec/kernels/eqln.cc) against the XLA formulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mspec.kernels import build
from mspec.kernels import eqln as fused_eqln
from mspec.models.et import EquivariantLayerNorm

needs_kernel = pytest.mark.skipif(
    not build.available(), reason=f"fused kernels unavailable here: {build._error}"
)


def _features(seed=0, n=37, f=48):
    """Random vector features with the awkward rows of a real batch: all-zero rows (padding
    atoms), a rank-1 row (a planar/collinear atom) and a constant row (mean only)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3, f)).astype(np.float32) * rng.uniform(0.01, 2.0, size=(n, 1, 1))
    v[-3:] = 0.0
    v[5] = np.outer(rng.normal(size=3), rng.normal(size=f))
    v[6] = 0.7
    return jnp.asarray(v.astype(np.float32)), rng


def _value_and_grads(fused, vec, weight, c):
    norm = EquivariantLayerNorm()

    def loss(vec, weight):
        out = norm.apply({"params": {"weight": weight}}, vec, "fused" if fused else "xla")
        return jnp.sum(out * c) + 0.5 * jnp.sum(out**2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(vec, weight)


@needs_kernel
def test_fused_eqln_matches_xla_values_and_gradients():
    vec, rng = _features()
    weight = jnp.asarray(rng.uniform(0.5, 1.5, size=vec.shape[-1]).astype(np.float32))
    c = jnp.asarray(rng.normal(size=vec.shape).astype(np.float32))
    norm = EquivariantLayerNorm()
    params = {"params": {"weight": weight}}
    out_x, out_f = norm.apply(params, vec, False), norm.apply(params, vec, True)
    np.testing.assert_allclose(out_f, out_x, atol=2e-5 * float(jnp.abs(out_x).max()), rtol=0)
    (lx, (gvx, gwx)), (lf, (gvf, gwf)) = (_value_and_grads(m, vec, weight, c) for m in (False, True))
    np.testing.assert_allclose(lf, lx, rtol=1e-5)
    np.testing.assert_allclose(gwf, gwx, atol=1e-5 * float(jnp.abs(gwx).max()), rtol=0)
    # Per atom: the rank-1 atom 5 is whitened along two directions with eigenvalue ~0, where the
    # layer amplifies float rounding ~1 / sqrt(1e-5) (EquivariantLayerNorm's docstring): its
    # gradient agrees to ~3e-3 relative; every other atom to float rounding.
    gvx, gvf = np.asarray(gvx), np.asarray(gvf)
    for atom in range(vec.shape[0]):
        tol = (5e-2 if atom == 5 else 1e-5) * (np.abs(gvx[atom]).max() + 1e-12)
        np.testing.assert_allclose(gvf[atom], gvx[atom], atol=tol, rtol=0, err_msg=f"atom {atom}")
    assert np.all(np.asarray(out_f[-3:]) == 0.0)  # padding atoms stay exactly zero


@needs_kernel
def test_fused_eqln_pieces_match_their_formulas():
    vec, rng = _features(seed=1, n=20, f=32)
    vc = vec - jnp.mean(vec, axis=-1, keepdims=True)
    np.testing.assert_allclose(
        fused_eqln.eqln_covariance(vec), jnp.einsum("nif,njf->nij", vc, vc) / 32, atol=1e-5
    )
    mat = jnp.asarray(rng.normal(size=(20, 3, 3)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=32).astype(np.float32))
    np.testing.assert_allclose(
        fused_eqln.eqln_apply(vec, mat, w), w * jnp.einsum("nij,njf->nif", mat, vc), atol=1e-5
    )
    # Gradients of each piece against autodiff of its formula.
    g = jnp.asarray(rng.normal(size=(20, 3, 32)).astype(np.float32))
    gc = jnp.asarray(rng.normal(size=(20, 3, 3)).astype(np.float32))
    ref_apply = lambda v, m, w: w * jnp.einsum("nij,njf->nif", m, v - jnp.mean(v, -1, keepdims=True))
    ref_cov = lambda v: jnp.einsum(
        "nif,njf->nij", v - jnp.mean(v, -1, keepdims=True), v - jnp.mean(v, -1, keepdims=True)
    ) / 32
    for fused_fn, ref_fn, args, ct in (
        (fused_eqln.eqln_apply, ref_apply, (vec, mat, w), g),
        (fused_eqln.eqln_covariance, ref_cov, (vec,), gc),
    ):
        _, vjp_f = jax.vjp(fused_fn, *args)
        _, vjp_r = jax.vjp(ref_fn, *args)
        for a, b in zip(vjp_r(ct), vjp_f(ct)):
            np.testing.assert_allclose(b, a, atol=1e-5 * float(jnp.abs(a).max()), rtol=0)


@needs_kernel
def test_fused_eqln_is_bitwise_repeatable():
    vec, rng = _features(seed=2, n=301, f=64)
    weight = jnp.ones((64,), jnp.float32)
    c = jnp.asarray(rng.normal(size=vec.shape).astype(np.float32))
    a = _value_and_grads(True, vec, weight, c)
    b = _value_and_grads(True, vec, weight, c)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_fused_eqln_shapes_are_checked():
    vec = jnp.zeros((4, 3, 8), jnp.float32)
    with pytest.raises(ValueError, match="float32"):
        fused_eqln.eqln_covariance(jnp.zeros((4, 2, 8), jnp.float32))
    with pytest.raises(ValueError, match=r"\(4, 3, 3\) and \(8,\)"):
        fused_eqln.eqln_apply(vec, jnp.zeros((4, 3, 3)), jnp.zeros((7,)))


@needs_kernel
def test_fused_eqln_second_derivatives_match_xla():
    """A loss of the layer's gradients (as a force loss is) differentiated once more: the kernels'
    backward passes are differentiable, through the XLA formulation."""
    vec, rng = _features(seed=2)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, size=vec.shape[-1]).astype(np.float32))
    c = jnp.asarray(rng.normal(size=vec.shape).astype(np.float32))
    norm = EquivariantLayerNorm()

    def second(implementation):
        def loss(vec, weight):
            out = norm.apply({"params": {"weight": weight}}, vec, implementation)
            return jnp.sum(out * c)

        def outer(vec, weight):
            gv, gw = jax.grad(loss, argnums=(0, 1))(vec, weight)
            return jnp.sum(gv * c) + jnp.sum(gw ** 2)

        return jax.jit(jax.grad(outer, argnums=(0, 1)))(vec, weight)

    (gvx, gwx), (gvf, gwf) = second("xla"), second("fused")
    np.testing.assert_allclose(gwf, gwx, atol=1e-4 * float(jnp.abs(gwx).max()), rtol=0)
    gvx, gvf = np.asarray(gvx), np.asarray(gvf)
    for atom in range(vec.shape[0]):
        # The rank-1 atom 5: round-off amplified, as in the first-order test.
        tol = (5e-2 if atom == 5 else 1e-4) * (np.abs(gvx[atom]).max() + 1e-12)
        np.testing.assert_allclose(gvf[atom], gvx[atom], atol=tol, rtol=0, err_msg=f"atom {atom}")
