"""Models: the TorchMD-Net Equivariant Transformer encoder and its heads."""

from mspec.models.et import EquivariantTransformer
from mspec.models.model import (
    HEADS,
    PRIORS,
    PROPERTY_HEADS,
    Model,
    count_params,
    molecule_property,
    property_head,
)

__all__ = [
    "HEADS", "PRIORS", "PROPERTY_HEADS", "EquivariantTransformer", "Model", "count_params",
    "molecule_property", "property_head",
]
