"""Models: the TorchMD-Net Equivariant Transformer encoder and its heads."""

from mspec.models.et import EquivariantTransformer
from mspec.models.model import Model, count_params

__all__ = ["EquivariantTransformer", "Model", "count_params"]
