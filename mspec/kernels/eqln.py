"""The ``[N, 3, F]`` parts of the whitened equivariant layer norm as fused XLA:CPU kernels.

:class:`mspec.models.et.EquivariantLayerNorm` computes, per atom, with ``vc = v - mean_F(v)``::

    C   = vc vc^T / F                       (eqln_covariance)
    M   = (C + eps diag(1, 2, 3))^-1/2      (3 x 3, in JAX: _inv_sqrt_psd and its custom JVP)
    out = w * (M vc)                        (eqln_apply)

XLA runs the two ``[N, 3, F]`` steps as batched 3 x 3 GEMMs, centring and weighting passes, and
as many again backward; the kernels of ``mspec/kernels/eqln.cc`` do each in one pass per atom.
The cotangents (the centring's derivative included):

* covariance: ``d v = (G + G^T) vc / F`` for ``G = d C``;
* apply: with ``u = w * g``: ``d M = u vc^T``, ``d v = M^T u - mean_F(M^T u)``,
  ``d w = sum over atoms and components of g * (M vc)``.

float32 on CPU (``jax.custom_vjp``); the model uses them on the same condition as the fused
message passing (:func:`mspec.kernels.message.use_fused`). The kernels' backward passes are
differentiable once more through the XLA formulation (``_twice_differentiable``), as training on
forces needs. Tests compare values, gradients and second derivatives with the XLA formulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mspec.kernels import build
from mspec.kernels.message import f32_shape, match_vma

Array = jax.Array


def _check(vec: Array) -> None:
    if vec.ndim != 3 or vec.shape[1] != 3 or vec.dtype != jnp.float32:
        raise ValueError(f"vector features must be float32 [N, 3, F], got {vec.dtype} {vec.shape}")


@jax.custom_vjp
def _covariance(vec):
    n = vec.shape[0]
    out = jax.ffi.ffi_call("mspec_eqln_cov", f32_shape(n, 3, 3), vmap_method="sequential")(vec)
    return match_vma(out, vec)


def _covariance_fwd(vec):
    return _covariance(vec), vec


def _covariance_bwd(vec, g):
    return (_covariance_grad(vec, g),)


def _covariance_xla(vec):
    vc = vec - jnp.mean(vec, axis=-1, keepdims=True)
    return jnp.einsum("nif,njf->nij", vc, vc) / vec.shape[-1]


def _apply_xla(vec, mat, weight):
    vc = vec - jnp.mean(vec, axis=-1, keepdims=True)
    return weight * jnp.einsum("nij,njf->nif", mat, vc)


def _twice_differentiable(kernel_bwd, definition):
    """``kernel_bwd(*primals, cotangent)`` (an FFI backward) as a function whose own VJP is that
    of the XLA formulation's backward, ``vjp(definition, *primals)(cotangent)``: the second
    derivative (training on forces) runs XLA ops, for these per-atom ``[N, 3, F]`` steps a small
    cost next to the message passing."""

    @jax.custom_vjp
    def grad(*args):
        return kernel_bwd(*args)

    def grad_bwd(args, cts):
        def xla_grad(*a):
            *primals, ct = a
            out = jax.vjp(definition, *primals)[1](ct)
            return out[0] if len(out) == 1 else out

        return jax.vjp(xla_grad, *args)[1](cts)

    grad.defvjp(lambda *args: (grad(*args), args), grad_bwd)
    return grad


def _covariance_kernel_grad(vec, g):
    gvec = jax.ffi.ffi_call(
        "mspec_eqln_cov_bwd", f32_shape(*vec.shape), vmap_method="sequential"
    )(vec, g)
    return match_vma(gvec, vec)


_covariance_grad = _twice_differentiable(_covariance_kernel_grad, _covariance_xla)


_covariance.defvjp(_covariance_fwd, _covariance_bwd)


@jax.custom_vjp
def _apply(vec, mat, weight):
    out = jax.ffi.ffi_call("mspec_eqln_apply", f32_shape(*vec.shape), vmap_method="sequential")(
        vec, mat, weight
    )
    return match_vma(out, vec, mat, weight)


def _apply_fwd(vec, mat, weight):
    return _apply(vec, mat, weight), (vec, mat, weight)


def _apply_bwd(res, g):
    return _apply_grad(*res, g)


def _apply_kernel_grad(vec, mat, weight, g):
    gvec, gmat, gweight = jax.ffi.ffi_call(
        "mspec_eqln_apply_bwd",
        (f32_shape(*vec.shape), f32_shape(*mat.shape), f32_shape(*weight.shape)),
        vmap_method="sequential",
    )(vec, mat, weight, g)
    return match_vma(gvec, vec), match_vma(gmat, mat), match_vma(gweight, weight)


_apply_grad = _twice_differentiable(_apply_kernel_grad, _apply_xla)


_apply.defvjp(_apply_fwd, _apply_bwd)


def eqln_covariance(vec: Array) -> Array:
    """``vc vc^T / F`` per atom, ``vc = vec - mean_F(vec)``: ``vec [N, 3, F]`` -> ``[N, 3, 3]``."""
    _check(vec)
    build.load()
    return _covariance(vec)


def eqln_apply(vec: Array, mat: Array, weight: Array) -> Array:
    """``weight * (mat @ (vec - mean_F(vec)))`` per atom: ``vec [N, 3, F]``, ``mat [N, 3, 3]``,
    ``weight [F]`` -> ``[N, 3, F]``."""
    _check(vec)
    n, _, f = vec.shape
    if mat.shape != (n, 3, 3) or weight.shape != (f,):
        raise ValueError(
            f"mat {mat.shape} and weight {weight.shape} must be ({n}, 3, 3) and ({f},)"
        )
    build.load()
    # Under shard_map the weight (a parameter) is device-invariant: mark it varying so that
    # autodiff sums its per-device cotangents (as for the message kernel's filter bias).
    weight = match_vma(weight.astype(jnp.float32), vec)
    return _apply(vec, mat.astype(jnp.float32), weight)
