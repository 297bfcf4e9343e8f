"""Pictures of SpecFormer's masked-patch reconstructions (PNG files and TensorBoard images)."""

from __future__ import annotations

import os

import numpy as np

from mspec import spectra


def reconstruction_figure(
    spec: spectra.SpectrumSpec,
    normalized: np.ndarray,
    recon: np.ndarray,
    mask: np.ndarray,
    *,
    title: str,
    axis: np.ndarray | None = None,
    unit: str = "",
):
    """One spectrum with its masked patches shaded and the reconstructions drawn over them.

    Args:
      spec: the spectrum type.
      normalized: ``[L]`` normalised spectrum (what SpecFormer sees before masking).
      recon: ``[n, P]`` reconstructed patches (only the masked ones are drawn).
      mask: ``[n]`` bool, True for masked patches.
      title: figure title.
      axis: ``[L]`` physical grid (default: point index).
      unit: x-axis unit.

    Returns:
      A matplotlib ``Figure`` (Agg canvas, not attached to pyplot).
    """
    from matplotlib.figure import Figure

    x = np.arange(spec.length) if axis is None else np.asarray(axis)
    fig = Figure(figsize=(10, 3.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, normalized, color="black", lw=0.8, label="input (normalised)")
    idx = spectra.patch_indices(spec)
    for k in np.nonzero(mask)[0]:
        xs = x[idx[k]]
        ax.axvspan(xs[0], xs[-1], color="tab:orange", alpha=0.2, lw=0)
        ax.plot(
            xs,
            recon[k],
            color="tab:red",
            lw=1.0,
            label="reconstruction (masked patches)" if k == np.nonzero(mask)[0][0] else None,
        )
    ax.set_xlabel(f"{spec.name} {unit}".strip())
    ax.set_ylabel("intensity (normalised)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of a figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_reconstructions(
    directory: str, step: int, example: dict, specs, normalization: str, grids: dict | None = None
) -> dict[str, tuple[str, np.ndarray]]:
    """Writes ``<directory>/step_<step>_<type>.png`` for each spectrum type.

    Args:
      directory: output folder (created).
      step: training step (in the file name and the title).
      example: host arrays of one validation molecule: ``spectrum_<t> [L]``,
        ``recon_<t> [n, P]`` and ``mask_<t> [n]``.
      specs: the :class:`SpectrumSpec` of each type.
      normalization: the SpecFormer input normalisation.
      grids: optional ``{type: {"start", "step", "unit"}}`` from the dataset metadata.

    Returns:
      ``{type: (png path, [H, W, 3] uint8 image)}``.
    """
    os.makedirs(directory, exist_ok=True)
    out = {}
    for spec in specs:
        t = spec.name
        norm = np.asarray(
            spectra.normalize(np.asarray(example[f"spectrum_{t}"]), normalization, spec.minmax)
        )
        g = (grids or {}).get(t)
        axis = g["start"] + g["step"] * np.arange(spec.length) if g else None
        mask = np.asarray(example[f"mask_{t}"], bool)
        recon = np.asarray(example[f"recon_{t}"])
        target = norm[spectra.patch_indices(spec)]
        mse = float(np.mean((recon[mask] - target[mask]) ** 2)) if mask.any() else float("nan")
        fig = reconstruction_figure(
            spec,
            norm,
            recon,
            mask,
            title=f"step {step}: {t} spectrum of the first validation molecule "
            f"({int(mask.sum())} masked patches, MSE {mse:.4f})",
            axis=axis,
            unit=g.get("unit", "") if g else "",
        )
        path = os.path.join(directory, f"step_{step:08d}_{t}.png")
        fig.savefig(path)
        out[t] = (path, figure_to_array(fig))
    return out
