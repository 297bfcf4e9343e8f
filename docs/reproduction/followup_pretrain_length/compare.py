"""Follow-up 9: Coord and Frad after 4,000 pre-training steps vs protocol v2's 1,000.

    python docs/reproduction/followup_pretrain_length/compare.py \
        docs/reproduction/v2/run docs/reproduction/followup_pretrain_length/run

Reads the ``runs`` of two study ``results.json`` files (protocol v2, 1,000 pre-training steps;
this follow-up, 4,000) and prints, per downstream target, the test MAE of ``coord`` and ``frad``
at each length (mean ± std over seeds), Frad vs Coord paired by seed at each length, and each
arm's change from 1,000 to 4,000 steps paired by seed. Test MAEs are in the study's reporting
units (meV; kcal/mol/Å for aspirin forces); every run was selected on validation by the study.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ARMS = ("coord", "frad")
TARGETS = ("homo", "lumo", "gap", "aspirin")


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
    """Mean over seeds of b/a - 1 (in %), the per-seed changes, and the seeds where b < a."""
    rel = [(b[k] / a[k] - 1.0) * 100.0 for k in keys]
    per_seed = ", ".join(f"{r:+.1f}" for r in rel)
    better = sum(r < 0 for r in rel)
    return f"{np.mean(rel):+.1f} % ({per_seed}): lower at {better} of {len(rel)}"


def main(short_dir: str, long_dir: str) -> None:
    short, long = load(short_dir), load(long_dir)
    print("| target | pre-training | Coord | Frad | Frad vs Coord (paired) |")
    print("|---|---|---|---|---|")
    for target in TARGETS:
        for label, runs in (("1,000 steps", short), ("4,000 steps", long)):
            seeds = sorted(s for (t, a, s) in runs if t == target and a == "coord"
                           and (t, "frad", s) in runs)
            if not seeds:
                continue
            c = {s: runs[(target, "coord", s)] for s in seeds}
            f = {s: runs[(target, "frad", s)] for s in seeds}
            print(f"| {target} | {label} | {_ms(list(c.values()))} | {_ms(list(f.values()))} | "
                  f"{_paired(c, f, seeds)} |")
    print()
    print("| target | arm | 1,000 steps | 4,000 steps | 4,000 vs 1,000 (paired) |")
    print("|---|---|---|---|---|")
    for target in TARGETS:
        for arm in ARMS:
            seeds = sorted(s for (t, a, s) in long if t == target and a == arm
                           and (t, a, s) in short)
            if not seeds:
                continue
            a = {s: short[(target, arm, s)] for s in seeds}
            b = {s: long[(target, arm, s)] for s in seeds}
            print(f"| {target} | {arm} | {_ms(list(a.values()))} | {_ms(list(b.values()))} | "
                  f"{_paired(a, b, seeds)} |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    main(sys.argv[1], sys.argv[2])
