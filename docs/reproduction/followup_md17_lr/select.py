"""Follow-up 7's selection: per arm, the MD17 fine-tuning learning rate with the lowest mean
validation force MAE over seeds; then that learning rate's test force MAE (PROTOCOL.md, written
before the results). Usage: python select.py STUDY_DIR [STUDY_DIR ...], one study directory
(a workdir, or an exported one: results.json + protocol.json) per learning rate.
"""

import json
import os
import statistics
import sys

ARMS = ("scratch", "coord", "frad")


def load(study: str) -> tuple[float, dict]:
    """``(learning rate, {arm: {seed: (validation force MAE, test force MAE)}})``."""
    protocol = json.load(open(os.path.join(study, "protocol.json")))
    protocol = protocol.get("protocol", protocol)
    lr = float(protocol["md17"]["lr"])
    molecule = protocol["md17"]["molecule"]
    results = json.load(open(os.path.join(study, "results.json")))
    out: dict = {}
    for run in results["runs"]:
        if run["target"] != molecule or run["arm"] not in ARMS:
            continue
        if run.get("validation_mae") is None or run.get("test_mae") is None:
            raise SystemExit(f"{study}: {run['arm']} seed {run['seed']} has no result")
        out.setdefault(run["arm"], {})[run["seed"]] = (run["validation_mae"], run["test_mae"])
    for arm in ARMS:
        if len(out.get(arm, {})) != 3:
            raise SystemExit(f"{study}: arm {arm} has {len(out.get(arm, {}))} of 3 seeds")
    return lr, out


def main(studies: list[str]) -> None:
    table = dict(load(s) for s in studies)  # lr -> arm -> seed -> (val, test)
    print("| arm | lr | validation force MAE (kcal/mol/Å, mean ± std) | test force MAE (mean ± std) |")
    print("|---|---|---|---|")
    for arm in ARMS:
        for lr in sorted(table):
            vals = [v for v, _ in table[lr][arm].values()]
            tests = [t for _, t in table[lr][arm].values()]
            print(f"| {arm} | {lr:g} | {statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f} "
                  f"| {statistics.mean(tests):.4f} ± {statistics.stdev(tests):.4f} |")
    chosen = {arm: min(table, key=lambda lr: statistics.mean(v for v, _ in table[lr][arm].values()))
              for arm in ARMS}
    print("\nselected on validation:")
    ref = table[chosen["scratch"]]["scratch"]
    scratch = statistics.mean(t for _, t in ref.values())
    for arm in ARMS:
        per_seed = table[chosen[arm]][arm]
        test = statistics.mean(t for _, t in per_seed.values())
        line = (f"- {arm}: lr {chosen[arm]:g}, test {test:.4f} ± "
                f"{statistics.stdev(t for _, t in per_seed.values()):.4f} kcal/mol/Å")
        if arm != "scratch":
            diffs = [100 * (per_seed[s][1] / ref[s][1] - 1) for s in sorted(per_seed)]
            line += (f", {100 * (test / scratch - 1):+.1f} % vs scratch; paired by seed "
                     f"{', '.join(f'{d:+.1f}' for d in diffs)} %")
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
