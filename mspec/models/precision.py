"""Mixed precision of the ET and its heads (``model.dtype``): compute dtypes and the few places
where a bfloat16 computation keeps float32.

Flax's convention: a module's ``dtype`` is its compute dtype (inputs and parameters are cast to
it), ``param_dtype`` (float32 here, always) the dtype parameters are stored and trained in.
``dtype=None`` computes in the dtype of the inputs and parameters: float32 for every config,
float64 in the parity runs under ``jax_enable_x64``. With ``dtype=jnp.bfloat16`` the matmuls
and the per-edge work run in bfloat16 while every sum over atoms or edges accumulates in float32:
the message segment sums (:func:`sum_dtype`), their transposes in the backward pass
(:func:`gather_rows`) and the bias gradients (:class:`Dense`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# ``model.dtype`` -> the modules' compute dtype. "float32" is None, the dtype of the inputs and
# parameters, so that the float64 parity runs (jax_enable_x64) stay float64.
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(name: Any) -> Any:
    """The modules' ``dtype`` for ``model.dtype`` (a name or a dtype); a clear error otherwise."""
    key = name if isinstance(name, str) else jnp.dtype(name).name
    if key not in COMPUTE_DTYPES:
        raise ValueError(f"Unknown model dtype {name!r}; expected one of {tuple(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[key]


def sum_dtype(dtype: Any) -> jnp.dtype:
    """The dtype sums of ``dtype`` values accumulate in: float32 for bfloat16, otherwise the
    values' own (float32, or float64 in the parity runs)."""
    return jnp.promote_types(dtype, jnp.float32)


def in_dtype(dtype: Any, *arrays: Array) -> tuple[Array, ...]:
    """``arrays`` cast to the compute ``dtype``; unchanged when it is None (float32 models)."""
    return arrays if dtype is None else tuple(a.astype(dtype) for a in arrays)


def gather_rows(x: Array, index: Array) -> Array:
    """``x[index]``, whose backward pass (a segment sum of the cotangents over ``index``)
    accumulates in float32 when ``x`` is bfloat16.

    The rows are gathered from a float32 copy and rounded back, which is exact; the transpose is
    then a float32 scatter-add, rounded to bfloat16 once. For float32 ``x`` this is ``x[index]``.

    Args:
        x: ``[N, ...]``.
        index: ``[E]`` int rows.

    Returns:
        ``[E, ...]`` in ``x``'s dtype.
    """
    return x.astype(sum_dtype(x.dtype))[index].astype(x.dtype)


def _float32_bias(inputs, kernel, bias, *, dtype=None, inexact=True):
    """Flax's ``promote_dtype`` for :class:`Dense`, except that with a compute ``dtype`` the bias
    keeps its float32."""
    if dtype is None:
        return nn.dtypes.promote_dtype(inputs, kernel, bias, inexact=inexact)
    inputs, kernel = nn.dtypes.promote_dtype(inputs, kernel, dtype=dtype, inexact=inexact)
    return inputs, kernel, bias


class Dense(nn.Dense):
    """``nn.Dense`` (the same parameters) that, with a compute ``dtype``, adds its float32 bias in
    float32 and rounds the sum to ``dtype``: the bias gradient, a sum over every row of the
    batch, then accumulates in float32. ``dtype=None``: exactly ``nn.Dense``.
    """

    promote_dtype: Any = _float32_bias

    def __call__(self, inputs: Array) -> Array:
        y = super().__call__(inputs)
        return y if self.dtype is None else y.astype(self.dtype)
