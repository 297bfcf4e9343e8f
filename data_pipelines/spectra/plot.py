"""Plots the broadened UV-Vis, IR and Raman spectra of one molecule of a stick file (PNG).

    python -m data_pipelines.spectra.plot --sticks data_pipelines/spectra/data/qm9_gfn2/sticks.jsonl \
        --index 2329 --out spectra_2329.png
"""

from __future__ import annotations

import argparse

import numpy as np

from data_pipelines.spectra import broadening, sticks

_PANELS = (("uv", "energy (eV)", "oscillator strength"),
           ("ir", "wavenumber (cm$^{-1}$)", "IR intensity (km/mol)"),
           ("raman", "wavenumber (cm$^{-1}$)", "Raman activity (Å$^4$/amu)"))


def plot_record(record: sticks.StickRecord, path: str) -> None:
    """Three panels (UV, IR, Raman): the default broadening as a line, the sticks as bars."""
    import matplotlib  # optional extra "spectra"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 8))
    for ax, (name, xlabel, ylabel) in zip(axes, _PANELS):
        grid = broadening.DEFAULTS[name][0]
        pos, inten = record.sticks(name)
        inside = (pos >= grid[0]) & (pos <= grid[-1])
        ax.plot(grid, broadening.broaden_record(record, name), lw=1)
        ax.vlines(pos[inside], 0, inten[inside], colors="0.4", lw=0.6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xlim(grid[0], grid[-1])
    fig.suptitle(f"QM9 {record.qm9_index} {record.smiles}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sticks", required=True, help="sticks.jsonl or sticks.jsonl.gz")
    parser.add_argument("--index", type=int, help="qm9_index to plot (default: the first record)")
    parser.add_argument("--out", required=True, help="output PNG")
    args = parser.parse_args(argv)
    for rec in sticks.read(args.sticks):
        if args.index is None or rec.qm9_index == args.index:
            plot_record(rec, args.out)
            print(f"wrote {args.out}: {rec.qm9_index} {rec.smiles}, "
                  f"{np.asarray(rec.uv_energy_ev).size} UV / {rec.vib_freq_cm1.size} vib. sticks")
            return
    raise SystemExit(f"{args.sticks}: no record with qm9_index {args.index}")


if __name__ == "__main__":
    main()
