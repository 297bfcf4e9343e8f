"""Validation of the spectra pipeline against higher-level references (results: docs/spectra.md).

    # GFN2-xTB harmonic frequencies vs the B3LYP/6-31G(2df,p) frequencies shipped by qm9pack
    python -m data_pipelines.spectra.validate freq --n 60 --seed 123 --out freq.json
    # sTDA vs full TDA (both B3LYP/def2-SVP, same SCF) on the smallest QM9 molecules
    python -m data_pipelines.spectra.validate tda --max-heavy 4 --n 24 --nstates 12 --out tda.json

`freq` re-optimises each QM9 molecule with GFN2 and compares the sorted lists of 3N-6 wavenumbers
with QM9's (mean absolute deviation per molecule, then statistics over molecules). `tda` runs one
SCF per molecule at the QM9 geometry and compares, for the lowest state and for the lowest bright
state (f >= `--bright`), sTDA with PySCF's full TDA.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import time

import numpy as np
from tqdm import tqdm

from data_pipelines import qm9pack_source
from data_pipelines.spectra import stda, vibrations
from data_pipelines.spectra.inputs import qm9_sample_positions


def qm9_rows(positions=None, max_heavy: int | None = None, limit: int | None = None):
    """Parsed qm9pack records plus their B3LYP frequencies, by row position or by size."""
    wanted = None if positions is None else {int(p) for p in positions}
    out = []
    for p, (row, where) in enumerate(qm9pack_source.raw_rows()):
        if wanted is not None and p not in wanted:
            continue
        rec = qm9pack_source.parse_row(row, where)
        if max_heavy is not None and int((rec["atomic_numbers"] > 1).sum()) > max_heavy:
            continue
        rec["b3lyp_freq_cm1"] = qm9pack_source.parse_numbers(row["Harmonic_Freq_cmi"])
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
        if wanted is not None and len(out) == len(wanted):
            break
    return out


def validate_frequencies(n: int, seed: int) -> dict:
    rows = qm9_rows(positions=qm9_sample_positions(n, seed))
    per_mol = []
    for rec in tqdm(rows, desc="GFN2 vs B3LYP frequencies", unit="mol"):
        start = time.perf_counter()
        try:
            vib = vibrations.vibrational_spectrum(rec["atomic_numbers"], rec["positions"])
        except vibrations.VibrationError as e:
            per_mol.append({"index": rec["index"], "failed": str(e)})
            continue
        seconds = time.perf_counter() - start
        ours, ref = np.sort(vib.freq_cm1), np.sort(rec["b3lyp_freq_cm1"])
        if ours.shape != ref.shape:
            per_mol.append({"index": rec["index"], "failed": f"{ours.size} vs {ref.size} modes"})
            continue
        diff = ours - ref
        high = ref > 2500  # X-H stretches
        per_mol.append({"index": rec["index"], "smiles": rec["smiles"], "n_atoms": int(rec["atomic_numbers"].size),
                        "mad_cm1": float(np.abs(diff).mean()), "msd_cm1": float(diff.mean()),
                        "mad_below_2500_cm1": float(np.abs(diff[~high]).mean()),
                        "mad_above_2500_cm1": float(np.abs(diff[high]).mean()) if high.any() else None,
                        "lowest_gfn2_cm1": float(ours[0]), "seconds": round(seconds, 2)})
    ok = [m for m in per_mol if "failed" not in m]
    mads = np.array([m["mad_cm1"] for m in ok])
    summary = {
        "n_molecules": len(ok), "n_failed": len(per_mol) - len(ok), "seed": seed,
        "mad_mean_cm1": float(mads.mean()), "mad_median_cm1": float(np.median(mads)),
        "mad_p10_p90_cm1": [float(np.percentile(mads, 10)), float(np.percentile(mads, 90))],
        "msd_mean_cm1": float(np.mean([m["msd_cm1"] for m in ok])),
        "mad_below_2500_mean_cm1": float(np.mean([m["mad_below_2500_cm1"] for m in ok])),
        "mad_above_2500_mean_cm1": float(np.mean([m["mad_above_2500_cm1"] for m in ok
                                                  if m["mad_above_2500_cm1"] is not None])),
        "seconds_median": float(np.median([m["seconds"] for m in ok])),
    }
    return {"summary": summary, "molecules": per_mol}


def _first_bright(energy, osc, threshold):
    idx = np.nonzero(osc >= threshold)[0]
    return (float(energy[idx[0]]), float(osc[idx[0]])) if idx.size else (None, None)


def validate_tda(n: int, max_heavy: int, nstates: int, bright: float) -> dict:
    from pyscf import tdscf

    rows = qm9_rows(max_heavy=max_heavy, limit=n)
    per_mol = []
    for rec in tqdm(rows, desc="sTDA vs full TDA", unit="mol"):
        t0 = time.perf_counter()
        mf = stda.run_scf(rec["atomic_numbers"], rec["positions"])
        t1 = time.perf_counter()
        s = stda.stda(mf, stda.EXACT_EXCHANGE["b3lyp"], e_thr_ev=16.0, max_energy_ev=15.0)
        t2 = time.perf_counter()
        td = tdscf.TDA(mf)
        td.nstates = nstates
        td.verbose = 0
        td.kernel()
        t3 = time.perf_counter()
        e_full = np.asarray(td.e) * stda.HARTREE_EV
        f_full = np.asarray(td.oscillator_strength())
        b_s, fb_s = _first_bright(s.energy_ev, s.osc_strength, bright)
        b_f, fb_f = _first_bright(e_full, f_full, bright)
        per_mol.append({
            "index": rec["index"], "smiles": rec["smiles"],
            "s1_stda_ev": float(s.energy_ev[0]), "s1_tda_ev": float(e_full[0]),
            "bright_stda_ev": b_s, "bright_stda_f": fb_s, "bright_tda_ev": b_f,
            "bright_tda_f": fb_f, "tda_highest_state_ev": float(e_full[-1]),
            "stda_states_to_15ev": int(s.energy_ev.size),
            "seconds_scf": round(t1 - t0, 2), "seconds_stda": round(t2 - t1, 3),
            "seconds_tda": round(t3 - t2, 2)})
    s1 = np.array([m["s1_stda_ev"] - m["s1_tda_ev"] for m in per_mol])
    both = [m for m in per_mol if m["bright_stda_ev"] is not None and m["bright_tda_ev"] is not None]
    db = np.array([m["bright_stda_ev"] - m["bright_tda_ev"] for m in both])
    summary = {
        "n_molecules": len(per_mol), "max_heavy_atoms": max_heavy, "tda_nstates": nstates,
        "bright_threshold_f": bright,
        "s1_error_mean_ev": float(s1.mean()), "s1_error_mae_ev": float(np.abs(s1).mean()),
        "s1_error_max_abs_ev": float(np.abs(s1).max()),
        "n_bright_compared": len(both),
        "bright_error_mean_ev": float(db.mean()) if db.size else None,
        "bright_error_mae_ev": float(np.abs(db).mean()) if db.size else None,
        "bright_error_max_abs_ev": float(np.abs(db).max()) if db.size else None,
    }
    return {"summary": summary, "molecules": per_mol}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("freq")
    f.add_argument("--n", type=int, default=60)
    f.add_argument("--seed", type=int, default=123)
    f.add_argument("--out", required=True)
    t = sub.add_parser("tda")
    t.add_argument("--n", type=int, default=12)
    t.add_argument("--max-heavy", type=int, default=3)
    t.add_argument("--nstates", type=int, default=12)
    t.add_argument("--bright", type=float, default=0.01)
    t.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "freq":
        result = validate_frequencies(args.n, args.seed)
    else:
        result = validate_tda(args.n, args.max_heavy, args.nstates, args.bright)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
