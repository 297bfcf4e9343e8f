"""Spectrum operations for SpecFormer: input normalisation, patching and random patch masking.

Written from ``docs/spec/molspectra.md`` §2.4 and §4.1–§4.2. Pure ``jax.numpy``; nothing
here knows a spectrum length or a dataset constant: lengths come from the dataset's feature
shapes and patch sizes, mask ratios and min/max ranges from the config (see :class:`SpectrumSpec`).

Shapes: ``G`` molecule slots, ``L`` points of one spectrum type, ``P`` patch length, ``S`` stride,
``n = floor((L - P) / S) + 1`` patches. Patching never pads, so the trailing ``L - ((n-1) S + P)``
points are never seen (for the official sizes: the last point of every spectrum, quirk Q4).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZATIONS = ("log10", "log", "minmax", "none")


@dataclasses.dataclass(frozen=True)
class SpectrumSpec:
    """Static description of one spectrum type as SpecFormer sees it.

    Attributes:
      name: the batch/dataset key, e.g. ``"uv"``.
      length: points ``L`` per spectrum (from the dataset's feature shape).
      patch_len: ``P``.
      stride: ``S``.
      mask_ratio: fraction ``r`` of patches masked; ``n - int(n (1 - r))`` patches are masked.
      minmax: ``(min, max)`` used only by the ``"minmax"`` normalisation.
    """

    name: str
    length: int
    patch_len: int
    stride: int
    mask_ratio: float
    minmax: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if self.patch_len <= 0 or self.stride <= 0:
            raise ValueError(f"spectrum {self.name!r}: patch_len and stride must be positive")
        if self.patch_len > self.length:
            raise ValueError(
                f"spectrum {self.name!r}: patch_len {self.patch_len} exceeds its length {self.length}"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(
                f"spectrum {self.name!r}: mask_ratio must be in [0, 1), got {self.mask_ratio}"
            )

    @property
    def num_patches(self) -> int:
        """``n = floor((L - P) / S) + 1`` (69 for UV 701/20/10, 139 for IR/Raman 3501/50/25)."""
        return (self.length - self.patch_len) // self.stride + 1

    @property
    def num_masked(self) -> int:
        """Masked patches per spectrum: ``n - int(n (1 - r))`` (7 / 14 / 14 at r = 0.1)."""
        n = self.num_patches
        return n - int(n * (1.0 - self.mask_ratio))


def normalize(
    spectrum: jax.Array, kind: str, minmax: tuple[float, float] = (0.0, 1.0)
) -> jax.Array:
    """Elementwise input normalisation (spec §2.4).

    * ``"log10"``: ``log10(1 + s)`` (the official default);
    * ``"log"``: ``ln(1 + s)``;
    * ``"minmax"``: ``(s - lo + 1e-8) / (hi - lo + 1e-8)`` with ``(lo, hi) = minmax``;
    * ``"none"``: identity.

    Args:
      spectrum: ``[..., L]`` raw intensities.
      kind: one of :data:`NORMALIZATIONS`.
      minmax: range for ``"minmax"``.

    Returns:
      ``[..., L]`` normalised intensities.
    """
    if kind == "log10":
        return jnp.log10(1.0 + spectrum)
    if kind == "log":
        return jnp.log1p(spectrum)
    if kind == "minmax":
        lo, hi = minmax
        return (spectrum - lo + 1e-8) / (hi - lo + 1e-8)
    if kind == "none":
        return spectrum
    raise ValueError(f"unknown spectrum normalisation {kind!r}; use one of {NORMALIZATIONS}")


def patch_indices(spec: SpectrumSpec) -> np.ndarray:
    """``[n, P]`` int32 gather indices ``idx[k, p] = k S + p`` (spec §9.4)."""
    return (
        np.arange(spec.num_patches, dtype=np.int32)[:, None] * spec.stride
        + np.arange(spec.patch_len, dtype=np.int32)[None, :]
    )


def patchify(spectrum: jax.Array, spec: SpectrumSpec) -> jax.Array:
    """Overlapping patches ``[..., n, P]`` of ``spectrum [..., L]`` (no padding)."""
    if spectrum.shape[-1] != spec.length:
        raise ValueError(
            f"spectrum {spec.name!r} has {spectrum.shape[-1]} points, the config/dataset says {spec.length}"
        )
    return spectrum[..., patch_indices(spec)]


def random_patch_mask(
    rng: jax.Array, batch_shape: tuple[int, ...], spec: SpectrumSpec
) -> jax.Array:
    """Random patch mask, ``True`` = masked, with exactly ``spec.num_masked`` per spectrum.

    Per spectrum: draw ``u ~ U(0, 1)^n``; the ``K = int(n (1 - r))`` patches with the smallest
    ``u`` are kept and the others masked, i.e. ``mask_k = rank(u_k) >= K`` (spec §4.2).

    Args:
      rng: PRNG key.
      batch_shape: leading shape, e.g. ``(G,)``.
      spec: the spectrum type.

    Returns:
      ``[*batch_shape, n]`` bool.
    """
    n = spec.num_patches
    u = jax.random.uniform(rng, (*batch_shape, n))
    rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
    return rank >= n - spec.num_masked
