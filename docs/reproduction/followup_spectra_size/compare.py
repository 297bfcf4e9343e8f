"""Follow-up 8: MolSpectra vs its denoising-only control, on the grown spectra set vs the study's.

    python docs/reproduction/followup_spectra_size/compare.py docs/reproduction runs/followup8

Reads the ``runs`` of two study ``results.json`` files (the main study's, stage 2 on
``qm9s/gfn2_qm9train:1.0.0``; this follow-up's, on ``:2.0.0``) and prints, per downstream target,
the test MAE of ``molspectra`` and ``coord_control`` in each (mean ± std over seeds), the
change ``molspectra`` vs ``coord_control`` paired by seed, and the change of each arm from the
small set to the grown one. Test MAEs are in the study's reporting units (meV; kcal/mol/Å for
aspirin forces). Nothing is selected here: every run was selected on validation by the study.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ARMS = ("molspectra", "coord_control")


def load(study_dir: str) -> dict:
    """``{(target, arm, seed): test_mae}`` of a study directory's ``results.json``."""
    with open(os.path.join(study_dir, "results.json")) as f:
        runs = json.load(f)["runs"]
    return {(r["target"], r["arm"], r["seed"]): r["test_mae"] for r in runs
            if r["arm"] in ARMS and r["test_mae"] is not None}


def _ms(values) -> str:
    v = np.asarray(values, float)
    d = 1 if v.mean() >= 10 else 3
    return f"{v.mean():.{d}f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.{d}f}"


def _paired(a: dict, b: dict, keys) -> str:
    """Mean over seeds of the relative change b/a - 1 (in %), and its seed range."""
    rel = np.array([b[k] / a[k] - 1.0 for k in keys]) * 100.0
    return f"{rel.mean():+.1f} % ({rel.min():+.1f} … {rel.max():+.1f})"


def table(small: dict, grown: dict) -> str:
    targets = sorted({t for t, _, _ in grown}, key=["homo", "lumo", "gap", "aspirin"].index)
    lines = [
        "| target | set | molspectra | coord_control | molspectra vs control (paired) |",
        "|---|---|---|---|---|",
    ]
    changes = ["", "| target | arm | small set | grown set | grown vs small (paired) |",
               "|---|---|---|---|---|"]
    for t in targets:
        for label, runs in (("1.0.0 (936)", small), ("2.0.0 (grown)", grown)):
            seeds = sorted(s for tt, a, s in runs if tt == t and a == "molspectra"
                           and (t, "coord_control", s) in runs)
            ms = [runs[(t, "molspectra", s)] for s in seeds]
            cc = [runs[(t, "coord_control", s)] for s in seeds]
            pair = _paired({s: runs[(t, "coord_control", s)] for s in seeds},
                           {s: runs[(t, "molspectra", s)] for s in seeds}, seeds)
            lines.append(f"| {t} | {label} | {_ms(ms)} | {_ms(cc)} | {pair} |")
        for arm in ARMS:
            seeds = sorted(s for tt, a, s in grown if tt == t and a == arm and (t, arm, s) in small)
            before = {s: small[(t, arm, s)] for s in seeds}
            after = {s: grown[(t, arm, s)] for s in seeds}
            changes.append(f"| {t} | {arm} | {_ms(list(before.values()))} | "
                           f"{_ms(list(after.values()))} | {_paired(before, after, seeds)} |")
    return "\n".join(lines + changes)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: compare.py SMALL_SET_STUDY_DIR GROWN_SET_STUDY_DIR")
    print(table(load(argv[0]), load(argv[1])))


if __name__ == "__main__":
    main(sys.argv[1:])
