"""Plots the broadened UV-Vis, IR and Raman spectra of one molecule of a stick file (PNG).

    python -m data_pipelines.spectra.plot --sticks data_pipelines/spectra/data/qm9_gfn2/sticks.jsonl \
        --index 2329 --out spectra_2329.png
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from data_pipelines.spectra import broadening, sticks

_PANELS = (("uv", "energy (eV)", "oscillator strength"),
           ("ir", "wavenumber (cm$^{-1}$)", "IR intensity (km/mol)"),
           ("raman", "wavenumber (cm$^{-1}$)", "Raman activity (Å$^4$/amu)"))


def plot_title(record: sticks.StickRecord, meta: dict | None) -> str:
    """Names the molecule by what its ``qm9_index`` means in this stick file (``meta.json``'s
    input): a QM9 index for QM9 inputs, else the record number in the user's input file."""
    source = str(((meta or {}).get("input") or {}).get("source", ""))
    if source.startswith("qm9pack"):
        name = f"QM9 {record.qm9_index}"
    elif source:
        name = f"{os.path.basename(source)} record {record.qm9_index}"
    else:  # no meta.json: the number's meaning is unknown
        name = f"record {record.qm9_index}"
    return f"{name}: {record.smiles}"


def read_meta_beside(sticks_path: str) -> dict | None:
    """The ``meta.json`` next to a stick file, or None when there is none."""
    try:
        return sticks.read_meta(os.path.dirname(os.path.abspath(sticks_path)))
    except FileNotFoundError:
        return None


def plot_record(record: sticks.StickRecord, path: str, title: str | None = None) -> None:
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
    fig.suptitle(title or plot_title(record, None))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sticks", required=True, help="sticks.jsonl or sticks.jsonl.gz")
    parser.add_argument("--index", type=int, help="qm9_index to plot: the QM9 index for QM9 "
                        "inputs, else the record number in the input (default: the first record)")
    parser.add_argument("--out", required=True, help="output PNG")
    args = parser.parse_args(argv)
    meta = read_meta_beside(args.sticks)
    for rec in sticks.read(args.sticks):
        if args.index is None or rec.qm9_index == args.index:
            title = plot_title(rec, meta)
            plot_record(rec, args.out, title)
            print(f"wrote {args.out}: {title}, "
                  f"{np.asarray(rec.uv_energy_ev).size} UV / {rec.vib_freq_cm1.size} vib. sticks")
            return
    raise SystemExit(f"{args.sticks}: no record with qm9_index {args.index}")


if __name__ == "__main__":
    main()
