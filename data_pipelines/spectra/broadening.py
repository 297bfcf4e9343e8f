"""Broadening of stick spectra onto the QM9S grids.

QM9S (and MolSpectra) use fixed grids: UV-Vis 1.0-15.0 eV in 0.02 eV steps (701 points), IR and
Raman 500-4000 cm^-1 in 1 cm^-1 steps (3501 points). The release does not document its line shapes;
`docs/spec/data-notes.md` §3.4 infers Lorentzians with the *peak-height* convention (peak
height = stick intensity) and HWHM about 8 cm^-1 for IR/Raman, and a Gaussian with sigma about
0.2 eV and height = oscillator strength for UV. Those are the defaults here; every width and shape
is an argument so users can match another convention.
"""

from __future__ import annotations

import numpy as np

UV_GRID_EV = np.round(np.linspace(1.0, 15.0, 701), 10)  # [701] eV
VIB_GRID_CM1 = np.arange(500.0, 4001.0, 1.0)  # [3501] cm^-1

LINE_SHAPES = ("lorentzian", "gaussian")

# Defaults per spectrum type: (grid, line shape, width). Width = HWHM for Lorentzians, sigma for
# Gaussians, in the grid's unit.
DEFAULTS = {
    "uv": (UV_GRID_EV, "gaussian", 0.2),
    "ir": (VIB_GRID_CM1, "lorentzian", 8.0),
    "raman": (VIB_GRID_CM1, "lorentzian", 8.0),
}


def broaden(
    positions: np.ndarray,
    intensities: np.ndarray,
    grid: np.ndarray,
    shape: str = "lorentzian",
    width: float = 8.0,
) -> np.ndarray:
    """Sum of peak-height-normalised line shapes, one per stick.

    Args:
      positions: [n_sticks] line positions, in the unit of `grid`.
      intensities: [n_sticks] peak heights (>= 0).
      grid: [n_points] where to evaluate.
      shape: "lorentzian" (h * w^2 / ((x - x0)^2 + w^2), w = HWHM) or
        "gaussian" (h * exp(-(x - x0)^2 / (2 w^2)), w = sigma).
      width: HWHM (Lorentzian) or sigma (Gaussian), > 0.

    Returns:
      [n_points] float64 spectrum. Sticks outside the grid still contribute their tails.
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1)
    intensities = np.asarray(intensities, dtype=np.float64).reshape(-1)
    grid = np.asarray(grid, dtype=np.float64)
    if positions.shape != intensities.shape:
        raise ValueError(f"{positions.shape[0]} positions but {intensities.shape[0]} intensities")
    if not width > 0:
        raise ValueError(f"line width must be > 0, got {width}")
    if shape not in LINE_SHAPES:
        raise ValueError(f"unknown line shape {shape!r}; choose one of {LINE_SHAPES}")
    if positions.size == 0:
        return np.zeros(grid.shape, np.float64)
    delta = grid[:, None] - positions[None, :]  # [n_points, n_sticks]
    if shape == "lorentzian":
        profile = width**2 / (delta**2 + width**2)
    else:
        profile = np.exp(-0.5 * (delta / width) ** 2)
    return profile @ intensities


def broaden_record(record, spectrum: str, shape: str | None = None,
                   width: float | None = None) -> np.ndarray:
    """Broadens one spectrum type ("uv", "ir" or "raman") of a `sticks.StickRecord`.

    Returns [701] for "uv", [3501] for "ir"/"raman" (float32, unnormalised).
    """
    grid, default_shape, default_width = DEFAULTS[spectrum]
    pos, inten = record.sticks(spectrum)
    out = broaden(pos, inten, grid, shape or default_shape, width or default_width)
    return out.astype(np.float32)
