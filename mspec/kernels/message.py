"""The message passing of one ET attention layer as a fused C++ kernel for XLA:CPU.

The ET's definition is :func:`mspec.models.et.message_passing_xla` (XLA ops, any backend); this
module is its CPU implementation, selected by ``EquivariantTransformer(message_passing=...)``.

Given per-atom projections and per-edge filters, both compute (edge e = j -> i, heads h, head
width D, channel c = h D + d):

* ``a_e,h = SiLU(sum_d q_i k_j dk_e) * cut_e * mask_e`` (no softmax, no 1/sqrt(D));
* ``[s | g | t]_e = u_j * dv_e`` (per head, each ``[D]``);
* ``x_agg_i = sum_e s_e a_e``  ``[N, F]``;
* ``vec_agg_i = sum_e (vec_j g_e + t_e unit_e) mask_e``  ``[N, 3, F]``.

:func:`mspec.models.et.message_passing_xla` (the definition) writes this with gathers and
segment sums; XLA:CPU materialises several
``[E, 3, F]`` tensors per layer for it, forward and backward. :func:`message_fused` takes the
filters before their bias and SiLU, as one GEMM writes them (``[pk | pv]``, ``[R, 4F]``, with
``dk = SiLU(pk + bk)``, ``dv = SiLU(pv + bv)``), and runs everything as two
XLA FFI custom calls (``mspec/kernels/et_message.cc``): by default one thread per molecule
(connected component), one pass over its edges forward and one backward, the SiLU of each filter
row (both directions of an atom pair share one, see :func:`mspec.graph.pack`) computed once;
nothing ``[E, 3, F]`` in memory, every sum in a fixed order (bitwise-repeatable steps). Measured on
2 cores (``benchmarks/message_passing.py``, BENCHMARKS.md): one layer forward and backward 5.3x
and 6.0x faster than the XLA ops at batch 128 (two kernel versions); with it the default QM9-size train step ran at
1.9-2.3x torchmd-net 3.1.0's in six runs. The parallel loops run on XLA's own
intra-op thread pool. Its backward gives the
first-order gradients of every float input (the denoising losses, forces by autodiff), and is
itself differentiable once more, as training on forces needs (the force loss differentiates a
gradient): its VJP is a third kernel (``mspec_et_message_2nd``), which for a direction ``t`` of
the inputs computes, in one pass per molecule, the forward's tangent ``J t`` (the cotangent of
the output cotangents) and the tangent of every backward output, ``H t`` for the Hessian of
``<cotangents, forward>`` (the cotangent of the inputs; ``H`` is symmetric). A third derivative
is not implemented. The MD17 force step runs 2-3x faster than with XLA ops (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from mspec import graph
from mspec.kernels import build

Array = jax.Array

MESSAGE_PASSING = ("auto", "xla", "fused")


_fallback_noted = False


def use_fused(message_passing: str, dtype) -> bool:
    """Whether a model with this ``message_passing`` setting runs the fused kernel.

    ``"auto"``: on the CPU backend with float32 features, when the kernel builds (otherwise XLA,
    with one log line saying why). ``"fused"``: always, or a clear error when it cannot run here.
    """
    global _fallback_noted
    if message_passing not in MESSAGE_PASSING:
        raise ValueError(
            f"Unknown message_passing {message_passing!r}; expected one of {MESSAGE_PASSING}."
        )
    if message_passing == "xla":
        return False
    backend = jax.default_backend()
    reason = None
    if backend != "cpu":
        if message_passing == "auto":
            return False  # "auto" means XLA ops on accelerators: nothing to warn about
        reason = f"the fused kernel runs on CPU only, this is {backend}"
    elif jnp.dtype(dtype) != jnp.float32:
        reason = f"the fused kernel is float32 only, the features are {jnp.dtype(dtype).name}"
    else:
        try:
            build.load()
        except build.KernelUnavailable as e:
            reason = f"the fused kernel is unavailable: {e}"
    if reason is None:
        return True
    if message_passing == "fused":
        raise build.KernelUnavailable(f"model.message_passing='fused': {reason}")
    if not _fallback_noted:
        _fallback_noted = True
        logging.getLogger("mspec").warning("message passing with XLA ops (%s)", reason)
    return False


def _varying(x: Array) -> frozenset:
    """The mesh axes ``x`` varies over inside ``shard_map`` (empty outside)."""
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def match_vma(out: Array, *refs: Array) -> Array:
    """Gives a custom call's result the varying mesh axes of its inputs: under ``shard_map``
    the FFI call returns device-invariant types, which autodiff would not accept."""
    axes = frozenset().union(*(_varying(r) for r in refs)) - _varying(out)
    return jax.lax.pcast(out, tuple(sorted(axes)), to="varying") if axes else out


def f32_shape(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _filter_rows(num_edges: int, num_nodes: int, pairs: int | None):
    """``(frow [E], rowperm [E], rowptr [R + 1])`` int32 numpy: each edge's filter row, and the
    edges grouped by row (those of row r are ``rowperm[rowptr[r]:rowptr[r + 1]]``)."""
    if pairs is None:
        frow, rows = np.arange(num_edges, dtype=np.int32), num_edges
    else:
        if graph.num_pairs(num_edges, num_nodes) != pairs:
            raise ValueError(f"pairs={pairs} does not match {num_edges} edges and {num_nodes} nodes")
        frow, rows = graph.pair_filter_rows(num_edges, num_nodes), pairs + 1
    rowperm = np.argsort(frow, kind="stable").astype(np.int32)
    rowptr = np.searchsorted(frow[rowperm], np.arange(rows + 1)).astype(np.int32)
    return frow, rowperm, rowptr


SCHEDULES = {"auto": 0, "components": 1, "passes": 2}


@functools.partial(jax.custom_vjp, nondiff_argnums=(14, 15))
def _fused(q, k, u, vec, pkv, bias, unit, cut, mask, senders, receivers, frow, rowperm, rowptr, heads, schedule):
    n, f = q.shape
    ins = (q, k, u, vec, pkv, bias, unit, cut, mask, senders, receivers, frow, rowperm, rowptr)
    out = jax.ffi.ffi_call(
        "mspec_et_message_fwd", (f32_shape(n, f), f32_shape(n, 3, f)), vmap_method="sequential"
    )(*ins, heads=heads, schedule=schedule)
    return tuple(match_vma(o, *ins) for o in out)


def _fused_fwd(q, k, u, vec, pkv, bias, unit, cut, mask, senders, receivers, frow, rowperm, rowptr, heads, schedule):
    args = (q, k, u, vec, pkv, bias, unit, cut, mask, senders, receivers, frow, rowperm, rowptr)
    return _fused(*args, heads, schedule), args


def _fused_bwd(heads, schedule, res, cts):
    grads = _backward(*res, *cts, heads, schedule)
    return (*grads, jnp.zeros_like(res[8]), None, None, None, None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(16, 17))
def _backward(q, k, u, vec, pkv, bias, unit, cut, mask, senders, receivers, frow, rowperm, rowptr, gx, gv, heads, schedule):
    """The cotangents of ``(q, k, u, vec, pkv, bias, unit, cut)`` given those of the outputs,
    ``(gx, gv)``: the kernel's backward, itself differentiable once more (``_backward_bwd``)."""
    n, f = q.shape
    e = senders.shape[0]
    r = pkv.shape[0]
    args = (q, k, u, vec, pkv, bias, unit, cut, mask, senders, receivers, frow, rowperm, rowptr, gx, gv)
    grads = jax.ffi.ffi_call(
        "mspec_et_message_bwd",
        tuple(
            f32_shape(*shape)
            for shape in ((n, f), (n, f), (n, 3 * f), (n, 3, f), (r, 4 * f), (4 * f,), (e, 3), (e,))
        ),
        vmap_method="sequential",
    )(*args, heads=heads, schedule=schedule)
    return tuple(match_vma(g, p) for g, p in zip(grads, (q, k, u, vec, pkv, bias, unit, cut)))


def _backward_fwd(*args):
    *inputs, heads, schedule = args
    return _backward(*inputs, heads, schedule), tuple(inputs)


def _backward_bwd(heads, schedule, res, cts):
    """VJP of the backward at the cotangents ``cts`` of its eight outputs (a direction of the
    inputs): ``(gx, gv)`` get the forward's tangent ``J cts``, the inputs the Hessian of
    ``<(gx, gv), forward>`` times ``cts`` (``mspec_et_message_2nd``; its own derivative is not
    implemented)."""
    q, k, u, vec, pkv, bias, unit, cut, mask, senders, receivers, frow, rowperm, rowptr, gx, gv = res
    n, f = q.shape
    e = senders.shape[0]
    r = pkv.shape[0]
    shapes = ((n, f), (n, 3, f), (n, f), (n, f), (n, 3 * f), (n, 3, f), (r, 4 * f), (4 * f,), (e, 3), (e,))
    out = jax.ffi.ffi_call(
        "mspec_et_message_2nd", tuple(f32_shape(*sh) for sh in shapes), vmap_method="sequential"
    )(*res, *cts, heads=heads)
    refs = (gx, gv, q, k, u, vec, pkv, bias, unit, cut)
    tx, tv, *hess = (match_vma(o, p) for o, p in zip(out, refs))
    return (*hess, jnp.zeros_like(mask), None, None, None, None, None, tx, tv)


_backward.defvjp(_backward_fwd, _backward_bwd)


_fused.defvjp(_fused_fwd, _fused_bwd)


def message_fused(
    q, k, u, vec, filters, filter_bias, unit, cut, mask, senders, receivers, heads: int,
    pairs: int | None = None, schedule: str = "auto",
):
    """``mspec.models.et.message_passing_xla(q, k, u, vec, dk, dv, ...)`` as fused XLA:CPU kernels (float32, CPU only),
    with ``dk = SiLU(filters[:, :F] + filter_bias[:F])`` and
    ``dv = SiLU(filters[:, F:] + filter_bias[F:])``.

    ``filters [R, 4F]`` are the rows ``[pk | pv]`` of the ``dk_proj`` and ``dv_proj`` Linears
    before their bias, as one GEMM of the radial basis with the two kernels side by side writes
    them; ``filter_bias [4F]`` is the two biases side by side. The kernel adds the bias and
    applies the SiLU (and its derivative) on the fly, so the activated filters never go to
    memory; its backward returns the cotangent of every row and, summed over the rows, of the
    bias.

    ``pairs=None``: ``R = E``, one filter row per edge. ``pairs=P``: the edges are in the pair
    layout of :func:`mspec.graph.pack` and ``R = P + 1``: one row per atom pair plus one for the
    self-loops (:func:`mspec.graph.pair_filter_rows`); the kernel sums their cotangents over the
    edges of each row itself. Edges may come in any order.

    ``schedule`` (how the work is spread over the threads; the two agree to float rounding, and
    each is bitwise repeatable): ``"components"`` gives each connected component of the active edges
    (each molecule of a packed batch) to one thread, which then runs the forward and the
    backward in one pass over the component's edges, computing the SiLU of each filter row once;
    ``"passes"`` runs over receivers (forward) and over filter rows, receivers and senders
    (backward), which spreads one big component over all threads; ``"auto"`` picks
    ``components`` unless one component holds more than 1/8 of the active edges (a rule that looks
    at the batch only, so results never depend on the thread count).

    Raises :class:`mspec.kernels.build.KernelUnavailable` when the kernels cannot be built here.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; expected one of {tuple(SCHEDULES)}")
    n, e = q.shape[0], senders.shape[0]
    frow, rowperm, rowptr = _filter_rows(e, n, pairs)
    rows = len(rowptr) - 1
    width = 4 * q.shape[1]
    if filters.shape != (rows, width) or filter_bias.shape != (width,):
        raise ValueError(
            f"filters {filters.shape} and filter_bias {filter_bias.shape} must be "
            f"({rows}, {width}) and ({width},): {rows} filter rows of [pk | pv]"
        )
    build.load()
    # Under shard_map the bias (a parameter) is device-invariant while the rows vary: mark it
    # varying here, so that autodiff sums its per-device cotangents over the devices (the
    # transpose of this cast), as it does for the weights.
    filter_bias = match_vma(filter_bias, filters, q)
    f32 = lambda a: a.astype(jnp.float32)
    i32 = lambda a: a.astype(jnp.int32)
    return _fused(
        q, k, u, vec, filters, filter_bias, unit, f32(cut), f32(mask), i32(senders), i32(receivers),
        jnp.asarray(frow), jnp.asarray(rowperm), jnp.asarray(rowptr), int(heads), SCHEDULES[schedule],
    )
