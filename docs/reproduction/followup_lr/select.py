"""Follow-up 6's selection: per arm, the fine-tuning learning rate with the lowest mean
validation MAE over seeds; then that learning rate's test MAE (PROTOCOL.md, written before the
results). Usage: python select.py STUDY_DIR [STUDY_DIR ...] (one study workdir per learning rate).
"""

import json
import os
import statistics
import sys


def load(study: str) -> tuple[float, dict]:
    """``(learning rate, {arm: {seed: (validation MAE, test MAE)}})`` of one study workdir."""
    protocol = json.load(open(os.path.join(study, "protocol.json")))
    protocol = protocol.get("protocol", protocol)
    lr = float(protocol["qm9"]["lr"])
    out: dict = {}
    root = os.path.join(study, "finetune", "homo")
    for arm in sorted(os.listdir(root)):
        for seed_dir in sorted(os.listdir(os.path.join(root, arm))):
            path = os.path.join(root, arm, seed_dir, "results.json")
            if not os.path.isfile(path):
                raise SystemExit(f"{path}: missing (stage not finished)")
            best = json.load(open(path))["best"]
            out.setdefault(arm, {})[seed_dir] = (best["validation"]["mae"], best["test"]["mae"])
    return lr, out


def main(studies: list[str]) -> None:
    table = dict(load(s) for s in studies)  # lr -> arm -> seed -> (val, test)
    arms = sorted({a for per_lr in table.values() for a in per_lr}, key=["scratch", "coord", "frad"].index)
    print("| arm | lr | validation MAE (meV, mean ± std) | test MAE (meV, mean ± std) |")
    print("|---|---|---|---|")
    for arm in arms:
        for lr in sorted(table):
            vals = [v for v, _ in table[lr][arm].values()]
            tests = [t for _, t in table[lr][arm].values()]
            print(f"| {arm} | {lr:g} | {statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} "
                  f"| {statistics.mean(tests):.2f} ± {statistics.stdev(tests):.2f} |")
    chosen = {arm: min(table, key=lambda lr: statistics.mean(v for v, _ in table[lr][arm].values()))
              for arm in arms}
    print("\nselected on validation:")
    scratch = statistics.mean(t for _, t in table[chosen["scratch"]]["scratch"].values())
    for arm in arms:
        per_seed = table[chosen[arm]][arm]
        test = statistics.mean(t for _, t in per_seed.values())
        change = "" if arm == "scratch" else f", {100 * (test / scratch - 1):+.1f} % vs scratch"
        paired = ""
        if arm != "scratch":
            ref = table[chosen["scratch"]]["scratch"]
            diffs = [100 * (per_seed[s][1] / ref[s][1] - 1) for s in sorted(per_seed)]
            paired = f"; paired by seed {', '.join(f'{d:+.1f}' for d in diffs)} %"
        print(f"- {arm}: lr {chosen[arm]:g}, test {test:.2f} ± "
              f"{statistics.stdev(t for _, t in per_seed.values()):.2f} meV{change}{paired}")


if __name__ == "__main__":
    main(sys.argv[1:])
