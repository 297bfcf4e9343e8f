"""Coord pre-training (Zaidi et al.): Cartesian-only denoising (τ = 0.04 Å) on QM9 geometries.

Derived from the Frad config; only the noise differs.

    python -m experiments.pretrain --config experiments/configs/pretrain_coord.py --workdir runs/coord
    python -m experiments.pretrain --config experiments/configs/pretrain_coord.py:tiny --workdir runs/coord_tiny
"""

import ml_collections

from experiments.configs import pretrain_frad


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = pretrain_frad.get_config(arg)
    c.model.interlayer_norm = "affine"  # as before pretrain_frad took Frad's own ET
    c.noise.type = "coord"
    return c
