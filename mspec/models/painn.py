"""PaiNN encoder (polarizable atom interaction neural network).

Schütt, Unke, Gastegger, "Equivariant message passing for the prediction of tensorial properties
and molecular spectra", ICML 2021 (arXiv:2102.03150): its message and update blocks, laid out
like schnetpack's ``schnetpack.representation.PaiNN`` where the paper leaves a choice open.

Notation: N atoms, E directed edges, F hidden width, K radial basis functions, L interaction
blocks. Edges are directed ``j -> i`` with ``j = senders[e]`` (source) and ``i = receivers[e]``
(target); messages are summed at the target with ``jax.ops.segment_sum``. Scalars are
``s [N, F]``, vectors ``v [N, 3, F]`` (spatial axis before the channel axis, as in the ET), so
every Linear acts on the last (channel) axis and commutes with rotations of the spatial axis.

Geometry (shared with the ET, :func:`mspec.models.et.edge_geometry`): the edge vector is
``r_ij = pos[j] - pos[i]`` (sender minus receiver), ``unit_ij = r_ij / |r_ij|``. schnetpack uses
the same convention (``R[idx_j] - R[idx_i]``), so the vector features point the same way as the
ET's and as schnetpack's.

Per block ``l`` (residual updates; ``W`` is a per-layer filter unless ``shared_filters``):

* message: ``[x_vv | x_s | x_vs] = phi(s_j) * W(r_ij)`` with ``phi = Dense(3F) o SiLU o Dense(F)``
  and ``W(r) = Dense(3F)(rbf(r)) * C(r)``;
  ``s_i += sum_j x_s``, ``v_i += sum_j (x_vv * v_j + x_vs * unit_ij)``;
* update: ``[U v | V v] = Dense(2F, no bias)(v)`` on each Cartesian component,
  ``[a_vv | a_sv | a_ss] = Dense(3F) o SiLU o Dense(F) ([s || ||V v||])``;
  ``v += a_vv * U v``, ``s += a_sv * <U v, V v> + a_ss`` (``<.,.>`` over xyz).

Radial features: ``rbf_n(r) = sin(n pi r / r_c) / r`` (n = 1..K, with its limit ``n pi / r_c`` at
``r = 0``) and the cosine cutoff ``C(r) = 0.5 (cos(pi r / r_c) + 1)`` for ``r < r_c``, else 0.

Padding and masking contract (as the ET's, see :mod:`mspec.types`):

* An edge is *active* iff ``edge_mask`` is True, it is not a self-loop (``senders != receivers``;
  PaiNN sums over neighbours ``j != i``, while the pipeline's edge lists carry one self-loop per
  atom for the ET) and its length is below the cutoff (the pipeline builds edges with a skin).
* The filter ``W`` is multiplied by the activity mask, so every message of an inactive edge is
  exactly 0 (the filter's bias alone would not vanish); padding atoms therefore never reach real
  atoms. Outputs on padding rows are not zeroed here (:class:`mspec.models.model.Model` does).
* Zero-length edges (padding self-loops, coincident atoms) get ``r = 0`` and a zero unit vector
  through the ET's "double where", and the basis has its finite limit there, so no NaN reaches
  any value or gradient.

Differences from schnetpack's module (none changes the function class or the parameter count):

* the three blocks of the message and update outputs are ordered as in the paper's notation
  ``(x_vv, x_s, x_vs)`` and ``(a_vv, a_sv, a_ss)``; schnetpack orders them ``(x_s, x_vs, x_vv)``
  and ``(a_ss, a_vv, a_sv)``, and its ``mixing`` output is ``[V v | U v]``, so a converter
  permutes those kernel / bias columns;
* unshared filters are one ``Dense(K -> 3F)`` per block instead of one ``Dense(K -> 3LF)`` split
  L ways (the same parameters, sliced);
* the embedding row of Z = 0 is not forced to 0 (as current schnetpack, whose older releases
  passed ``padding_idx=0``): Z = 0 only marks padding atoms, which never reach real atoms.
"""

from __future__ import annotations

import math
from typing import Any

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from mspec.models.et import cosine_cutoff, dense, edge_geometry, embed
from mspec.models.precision import gather_rows, in_dtype, sum_dtype

Array = jax.Array

# schnetpack's ``epsilon`` inside ``sqrt(sum v^2 + eps)``: the norm's gradient is finite (0) at
# ``v = 0``, which is every atom's vector state before the first message.
NORM_EPS = 1e-8


def sine_rbf(r: Array, num_rbf: int, cutoff: float) -> Array:
    """PaiNN's radial basis ``rbf_n(r) = sin(n pi r / r_c) / r``, ``n = 1 .. K``.

    ``e3nn.bessel`` is the same basis times ``sqrt(2 / r_c)`` (its orthonormalisation on
    ``[0, r_c]`` with weight ``r^2``), with the limit ``n pi / r_c`` at ``r = 0`` and a finite
    gradient there; the factor is divided out to keep the paper's (and schnetpack's) scale.
    schnetpack returns 0 at ``r = 0``; here zero-length edges are inactive anyway.

    Args:
        r: distances ``[...]`` in Å.
        num_rbf: number K of basis functions.
        cutoff: ``r_c`` in Å.

    Returns:
        ``[..., K]`` basis values (not cut off: the filter applies :func:`cosine_cutoff`).
    """
    return e3nn.bessel(r, num_rbf, cutoff) * math.sqrt(cutoff / 2.0)


def _acc(x: Array) -> Array:
    """``x`` in the dtype its sums accumulate in (float32 for bfloat16, else unchanged)."""
    return x.astype(sum_dtype(x.dtype))


class PaiNNMessage(nn.Module):
    """The message block of one PaiNN layer.

    Attributes:
        hidden: width F.
        dtype: compute dtype of the Linears and per-edge products (None: the inputs').
    """

    hidden: int
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        s: Array,
        v: Array,
        filters: Array | None,
        rbf: Array,
        cut: Array,
        unit: Array,
        senders: Array,
        receivers: Array,
    ) -> tuple[Array, Array]:
        """Compute the residual updates ``(ds, dv)`` of the message block.

        Args:
            s: ``[N, F]`` scalar features.
            v: ``[N, 3, F]`` vector features.
            filters: ``[E, 3F]`` shared filters ``W(r_ij)`` (cutoff and mask applied), or None
                to compute this layer's own from ``rbf`` (a ``filter_net`` of this module).
            rbf: ``[E, K]`` radial basis.
            cut: ``[E]`` cosine cutoff times the activity mask (0 on inactive edges).
            unit: ``[E, 3]`` unit vectors ``(pos_j - pos_i) / r`` (0 for zero-length edges).
            senders: ``[E]`` sources j.
            receivers: ``[E]`` targets i.

        Returns:
            ``(ds [N, F], dv [N, 3, F])`` in the sums' dtype (float32 under bfloat16).
        """
        n, f = s.shape
        phi = nn.silu(dense(f, dtype=self.dtype, name="phi_0")(s))
        phi = dense(3 * f, dtype=self.dtype, name="phi_2")(phi)  # [N, 3F], per atom, then gathered
        if filters is None:
            filters = dense(3 * f, dtype=self.dtype, name="filter_net")(rbf)
            (cut_c,) = in_dtype(self.dtype, cut)
            filters = filters * cut_c[:, None]  # [E, 3F]; exactly 0 on inactive edges
        x = gather_rows(phi, senders) * filters  # [E, 3F]
        x_vv, x_s, x_vs = jnp.split(x, 3, axis=-1)  # each [E, F]

        unit_c, v_c = in_dtype(self.dtype, unit, v)
        dv_edge = (  # [E, 3, F]
            x_vv[:, None, :] * gather_rows(v_c, senders) + x_vs[:, None, :] * unit_c[:, :, None]
        )
        ds = jax.ops.segment_sum(_acc(x_s), receivers, num_segments=n)  # [N, F]
        dv = jax.ops.segment_sum(_acc(dv_edge), receivers, num_segments=n)  # [N, 3, F]
        return ds, dv


class PaiNNUpdate(nn.Module):
    """The update block of one PaiNN layer.

    Attributes:
        hidden: width F.
        dtype: compute dtype of the Linears (None: the inputs'); the norm and the inner product
            over xyz are taken in the sums' dtype (float32 under bfloat16).
    """

    hidden: int
    dtype: Any = None

    @nn.compact
    def __call__(self, s: Array, v: Array) -> tuple[Array, Array]:
        """Compute the residual updates ``(ds, dv)`` of the update block.

        Args:
            s: ``[N, F]`` scalar features.
            v: ``[N, 3, F]`` vector features.

        Returns:
            ``(ds [N, F], dv [N, 3, F])`` in the sums' dtype (float32 under bfloat16).
        """
        f = s.shape[-1]
        # U and V in one bias-free Linear over the channel axis (no bias: equivariance).
        uv, vv = jnp.split(dense(2 * f, use_bias=False, dtype=self.dtype, name="mixing")(v), 2, -1)
        uv, vv = _acc(uv), _acc(vv)  # [N, 3, F] each
        # sqrt(sum + eps), not a "double where" norm: schnetpack's and the brief's choice; the
        # gradient at v = 0 is exactly 0 and the value is shifted by at most 1e-4.
        vv_norm = jnp.sqrt(jnp.sum(vv * vv, axis=1) + NORM_EPS)  # [N, F]
        ctx = jnp.concatenate([s, vv_norm.astype(s.dtype)], axis=-1)  # [N, 2F]
        a = nn.silu(dense(f, dtype=self.dtype, name="context_0")(ctx))
        a = _acc(dense(3 * f, dtype=self.dtype, name="context_2")(a))  # [N, 3F]
        a_vv, a_sv, a_ss = jnp.split(a, 3, axis=-1)
        dv = a_vv[:, None, :] * uv
        ds = a_sv * jnp.sum(uv * vv, axis=1) + a_ss
        return ds, dv


class PaiNN(nn.Module):
    """PaiNN representation model, a drop-in for
    :class:`mspec.models.et.EquivariantTransformer` (same call signature and outputs).

    ``s_i = Embedding(z_i)``, ``v_i = 0``, then L blocks of message + update (module docstring);
    no norms and no output layer (the heads of :mod:`mspec.models.heads` read ``(x, vec)``).

    Parameters (names under this module): ``embedding``; ``filter_net`` (only with
    ``shared_filters``); per block ``message_{l}`` (``phi_0``, ``phi_2``, and ``filter_net``
    unless shared) and ``update_{l}`` (``mixing``, ``context_0``, ``context_2``). Initialised as
    schnetpack does: Xavier-uniform kernels, zero biases, N(0, 1) embedding.
    F = 128, L = 3, K = 20, max_z = 100: 580,736 parameters (564,608 with shared filters).

    Attributes:
        hidden: width F.
        num_layers: number L of interaction (message + update) blocks.
        num_rbf: number K of sine basis functions.
        cutoff: cutoff r_c in Å.
        max_z: size of the embedding table.
        shared_filters: one filter Linear for all blocks (False: one per block, schnetpack's
            default).
        dtype: compute dtype (Flax's ``dtype``; the parameters stay float32). None: the inputs'
            and parameters' (float32, or float64 under ``jax_enable_x64`` with float64 inputs and
            parameters). ``jnp.bfloat16``: the Linears (``phi``, the filters, ``mixing``, the
            update MLP) and the per-edge message products compute in bfloat16; the geometry and
            radial basis, the residual streams ``s`` / ``v``, the norm ``||V v||``, the inner
            product ``<U v, V v>`` and every sum over edges stay float32, so the outputs are
            float32 (as the ET's).
    """

    hidden: int = 128
    num_layers: int = 3
    num_rbf: int = 20
    cutoff: float = 5.0
    max_z: int = 100
    shared_filters: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        atomic_numbers: Array,
        positions: Array,
        senders: Array,
        receivers: Array,
        edge_mask: Array,
        num_pairs: int | None = None,
    ) -> tuple[Array, Array]:
        """Encode a (padded) batch of molecules.

        Args:
            atomic_numbers: ``[N] int32`` (0 for padding).
            positions: ``[N, 3]`` coordinates in Å.
            senders: ``[E] int32`` sources j (messages flow j -> i).
            receivers: ``[E] int32`` targets i.
            edge_mask: ``[E] bool``, True for real edges. Self-loops and edges with
                ``r >= cutoff`` are additionally treated as inactive.
            num_pairs: accepted for the ET's signature and ignored: the ET shares distance
                filters between the two directions of a pair in :func:`mspec.graph.pack`'s
                layout; PaiNN computes its filters per edge, in any edge order.

        Returns:
            ``(x [N, F], vec [N, 3, F])``, in float32 under bfloat16 compute. Rows of padding
            atoms are not zeroed here.
        """
        del num_pairs  # per-edge filters: any edge order works
        n = atomic_numbers.shape[0]
        f = self.hidden

        r, unit, _ = edge_geometry(positions, senders, receivers)  # [E], [E, 3]
        active = edge_mask & (senders != receivers) & (r < self.cutoff)  # [E]
        # The mask folded into the cutoff zeroes the filters, hence every message, of inactive
        # edges (cosine_cutoff alone is 0 only beyond r_c).
        cut = cosine_cutoff(r, self.cutoff) * active.astype(r.dtype)  # [E]
        rbf = sine_rbf(r, self.num_rbf, self.cutoff)  # [E, K]

        s = embed(self.max_z, f, "embedding")(atomic_numbers)  # [N, F], float32 residual stream
        v = jnp.zeros((n, 3, f), s.dtype)

        shared = None
        if self.shared_filters:
            shared = dense(3 * f, dtype=self.dtype, name="filter_net")(rbf)
            (cut_c,) = in_dtype(self.dtype, cut)
            shared = shared * cut_c[:, None]  # [E, 3F]

        for layer in range(self.num_layers):
            ds, dv = PaiNNMessage(f, dtype=self.dtype, name=f"message_{layer}")(
                s, v, shared, rbf, cut, unit, senders, receivers
            )
            s, v = s + ds, v + dv
            ds, dv = PaiNNUpdate(f, dtype=self.dtype, name=f"update_{layer}")(s, v)
            s, v = s + ds, v + dv

        assert s.shape == (n, f) and v.shape == (n, 3, f)
        return s, v
