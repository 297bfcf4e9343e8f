"""The full per-device model: an encoder (backbone) plus output heads on one padded device batch.

Backbones are registered in :data:`ENCODERS` (name -> builder); :func:`get_model` builds the
model a config's ``model`` block describes. A backbone returns per-atom scalar features
``[N, F]`` and vector features ``[N, 3, F]``, which every head reads; its parameters live under
``representation`` whatever the backbone, so the heads' parameter paths never change.

Batch layout: :mod:`mspec.types`. Molecule-level readouts (sum over atoms, std / mean, priors,
forces) are left to the losses; this module returns per-atom quantities only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from mspec import graph
from mspec.models.et import EquivariantTransformer
from mspec.models.painn import PaiNN
from mspec.models.heads import (
    AtomrefPrior,
    ElectronicSpatialExtent,
    EquivariantDipoleMoment,
    EquivariantScalar,
    EquivariantVectorOutput,
    centre_of_mass_offsets,
    safe_norm,
)
from mspec.models.precision import compute_dtype

Array = jax.Array

# Property heads (a fine-tuned model has exactly one) and the denoising head.
PROPERTY_HEADS = ("scalar", "dipole", "spatial_extent")
HEADS = (*PROPERTY_HEADS, "noise")
PRIORS = ("none", "atomref")


def _encoder_builder(cls) -> Callable[["Model", Any], nn.Module]:
    """A builder of encoder ``cls`` that passes every :class:`Model` setting the encoder declares
    (same attribute name), so no backbone lists its settings again."""

    def build(model: "Model", dtype) -> nn.Module:
        declared = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype"}
        for option, owner in BACKBONE_SWITCHES.items():
            if getattr(model, option) and option not in declared:
                raise ValueError(f"{option} is an option of the {owner!r} backbone only; the "
                                 f"{cls.__name__} backbone has none")
        settings = {n: getattr(model, n) for n in declared if hasattr(model, n)}
        return cls(**settings, dtype=dtype, name="representation")

    return build


# Backbone name (``config.model.name``) -> builder of the encoder module from the Model's
# settings. Adding a backbone: a module in mspec/models/ and one entry here.
ENCODERS: dict[str, Callable[["Model", Any], nn.Module]] = {
    "et": _encoder_builder(EquivariantTransformer),
    "painn": _encoder_builder(PaiNN),
}
# The settings only the ET reads (PaiNN ignores them, so a config may keep them).
ET_ONLY = ("num_heads", "interlayer_norm", "vector_norm", "message_passing", "separate_noise_vectors")
PAINN_ONLY = ("shared_filters",)
# Backbone-specific switches: turning one on for a backbone without it is an error (a setting
# the user asked for would silently do nothing); the other backbone-specific settings (sizes,
# norms) carry the shared configs' values and are ignored by a backbone that lacks them.
BACKBONE_SWITCHES = {"separate_noise_vectors": "et", "shared_filters": "painn"}  # -> backbone


class Model(nn.Module):
    """Encoder + optional property, noise and prior heads.

    Attributes:
        backbone: the encoder, a key of :data:`ENCODERS`: ``"et"`` (TorchMD-Net's Equivariant
            Transformer, :class:`mspec.models.et.EquivariantTransformer`) or ``"painn"``
            (:class:`mspec.models.painn.PaiNN`, which ignores the :data:`ET_ONLY` settings).
        hidden, num_layers, num_rbf, cutoff, max_z: encoder width, depth, radial basis size,
            cutoff (Å) and embedding table size (every backbone).
        num_heads, interlayer_norm, vector_norm, message_passing: ET settings, see
            :class:`mspec.models.et.EquivariantTransformer`.
        shared_filters: PaiNN setting (:data:`PAINN_ONLY`): one filter network for all
            message blocks (the paper's choice, 564,608 parameters at F = 128) instead of one
            per block (schnetpack's default, 580,736); see :class:`mspec.models.painn.PaiNN`.
        heads: which heads to build (parameter subtree in brackets):

            * ``"scalar"`` (``scalar_head``, :class:`EquivariantScalar`): per-atom property
              contributions ``[N]``; the molecule's value is their sum;
            * ``"dipole"`` (``dipole_head``, :class:`EquivariantDipoleMoment`): per-atom dipole
              contributions ``[N, 3]``; the molecule's μ is the norm of their sum;
            * ``"spatial_extent"`` (``spatial_extent_head``, :class:`ElectronicSpatialExtent`):
              per-atom ⟨R²⟩ contributions ``[N]``; the molecule's value is their sum;
            * ``"noise"`` (``noise_head``, :class:`EquivariantVectorOutput`): denoising.
        prior: ``"none"`` or ``"atomref"`` (``prior``, :class:`AtomrefPrior`): learnable
            per-element offsets, output ``"prior" [N]``, which the readout adds to the scalar
            head's atom contributions.
        separate_noise_vectors: Frad's MD17 recipe: the property heads read the vectors before
            the final whitened norm, the noise head the normalised ones (needs
            ``vector_norm="whitened"``; same parameters). Off: every head reads the normalised
            vectors.
        dtype: compute dtype, ``"float32"`` (default) or ``"bfloat16"`` (bfloat16 Linears and
            messages; float32 parameters, norms, sums and outputs; see
            :class:`mspec.models.et.EquivariantTransformer`).
    """

    backbone: str = "et"
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
    prior: str = "none"
    separate_noise_vectors: bool = False
    shared_filters: bool = False
    dtype: Any = "float32"

    @nn.compact
    def __call__(self, batch: dict[str, Array]) -> dict[str, Array]:
        """Run the encoder and heads on one device batch.

        Args:
            batch: a device batch (see :mod:`mspec.types`); reads ``atomic_numbers [N]``,
                ``positions [N, 3]``, ``senders [E]``, ``receivers [E]``, ``edge_mask [E]`` and
                ``node_mask [N]`` (the dipole and spatial-extent heads also ``node_graph [N]`` and
                ``graph_mask [G]``). With the key ``pair_layout`` (written by
                :func:`mspec.graph.pack`) the edges must be in its pair layout and each distance
                filter is computed once per atom pair; without it, edges may come in any order.

        Returns:
            ``{"node_features": [N, F], "vectors": [N, 3, F], "scalar": [N], "dipole": [N, 3],
            "spatial_extent": [N], "noise": [N, 3], "prior": [N]}`` (heads only when
            requested), with every padding-atom row exactly 0. ``vectors`` are the property
            heads' input (un-normalised with ``separate_noise_vectors``).
        """
        unknown = set(self.heads) - set(HEADS)
        if unknown:
            raise ValueError(f"Unknown heads {sorted(unknown)}; expected a subset of {HEADS}.")
        if self.prior not in PRIORS:
            raise ValueError(f"Unknown prior {self.prior!r}; expected one of {PRIORS}.")
        dtype = compute_dtype(self.dtype)
        if self.backbone not in ENCODERS:
            raise ValueError(f"Unknown backbone {self.backbone!r}; expected one of {sorted(ENCODERS)}.")
        encoded = ENCODERS[self.backbone](self, dtype)(
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
        x, vec = encoded[:2]
        noise_vec = encoded[2] if self.separate_noise_vectors else vec
        node_mask = batch["node_mask"].astype(x.dtype)  # [N]
        out = {"node_features": x * node_mask[:, None], "vectors": vec * node_mask[:, None, None]}
        # Heads read the unmasked features; padding atoms never feed real atoms (their edges are
        # masked), and their own outputs are zeroed below, in the encoder's output dtype (float32
        # under bfloat16 compute, so the losses and readout sums run in float32).
        if "scalar" in self.heads:
            scalar = EquivariantScalar(dtype, name="scalar_head")(x, vec)
            out["scalar"] = scalar.astype(x.dtype) * node_mask
        if "dipole" in self.heads or "spatial_extent" in self.heads:
            offsets = centre_of_mass_offsets(
                batch["positions"].astype(x.dtype), batch["atomic_numbers"], batch["node_graph"],
                batch["node_mask"], batch["graph_mask"].shape[0],
            )
            if "dipole" in self.heads:
                dipole = EquivariantDipoleMoment(dtype, name="dipole_head")(x, vec, offsets)
                out["dipole"] = dipole * node_mask[:, None]
            if "spatial_extent" in self.heads:
                extent = ElectronicSpatialExtent(dtype, name="spatial_extent_head")(x, offsets)
                out["spatial_extent"] = extent * node_mask
        if "noise" in self.heads:
            noise = EquivariantVectorOutput(dtype, name="noise_head")(x, noise_vec)
            out["noise"] = noise.astype(x.dtype) * node_mask[:, None]
        if self.prior == "atomref":
            prior = AtomrefPrior(self.max_z, name="prior")(batch["atomic_numbers"])
            out["prior"] = prior.astype(x.dtype) * node_mask
        return out


def get_model(config: Mapping[str, Any]) -> Model:
    """The :class:`Model` a config's ``model`` block describes.

    ``config["name"]`` picks the backbone (default ``"et"``); every other key is a
    :class:`Model` attribute of that name (``heads`` may be a list). Absent keys take the
    attribute's default (configs written before a key existed).

    Raises:
        ValueError: an unknown backbone, or a key that is not a Model attribute (a typo).
    """
    settings = {k: config[k] for k in config if k != "name"}
    name = config.get("name", "et")
    if name not in ENCODERS:
        raise ValueError(f"unknown model.name {name!r}; known backbones: {sorted(ENCODERS)}")
    known = {f.name for f in dataclasses.fields(Model)} - {"parent", "name", "backbone"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; known: {sorted(known | {'name'})}")
    if "heads" in settings:
        settings["heads"] = tuple(settings["heads"])
    model = Model(backbone=name, **settings)
    for option, owner in BACKBONE_SWITCHES.items():
        if getattr(model, option) and owner != name:
            raise ValueError(f"model.{option} is an option of the {owner!r} backbone only; the "
                             f"{name!r} backbone has none")
    return model


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (arrays or ``jax.ShapeDtypeStruct``s)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def property_head(heads) -> str:
    """The one property head among ``heads`` (see :data:`PROPERTY_HEADS`).

    Raises:
        ValueError: none, or more than one.
    """
    found = [h for h in heads if h in PROPERTY_HEADS]
    if len(found) != 1:
        raise ValueError(
            f"need exactly one property head of {PROPERTY_HEADS} in heads {tuple(heads)}, "
            f"found {len(found)}"
        )
    return found[0]


def molecule_property(
    out: dict[str, Array], node_graph: Array, num_graphs: int, std: float | Array = 1.0
) -> Array:
    """The molecule-level property from :class:`Model`'s per-atom outputs, as torchmd-net reads
    out: each atom's contribution times ``std``, plus the prior, summed per molecule; for the
    dipole head the norm of the summed vectors. The standardiser's mean (and any fixed atom
    references) are added by the caller.

    Args:
        out: :class:`Model` outputs holding exactly one property head (and ``"prior"`` if any).
        node_graph: ``[N]`` molecule index of each atom.
        num_graphs: G.
        std: the standardiser's std.

    Returns:
        ``[G]`` (0 for empty molecule slots, and for padding graphs).
    """
    head = property_head(k for k in out if k in PROPERTY_HEADS)
    if head == "dipole":
        if "prior" in out:
            raise ValueError("the dipole head takes no prior (torchmd-net allows none)")
        total = jax.ops.segment_sum(out["dipole"] * std, node_graph, num_segments=num_graphs)
        return safe_norm(total, axis=-1)
    atom = out[head] * std  # [N]; padding rows are 0
    if "prior" in out:
        atom = atom + out["prior"]
    return jax.ops.segment_sum(atom, node_graph, num_segments=num_graphs)
