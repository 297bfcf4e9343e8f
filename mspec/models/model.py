"""The full per-device model: ET encoder plus output heads on one padded device batch.

Batch layout: :mod:`mspec.types`. Molecule-level readouts (sum over atoms, std / mean, priors,
forces) are left to the losses; this module returns per-atom quantities only.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax

from mspec import graph
from mspec.models.et import EquivariantTransformer
from mspec.models.heads import EquivariantScalar, EquivariantVectorOutput
from mspec.models.precision import compute_dtype

Array = jax.Array

HEADS = ("scalar", "noise")


class Model(nn.Module):
    """ET encoder + optional scalar and noise heads.

    Attributes:
        hidden, num_layers, num_heads, num_rbf, cutoff, max_z, interlayer_norm, vector_norm,
        message_passing: encoder settings, see :class:`mspec.models.et.EquivariantTransformer`.
        heads: which heads to build: ``"scalar"`` (:class:`EquivariantScalar`, per-atom property
            contributions) and/or ``"noise"`` (:class:`EquivariantVectorOutput`, denoising).
        dtype: compute dtype, ``"float32"`` (default) or ``"bfloat16"`` (bfloat16 Linears and
            messages; float32 parameters, norms, sums and outputs; see
            :class:`mspec.models.et.EquivariantTransformer`).
    """

    hidden: int = 256
    num_layers: int = 8
    num_heads: int = 8
    num_rbf: int = 64
    cutoff: float = 5.0
    max_z: int = 100
    interlayer_norm: str = "affine"
    vector_norm: str = "whitened"
    message_passing: str = "xla"
    heads: tuple[str, ...] = ("scalar", "noise")
    dtype: Any = "float32"

    @nn.compact
    def __call__(self, batch: dict[str, Array]) -> dict[str, Array]:
        """Run the encoder and heads on one device batch.

        Args:
            batch: a device batch (see :mod:`mspec.types`); reads ``atomic_numbers [N]``,
                ``positions [N, 3]``, ``senders [E]``, ``receivers [E]``, ``edge_mask [E]`` and
                ``node_mask [N]``. With the key ``pair_layout`` (written by
                :func:`mspec.graph.pack`) the edges must be in its pair layout and each distance
                filter is computed once per atom pair; without it, edges may come in any order.

        Returns:
            ``{"node_features": [N, F], "vectors": [N, 3, F], "scalar": [N], "noise": [N, 3]}``
            (heads only when requested), with every padding-atom row exactly 0.
        """
        unknown = set(self.heads) - set(HEADS)
        if unknown:
            raise ValueError(f"Unknown heads {sorted(unknown)}; expected a subset of {HEADS}.")
        dtype = compute_dtype(self.dtype)
        x, vec = EquivariantTransformer(
            hidden=self.hidden,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_rbf=self.num_rbf,
            cutoff=self.cutoff,
            max_z=self.max_z,
            interlayer_norm=self.interlayer_norm,
            vector_norm=self.vector_norm,
            message_passing=self.message_passing,
            dtype=dtype,
            name="representation",
        )(
            batch["atomic_numbers"],
            batch["positions"],
            batch["senders"],
            batch["receivers"],
            batch["edge_mask"],
            # Batches from graph.pack are in its pair layout: one distance filter per atom pair.
            num_pairs=(
                graph.num_pairs(batch["senders"].shape[0], batch["atomic_numbers"].shape[0])
                if "pair_layout" in batch
                else None
            ),
        )
        node_mask = batch["node_mask"].astype(x.dtype)  # [N]
        out = {"node_features": x * node_mask[:, None], "vectors": vec * node_mask[:, None, None]}
        # Heads read the unmasked features; padding atoms never feed real atoms (their edges are
        # masked), and their own outputs are zeroed below, in the encoder's output dtype (float32
        # under bfloat16 compute, so the losses and readout sums run in float32).
        if "scalar" in self.heads:
            scalar = EquivariantScalar(dtype, name="scalar_head")(x, vec)
            out["scalar"] = scalar.astype(x.dtype) * node_mask
        if "noise" in self.heads:
            noise = EquivariantVectorOutput(dtype, name="noise_head")(x, vec)
            out["noise"] = noise.astype(x.dtype) * node_mask[:, None]
        return out


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (arrays or ``jax.ShapeDtypeStruct``s)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
