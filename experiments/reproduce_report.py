"""The reproduction study's outputs: ``results.json``, ``report.md`` and PNG figures.

Everything here is read back from the stage workdirs (``stage.json``, ``results.json``,
``metrics.jsonl``), so the report can be rewritten at any time (``--report-only``) and shows a
partial study as partial. Test MAEs are those of each run's best-validation checkpoint (model
selection on validation only); means and sample standard deviations are over fine-tuning seeds.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from mspec.training import downstream

# The published row each arm is compared with (the tables in mspec/training/targets.py): QM9 from the
# MolSpectra table (its TorchMD-Net and Coord rows) plus Frad's own table; MD17 aspirin, 950
# frames, from the Frad table (it has no Coord row at 950 frames).
PUBLISHED_ROW = {
    "qm9": {"scratch": "TorchMD-Net", "coord": "Coord (MolSpectra table)", "frad": "Frad",
            "molspectra": "MolSpectra"},
    "md17": {"scratch": "TorchMD-Net", "frad": "Frad"},
}
ARM_LABELS = {"scratch": "scratch", "coord": "Coord", "frad": "Frad", "molspectra": "MolSpectra",
              "coord_control": "Coord + denoising only (control)"}
ARM_COLORS = {"scratch": "#555555", "coord": "#1f77b4", "frad": "#d62728",
              "molspectra": "#2ca02c", "coord_control": "#9467bd"}


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_metrics(path: str) -> dict[int, dict]:
    """``{step: merged record}`` from a ``metrics.jsonl``; a re-run step keeps its last record,
    and a torn last line (a killed write) is ignored."""
    out: dict[int, dict] = {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault(int(rec["step"]), {}).update(rec)
    return dict(sorted(out.items()))


def _kind(p, target: str) -> downstream.Downstream:
    """The downstream kind of a target: one of the protocol's QM9 targets, or its MD17 molecule."""
    return downstream.of("qm9" if target in p.qm9.targets else "md17")


def unit(p, target: str) -> str:
    return _kind(p, target).headline_unit(target)


def published(p, target: str) -> dict[str, float]:
    """``{arm: published MAE}`` for the arms that have a published row."""
    kind = _kind(p, target)
    numbers = kind.published(target, 950 if kind.forces else None)
    return {arm: numbers[row] for arm, row in PUBLISHED_ROW[kind.task].items() if row in numbers}


def collect(p, stages, workdir: str) -> dict:
    """All measured numbers of the study so far (the content of ``results.json``)."""
    from experiments import reproduce_stages

    stage_rows, runs = {}, []
    for st in stages:
        d = st.workdir(workdir)
        status = reproduce_stages.read_status(d)
        row = {"status": status.get("status", "pending"), "steps": st.steps,
               "wall_s": round(status.get("wall_s", 0.0), 1),
               "attempts": len(status.get("attempts", [])),
               "estimate_s": round(st.estimate_s, 1),
               "log": os.path.relpath(os.path.join(d, "log.txt"), workdir)}
        if status.get("error"):
            row["error"] = status["error"]
        metrics = read_metrics(os.path.join(d, "metrics.jsonl"))
        if st.kind == "pretrain" and metrics:
            train = [(s, r["train/loss"]) for s, r in metrics.items() if "train/loss" in r]
            evals = {k: v for r in metrics.values() for k, v in r.items() if k.startswith("eval/")}
            row["train_loss_curve"] = train
            row["final_train_loss"] = train[-1][1] if train else None
            row["final_eval"] = evals
        stage_rows[st.name] = row
        if st.kind != "finetune" or row["status"] != "done":
            continue
        res = _read_json(os.path.join(d, "results.json")) or {}
        best, last = res.get("best", {}), res.get("last", {})
        kind = _kind(p, st.target)
        key = kind.headline
        # The validation metric: QM9's MAE (training units), MD17's composite (kcal/mol(/Å)).
        factor = 1.0 if kind.forces else kind.report_factor(st.target)
        curve = [(s, r["eval/metric"] * factor) for s, r in metrics.items() if "eval/metric" in r]
        runs.append({
            "arm": st.arm, "target": st.target, "seed": st.seed,
            "test_mae": best.get("test", {}).get(key),
            "validation_mae": best.get("validation", {}).get(key),
            "best_step": best.get("step"),
            "last_test_mae": last.get("test", {}).get(key),
            "test_energy_mae": best.get("test", {}).get("energy_mae"),
            "test_size": res.get("split_sizes", {}).get("test"),
            "train_size": res.get("split_sizes", {}).get("train"),
            "train_mean_test_mae": best.get("test", {}).get("train_mean_mae",
                                                            best.get("test", {}).get("zero_forces_mae")),
            "validation_curve": curve,
        })
    summary = {}
    for target in _targets(p):
        pub = published(p, target)
        rows = {}
        for arm in p.arms:
            vals = [r["test_mae"] for r in runs if r["arm"] == arm and r["target"] == target
                    and r["test_mae"] is not None]
            if not vals:
                continue
            baseline = [r["train_mean_test_mae"] for r in runs if r["arm"] == arm
                        and r["target"] == target and r["train_mean_test_mae"] is not None]
            rows[arm] = {"n": len(vals), "mean": float(np.mean(vals)),
                         "baseline_mean": float(np.mean(baseline)) if baseline else None,
                         "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                         "min": float(min(vals)), "max": float(max(vals)), "values": vals}
        base = rows.get("scratch", {}).get("mean")
        for arm, r in rows.items():
            r["change_vs_scratch"] = (r["mean"] - base) / base if base else None
            if arm in pub and "scratch" in pub:
                r["published"] = pub[arm]
                r["published_change_vs_scratch"] = (pub[arm] - pub["scratch"]) / pub["scratch"]
        if "molspectra" in rows and "coord_control" in rows:
            c = rows["coord_control"]["mean"]
            rows["molspectra"]["change_vs_control"] = (rows["molspectra"]["mean"] - c) / c
        summary[target] = {"unit": unit(p, target), "arms": rows, "published": pub,
                           "checks": goal_checks(rows),
                           "paired": paired_changes(runs, target, p.arms)}
    return {
        "scale": p.scale,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "protocol": json.loads(p.to_json_best_effort()),
        "stages": stage_rows,
        "complete": all(r["status"] == "done" for r in stage_rows.values()),
        "summary": summary,
        "runs": runs,
    }


# Each arm is compared with its reference arm at the same fine-tuning seed.
PAIRED_REFERENCE = {"coord": "scratch", "frad": "scratch", "molspectra": "coord_control",
                    "coord_control": "scratch"}


def paired_changes(runs: list[dict], target: str, arms) -> dict[str, dict]:
    """Relative change of each arm's test MAE vs its reference arm at the *same* seed.

    A seed fixes the fresh heads' initialisation and the data order, which every arm shares, so
    a seed that is hard for one arm tends to be hard for all: the per-seed difference removes
    that shared part of the spread. Returns ``{arm: {"reference", "changes" (one per seed both
    arms finished, ordered by seed), "seeds", "mean_change", "better"}}`` (``better``: seeds where
    the arm's MAE is below its reference's).
    """
    mae = {(r["arm"], r["seed"]): r["test_mae"] for r in runs
           if r["target"] == target and r["test_mae"] is not None}
    out = {}
    for arm in arms:
        ref = PAIRED_REFERENCE.get(arm)
        if ref is None or ref not in arms:
            continue
        seeds = sorted(s for (a, s) in mae if a == arm and (ref, s) in mae)
        if not seeds:
            continue
        changes = [(mae[(arm, s)] - mae[(ref, s)]) / mae[(ref, s)] for s in seeds]
        out[arm] = {"reference": ref, "seeds": seeds, "changes": changes,
                    "mean_change": float(np.mean(changes)),
                    "better": sum(c < 0 for c in changes)}
    return out


def paired_table(t: dict) -> list[str]:
    """Markdown rows of :func:`paired_changes` for one target."""
    if not t.get("paired"):
        return []
    lines = ["Paired by seed (each seed's change vs the reference arm at the same seed):", "",
             "| arm | vs | change per seed | mean change | better in |", "|---|---|---|---|---|"]
    for arm, r in t["paired"].items():
        per_seed = ", ".join(f"{_pct(c)} (seed {s})" for s, c in zip(r["seeds"], r["changes"]))
        lines.append(f"| {ARM_LABELS[arm]} | {ARM_LABELS[r['reference']]} | {per_seed} | "
                     f"{_pct(r['mean_change'])} | {r['better']} of {len(r['seeds'])} seeds |")
    return lines + [""]


def _targets(p) -> list[str]:
    return list(p.qm9.targets) + ([p.md17.molecule] if p.md17.molecule else [])


def goal_checks(rows: dict) -> dict[str, bool | None]:
    """The study's stated goals, checked mechanically (``None``: an arm is missing)."""
    def have(*arms):
        return all(a in rows for a in arms)

    out: dict[str, bool | None] = {}
    out["order scratch > Coord > Frad (means)"] = (
        rows["scratch"]["mean"] > rows["coord"]["mean"] > rows["frad"]["mean"]
        if have("scratch", "coord", "frad") else None)
    out["seed ranges do not overlap (Frad < Coord < scratch)"] = (
        rows["frad"]["max"] < rows["coord"]["min"] and rows["coord"]["max"] < rows["scratch"]["min"]
        if have("scratch", "coord", "frad")
        and min(rows[a].get("n", 2) for a in ("scratch", "coord", "frad")) > 1 else None)
    for arm in ("coord", "frad"):
        r = rows.get(arm, {})
        pub = r.get("published_change_vs_scratch")
        out[f"{ARM_LABELS[arm]} gain >= half the published gain"] = (
            r["change_vs_scratch"] <= 0.5 * pub if pub is not None and r.get("change_vs_scratch") is not None
            else None)
    out["MolSpectra <= its denoising-only control (means)"] = (
        rows["molspectra"]["mean"] <= rows["coord_control"]["mean"]
        if have("molspectra", "coord_control") else None)
    return out


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: str) -> str:
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(p, results: dict, target: str, path: str) -> str | None:
    runs = [r for r in results["runs"] if r["target"] == target and r["validation_curve"]]
    if not runs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in p.arms:
        arm_runs = [r for r in runs if r["arm"] == arm]
        if not arm_runs:
            continue
        color = ARM_COLORS.get(arm)
        for r in arm_runs:
            s, v = zip(*r["validation_curve"])
            ax.plot(s, v, color=color, alpha=0.35, lw=0.8)
        steps = sorted({s for r in arm_runs for s, _ in r["validation_curve"]})
        mean = [np.mean([dict(r["validation_curve"])[s] for r in arm_runs
                         if s in dict(r["validation_curve"])]) for s in steps]
        ax.plot(steps, mean, color=color, lw=2, label=f"{ARM_LABELS[arm]} (n={len(arm_runs)})")
    forces = _kind(p, target).forces
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step")
    metric = "0.2 MAE_E + 0.8 MAE_F" if forces else "MAE"
    ax.set_ylabel(f"validation {metric} ({'kcal/mol(/Å)' if forces else unit(p, target)})")
    ax.set_title(f"{target}: validation during fine-tuning (thin: seeds, thick: mean)")
    return _finish(plt, fig, ax, path)


def plot_test(p, results: dict, path: str) -> str | None:
    targets_ = [t for t in _targets(p) if results["summary"].get(t, {}).get("arms")]
    if not targets_:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(targets_), figsize=(3.6 * len(targets_), 3.8), squeeze=False)
    for ax, target in zip(axes[0], targets_):
        rows = results["summary"][target]["arms"]
        arms = [a for a in p.arms if a in rows]
        for x, arm in enumerate(arms):
            r = rows[arm]
            ax.errorbar([x], [r["mean"]], yerr=[[r["std"]], [r["std"]]], fmt="o", ms=7, capsize=5,
                        color=ARM_COLORS.get(arm))
            ax.scatter([x + 0.15] * len(r["values"]), r["values"], s=12, color=ARM_COLORS.get(arm),
                       alpha=0.6)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([ARM_LABELS[a].split(" (")[0].replace(" + denoising only", "\n+ den. only")
                            for a in arms], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{target} test MAE ({results['summary'][target]['unit']})", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("best-validation checkpoint, mean ± std over seeds (dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pretraining(results: dict, path: str) -> str | None:
    rows = {n: r for n, r in results["stages"].items() if r.get("train_loss_curve")}
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in rows.items():
        s, v = zip(*r["train_loss_curve"])
        arm = name.split("/", 1)[1]
        ax.plot(s, v, label=ARM_LABELS.get(arm, arm), color=ARM_COLORS.get(arm))
    ax.set_yscale("log")
    ax.set_xlabel("step (stage 2 counts from its own start)")
    ax.set_ylabel("training loss (total)")
    ax.set_title("pre-training loss")
    return _finish(plt, fig, ax, path)


# --------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:+.1f} %"


def _num(x, unit_: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4g}" if "kcal" in unit_ or x < 1 else f"{x:.2f}"


def _check(v) -> str:
    return "n/a" if v is None else ("yes" if v else "**no**")


def summary_table(p, results: dict) -> list[str]:
    """One row per arm, one column per target: test MAE mean ± std (seeds) and change vs scratch."""
    tgts = [t for t in _targets(p) if t in results["summary"]]
    head = "| arm | " + " | ".join(f"{t} ({results['summary'][t]['unit']})" for t in tgts) + " |"
    lines = [head, "|---|" + "---|" * len(tgts)]
    for arm in p.arms:
        cells = []
        for t in tgts:
            r = results["summary"][t]["arms"].get(arm)
            u = results["summary"][t]["unit"]
            if r is None:
                cells.append("–")
                continue
            cell = _num(r["mean"], u) + (f" ± {_num(r['std'], u)}" if r["n"] > 1 else "") + f" (n={r['n']})"
            if arm != "scratch" and r.get("change_vs_scratch") is not None:
                cell += f", {_pct(r['change_vs_scratch'])}"
                if r.get("published_change_vs_scratch") is not None:
                    cell += f" [paper {_pct(r['published_change_vs_scratch'])}]"
            cells.append(cell)
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    return lines


def render(p, results: dict, figures: dict[str, str]) -> str:
    s = results["stages"]
    done = sum(r["status"] == "done" for r in s.values())
    version = p.get("protocol_version", "")
    lines = [f"# Reproduction study, scale `{p.scale}`"
             + (f", protocol v{version}" if version else ""), ""]
    lines.append(f"Written {results['written']}. Stages done: {done} of {len(s)}"
                 + (" (complete)." if results["complete"] else " (**partial**: re-run the same command to continue)."))
    failed = {n: r for n, r in s.items() if r["status"] == "failed"}
    if failed:
        lines += ["", "**Failed stages** (the others went on):", ""]
        lines += [f"- `{n}`: {r.get('error', '')} (log `{r['log']}`)" for n, r in failed.items()]
    lines += ["", "## Summary", "",
              "Test MAE of the best-validation checkpoint, mean ± std over seeds (n), change of the "
              "mean vs scratch, [the papers' change vs their scratch ET].", ""]
    lines += summary_table(p, results)
    lines += ["", "## Test MAE (best-validation checkpoint, mean ± std over seeds)", ""]
    for target, t in results["summary"].items():
        u = t["unit"]
        lines += [f"### {target} ({u})", "",
                  "| arm | test MAE | seeds | change vs scratch | published | published change vs scratch |",
                  "|---|---|---|---|---|---|"]
        baseline = next((r["baseline_mean"] for r in t["arms"].values() if r.get("baseline_mean")), None)
        for arm in p.arms:
            r = t["arms"].get(arm)
            if r is None:
                lines.append(f"| {ARM_LABELS[arm]} | not run yet | 0 | | | |")
                continue
            extra = (f" ({_pct(r['change_vs_control'])} vs control)" if "change_vs_control" in r else "")
            lines.append(
                f"| {ARM_LABELS[arm]} | {_num(r['mean'], u)}"
                f"{' ± ' + _num(r['std'], u) if r['n'] > 1 else ''} | {r['n']} | "
                f"{_pct(r['change_vs_scratch']) if arm != 'scratch' else ''}{extra} | "
                f"{_num(r.get('published'), u) if 'published' in r else '–'} | "
                f"{_pct(r.get('published_change_vs_scratch')) if arm != 'scratch' and 'published' in r else ''} |")
        if baseline is not None:
            what = "predicting zero forces" if _kind(p, target).forces else "predicting the training mean"
            lines += ["", f"Reference: {what} gives a test MAE of {_num(baseline, u)} {u}."]
        lines += [""] + paired_table(t)
        lines += ["| goal | met |", "|---|---|"]
        lines += [f"| {k} | {_check(v)} |" for k, v in t["checks"].items()]
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{name}]({os.path.basename(path)})" for name, path in figures.items()]
        lines.append("")
    lines += ["## Stages (wall time on this machine, steps)", "",
              "| stage | status | steps | wall time | estimate | attempts |", "|---|---|---|---|---|---|"]
    total = 0.0
    for name, r in s.items():
        total += r["wall_s"]
        lines.append(f"| `{name}` | {r['status']} | {r['steps']:,} | {r['wall_s'] / 60:.1f} min | "
                     f"{r['estimate_s'] / 60:.1f} min | {r['attempts']} |")
    lines += ["", f"Total wall time of the stages so far: {total / 3600:.2f} h.", ""]
    pre = {n: r for n, r in s.items() if r.get("final_eval")}
    if pre:
        lines += ["Pre-training, last validation:", ""]
        for n, r in pre.items():
            ev = ", ".join(f"{k[5:]} {v:.4g}" for k, v in sorted(r["final_eval"].items()))
            lines.append(f"- `{n}`: {ev}")
        lines.append("")
    lines += ["## Protocol (fixed before the results were seen)", "", "```json",
              json.dumps(results["protocol"], indent=1), "```", ""]
    return "\n".join(lines)


def write(p, stages, workdir: str) -> dict:
    """Collects the study's numbers and writes results.json, report.md and the figures."""
    results = collect(p, stages, workdir)
    figures = {}
    for target in _targets(p):
        path = plot_curves(p, results, target, os.path.join(workdir, f"validation_{target}.png"))
        if path:
            figures[f"validation curves, {target}"] = path
    path = plot_test(p, results, os.path.join(workdir, "test_mae.png"))
    if path:
        figures["test MAE per arm"] = path
    path = plot_pretraining(results, os.path.join(workdir, "pretraining_loss.png"))
    if path:
        figures["pre-training loss"] = path
    results["figures"] = {k: os.path.basename(v) for k, v in figures.items()}
    for name, text in (("results.json", json.dumps(results, indent=1, ensure_ascii=False)),
                       ("report.md", render(p, results, figures))):
        path = os.path.join(workdir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return results
