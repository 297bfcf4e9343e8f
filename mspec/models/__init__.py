"""Models: encoders (the TorchMD-Net Equivariant Transformer, PaiNN), their heads, and
:func:`get_model`, which builds the model a config's ``model`` block describes."""

from mspec.models.et import EquivariantTransformer
from mspec.models.model import (
    ENCODERS,
    ET_ONLY,
    HEADS,
    PRIORS,
    PROPERTY_HEADS,
    Model,
    count_params,
    get_model,
    molecule_property,
    property_head,
)
from mspec.models.painn import PaiNN

__all__ = [
    "ENCODERS", "ET_ONLY", "HEADS", "PRIORS", "PROPERTY_HEADS", "EquivariantTransformer", "Model",
    "PaiNN", "count_params", "get_model", "molecule_property", "property_head",
]
