"""Output heads of the ET (torchmd-net ``output_modules``) and the Atomref prior.

Written from ``docs/spec/et.md`` §8–§9.
Inputs are the encoder outputs ``x [N, F]`` and ``vec [N, 3, F]``; outputs are per atom.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mspec.elements import ATOMIC_MASSES
from mspec.models.et import dense

Array = jax.Array


def safe_norm(v: Array, axis: int) -> Array:
    """Euclidean norm whose gradient at 0 is 0 (torch's subgradient) instead of NaN.

    The "double where" feeds 1 into ``sqrt`` where the squared norm is 0, so the discarded branch
    has a finite gradient that the outer ``where`` multiplies by 0.

    Args:
        v: any array.
        axis: axis to reduce.

    Returns:
        ``v`` with ``axis`` reduced.
    """
    n2 = jnp.sum(v * v, axis=axis)
    positive = n2 > 0.0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, n2, 1.0)), 0.0)


class GatedEquivariantBlock(nn.Module):
    """Gated equivariant block ``G(F_in -> F_out, F_mid)`` (Schütt et al., PaiNN).

    * ``a = ||vec W1||`` over xyz (``W1: F_in -> F_in``, no bias), ``[N, F_in]``;
    * ``b = vec W2`` (``W2: F_in -> F_out``, no bias), ``[N, 3, F_out]``;
    * ``[x' | g] = Lin2(SiLU(Lin1([x || a])))`` (``Lin1: 2F_in -> F_mid``,
      ``Lin2: F_mid -> 2F_out``);
    * ``vec' = g * b`` (broadcast over xyz); ``x' = SiLU(x')`` if ``scalar_activation``.

    Attributes:
        out_channels: F_out.
        intermediate_channels: F_mid; defaults to F_in.
        scalar_activation: apply SiLU to the scalar output.
        dtype: compute dtype of the Linears (None: float32; see
            :class:`mspec.models.et.EquivariantTransformer`).
    """

    out_channels: int
    intermediate_channels: int | None = None
    scalar_activation: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, vec: Array) -> tuple[Array, Array]:
        """Apply the block.

        Args:
            x: ``[N, F_in]`` scalars.
            vec: ``[N, 3, F_in]`` vectors.

        Returns:
            ``(x' [N, F_out], vec' [N, 3, F_out])``.
        """
        f_in = x.shape[-1]
        f_mid = self.intermediate_channels or f_in
        dt = self.dtype
        a = safe_norm(dense(f_in, use_bias=False, dtype=dt, name="vec1_proj")(vec), axis=-2)
        b = dense(self.out_channels, use_bias=False, dtype=dt, name="vec2_proj")(vec)
        h = jnp.concatenate([x, a], axis=-1)  # [N, 2 F_in]
        h = nn.silu(dense(f_mid, dtype=dt, name="update_net_0")(h))
        x_out, gate = jnp.split(
            dense(2 * self.out_channels, dtype=dt, name="update_net_2")(h), 2, axis=-1
        )
        vec_out = gate[:, None, :] * b
        if self.scalar_activation:
            x_out = nn.silu(x_out)
        return x_out, vec_out


class _TwoGatedBlocks(nn.Module):
    """``G(F -> F/2, F_mid=F, SiLU)`` followed by ``G(F/2 -> 1, F_mid=F/2)``."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, vec: Array) -> tuple[Array, Array]:
        f = x.shape[-1]
        x, vec = GatedEquivariantBlock(
            f // 2, scalar_activation=True, dtype=self.dtype, name="output_network_0"
        )(x, vec)
        return GatedEquivariantBlock(1, dtype=self.dtype, name="output_network_1")(x, vec)


class EquivariantScalar(nn.Module):
    """Per-atom scalar head (``output_model = "Scalar"`` for the ET); ``dtype``: compute dtype."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, vec: Array) -> Array:
        """Per-atom scalars.

        Args:
            x: ``[N, F]`` scalar features.
            vec: ``[N, 3, F]`` vector features.

        Returns:
            ``[N]`` per-atom scalars (before std / mean / prior).
        """
        x, _ = _TwoGatedBlocks(self.dtype, name="blocks")(x, vec)
        return x[:, 0]


class EquivariantVectorOutput(nn.Module):
    """Per-atom vector head (``output_model = "VectorOutput"``), the denoising (noise) head;
    ``dtype``: compute dtype."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, vec: Array) -> Array:
        """Per-atom vectors.

        Args:
            x: ``[N, F]`` scalar features.
            vec: ``[N, 3, F]`` vector features.

        Returns:
            ``[N, 3]`` per-atom vectors.
        """
        _, vec = _TwoGatedBlocks(self.dtype, name="blocks")(x, vec)
        return vec[:, :, 0]


def centre_of_mass_offsets(
    positions: Array, atomic_numbers: Array, node_graph: Array, node_mask: Array, num_graphs: int
) -> Array:
    """Each atom's position relative to its molecule's centre of mass, ``p_i - c_mol(i)``.

    Masses are :data:`mspec.elements.ATOMIC_MASSES` in float32, as torchmd-net's dipole and
    spatial-extent heads use them.

    Args:
        positions: ``[N, 3]`` in Å.
        atomic_numbers: ``[N]`` int.
        node_graph: ``[N]`` molecule index of each atom.
        node_mask: ``[N]`` bool, False for padding atoms (they get weight 0 and offset 0).
        num_graphs: G, the number of molecule slots.

    Returns:
        ``[N, 3]`` offsets in Å (0 on padding rows).
    """
    masses = jnp.asarray(ATOMIC_MASSES, jnp.float32)[atomic_numbers] * node_mask  # [N]
    weighted = jax.ops.segment_sum(masses[:, None] * positions, node_graph, num_segments=num_graphs)
    total = jax.ops.segment_sum(masses, node_graph, num_segments=num_graphs)  # [G]
    centre = weighted / jnp.where(total > 0, total, 1.0)[:, None]  # [G, 3]
    return (positions - centre[node_graph]) * node_mask[:, None]


class EquivariantDipoleMoment(nn.Module):
    """Dipole head (torchmd-net ``EquivariantDipoleMoment``, Frad's μ recipe): per atom a charge
    ``q_i`` and a vector ``v_i`` from the two gated blocks, contributing ``q_i (p_i - c) + v_i``;
    the molecule's μ is the norm of the sum (done in the readout). ``dtype``: compute dtype."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, vec: Array, offsets: Array) -> Array:
        """Per-atom dipole contributions.

        Args:
            x: ``[N, F]`` scalar features.
            vec: ``[N, 3, F]`` vector features.
            offsets: ``[N, 3]`` positions relative to the molecule's centre of mass
                (:func:`centre_of_mass_offsets`).

        Returns:
            ``[N, 3]``; the molecule's dipole vector is their sum.
        """
        q, v = _TwoGatedBlocks(self.dtype, name="blocks")(x, vec)
        return q.astype(offsets.dtype) * offsets + v[:, :, 0].astype(offsets.dtype)


class ElectronicSpatialExtent(nn.Module):
    """Spatial-extent head (torchmd-net ``ElectronicSpatialExtent``, Frad's ⟨R²⟩ recipe): an MLP
    ``Linear(F -> F/2) -> SiLU -> Linear(F/2 -> 1)`` on the scalars, times ``|p_i - c|²``; the
    molecule's ⟨R²⟩ is the sum (done in the readout). Invariant; reads no vectors.
    ``dtype``: compute dtype."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, offsets: Array) -> Array:
        """Per-atom contributions.

        Args:
            x: ``[N, F]`` scalar features.
            offsets: ``[N, 3]`` positions relative to the molecule's centre of mass.

        Returns:
            ``[N]``.
        """
        f = x.shape[-1]
        h = nn.silu(dense(f // 2, dtype=self.dtype, name="output_network_0")(x))
        q = dense(1, dtype=self.dtype, name="output_network_2")(h)[:, 0].astype(offsets.dtype)
        return q * jnp.sum(offsets * offsets, axis=-1)


class AtomrefPrior(nn.Module):
    """Learnable per-element offsets added to each atom's output (torchmd-net's ``Atomref``
    prior, ``Embedding(max_z, 1)``). Starts at 0: Frad's pre-trained path, where the data have
    QM9's atom references subtracted and the model learns a correction (``docs/spec/et.md``
    §9); a converted checkpoint brings its own values."""

    max_z: int = 100

    @nn.compact
    def __call__(self, atomic_numbers: Array) -> Array:
        """``[N]`` int -> ``[N]`` per-atom offsets (float32)."""
        table = self.param("atomref", nn.initializers.zeros, (self.max_z,), jnp.float32)
        return table[atomic_numbers]
