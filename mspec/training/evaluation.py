"""Evaluation of fine-tuning checkpoints: MAE in the papers' units, results.json, parity plots.

``evaluate(setup, workdir)`` evaluates the last checkpoint (``workdir/checkpoints``) and the
best-validation one (``workdir/best``) on the validation and test splits, and writes

* ``workdir/results.json``: per checkpoint and split, MAEs in training and report units (exact
  per-sample means over the whole split), the train-mean predictor's MAE, the published numbers;
* ``workdir/parity_<which>.png``: predicted vs true on the test split (MD17: energy and force
  components), with the MAE in each panel; ``results.json`` names it relative to the workdir;

and prints a table of the test MAEs beside the published numbers. ``setup`` is the run's
:class:`mspec.training.finetune.Setup`; :func:`mspec.training.finetune.evaluate_workdir` builds
it from a workdir's ``config.json``. This module sits below the trainer: it reads a setup through
its methods and never imports the fine-tuning module.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import numpy as np

from mspec.training import checkpoint, downstream

MAX_PARITY_POINTS = 20_000


def _mae(a, b) -> float:
    return float(np.mean(np.abs(np.asarray(a) - np.asarray(b))))


def split_metrics(setup, pred: dict) -> dict[str, Any]:
    """MAEs of one split (training and report units) and the train-mean predictor's MAE."""
    cfg = setup.config
    name = cfg.target.name
    # The train-mean predictor: fitted mean (+ atom references), the same for every molecule.
    baseline = setup.fitted.mean + pred["ref"]
    kind = downstream.of(cfg.task)
    if not kind.forces:
        f = kind.report_factor(name)
        mae = _mae(pred["y_pred"], pred["y_true"])
        base = _mae(baseline, pred["y_true"])
        return {
            "n": int(len(pred["y_true"])),
            "mae": mae * f,
            "mae_training_units": mae,
            "train_mean_mae": base * f,
            "unit": kind.report_unit(name),
            "training_unit": kind.training_unit(name),
        }
    mae_e = _mae(pred["y_pred"], pred["y_true"])
    mae_f = _mae(pred["f_pred"], pred["f_true"])
    return {
        "n": int(len(pred["y_true"])),
        "energy_mae": mae_e,
        "forces_mae": mae_f,
        "train_mean_energy_mae": _mae(baseline, pred["y_true"]),
        # Predicting zero forces (the mean force is 0 by symmetry of the MD sampling).
        "zero_forces_mae": float(np.mean(np.abs(pred["f_true"]))),
        "energy_unit": "kcal/mol",
        "forces_unit": "kcal/mol/Å",
    }


def parity_figure(task: str, name: str, pred: dict, title: str):
    """Predicted vs true (a matplotlib ``Figure``), one panel per quantity, each showing its MAE."""
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)

    def panel(ax, true, predicted, label, unit):
        true, predicted = np.asarray(true).ravel(), np.asarray(predicted).ravel()
        mae, n = _mae(predicted, true), len(true)  # over every point, before any subsampling
        if len(true) > MAX_PARITY_POINTS:
            keep = rng.choice(len(true), MAX_PARITY_POINTS, replace=False)
            true, predicted = true[keep], predicted[keep]
        lo, hi = float(min(true.min(), predicted.min())), float(max(true.max(), predicted.max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1)
        ax.scatter(true, predicted, s=3, alpha=0.4, rasterized=True)
        # The MAE in the figure itself, so a picture on its own says how good the fit is.
        ax.text(0.04, 0.96, f"MAE {mae:.4g} {unit}\n(n = {n:,})",
                transform=ax.transAxes, va="top", ha="left", fontsize=10,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
        ax.set_xlabel(f"true {label} ({unit})")
        ax.set_ylabel(f"predicted {label} ({unit})")
        ax.set_aspect("equal", adjustable="datalim")

    kind = downstream.of(task)
    if not kind.forces:
        f = kind.report_factor(name)
        fig = Figure(figsize=(5, 5))
        axes = [fig.add_subplot(1, 1, 1)]
        panel(axes[0], pred["y_true"] * f, pred["y_pred"] * f, name, kind.report_unit(name))
    else:
        fig = Figure(figsize=(10, 5))
        axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
        # Energies relative to the mean true energy (absolute values are ~1e5 kcal/mol).
        e0 = float(np.mean(pred["y_true"]))
        panel(axes[0], pred["y_true"] - e0, pred["y_pred"] - e0, "E - <E>", "kcal/mol")
        panel(axes[1], pred["f_true"], pred["f_pred"], "force component", "kcal/mol/Å")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def parity_plot(task: str, name: str, pred: dict, path: str, title: str) -> str:
    """Writes :func:`parity_figure` as a PNG (test split) and returns its path."""
    tmp = path + ".tmp.png"
    parity_figure(task, name, pred, title).savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path


def _restore_params(setup, directory: str) -> tuple[int, Any] | None:
    if not os.path.isdir(directory):
        return None
    # Read-only: the run may still be training and saving into this directory.
    ckpt = checkpoint.Checkpointer(directory, keep=1, async_save=False, read_only=True)
    try:
        if ckpt.latest_step() is None:
            return None
        step, state, _, _ = ckpt.restore(setup.abstract_state())
        return step, state["params"]
    finally:
        ckpt.close()


def format_table(results: dict) -> str:
    """Test MAEs beside the published numbers, as a markdown table."""
    kind, name = downstream.of(results["task"]), results["target"]
    key = kind.headline
    if not kind.forces:
        rows = [("method", f"test MAE {name} ({results['unit']})")]
    else:
        rows = [("method", f"test force MAE {name} ({kind.headline_unit(name)})",
                 f"test energy MAE ({kind.report_unit('energy')})")]
    extra = ("",) if kind.forces else ()
    for which in ("last", "best"):
        r = results.get(which)
        if r and "test" in r:
            label = f"mspec ({'last' if which == 'last' else 'best validation'}, step {r['step']})"
            row = (label, f"{r['test'][key]:.4g}")
            if kind.forces:
                row += (f"{r['test']['energy_mae']:.4g}",)
            rows.append(row)
    test = (results.get("last") or results.get("best") or {}).get("test")
    if test:
        rows.append((kind.baseline_name, f"{test[kind.baseline]:.4g}") + extra)
    for method, value in results["published"].items():
        rows.append((f"{method} [published]", f"{value:.4g}") + extra)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def evaluate(setup, workdir: str, which=("last", "best"), roles=("validation", "test"),
             validation_max_molecules: int = 0) -> dict:
    """Evaluates a fine-tuning run's last and best checkpoints; writes results.json + PNGs.

    Args:
        setup: the run's :class:`mspec.training.finetune.Setup`.
        workdir: the run's workdir (``checkpoints/``, ``best/``; results are written there).
        which: checkpoints to evaluate, of ``"last"`` and ``"best"``.
        roles: splits to evaluate, of ``"validation"`` and ``"test"``.
        validation_max_molecules: > 0 evaluates only the first that many validation molecules
            (the subset used for model selection); the test split is always evaluated whole.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    # Every process predicts (the predictions are gathered collectively); process 0 writes.
    writer = jax.process_index() == 0
    cfg = setup.config
    name = cfg.target.name
    kind = downstream.of(cfg.task)
    train_frames = len(setup.sources["train"]) if kind.forces else None
    results: dict[str, Any] = {
        "task": cfg.task,
        "target": name,
        "dataset": cfg.data.dataset,
        "splits": {r: cfg.data[f"{r}_split"] for r in ("train", "validation", "test")},
        "split_sizes": {r: len(s) for r, s in setup.sources.items()},
        "standardizer": {"mean": setup.standardizer.mean, "std": setup.standardizer.std},
        "published": kind.published(name, train_frames),
    }
    if not kind.forces:
        results["unit"] = kind.report_unit(name)
    else:
        results["unit"] = "kcal/mol/Å (forces), kcal/mol (energy)"
        if cfg.data.dataset.startswith("md17/gfn2_"):
            results["note"] = ("GFN2-xTB stand-in data, not the DFT MD17: not comparable with the "
                               "published numbers")
    path = os.path.join(workdir, "results.json")
    if os.path.isfile(path):  # Keep the entries of checkpoints not re-evaluated now.
        with open(path) as f:
            previous = json.load(f)
        results.update({w: previous[w] for w in ("last", "best") if w in previous and w not in which})
    dirs = {"last": os.path.join(workdir, "checkpoints"), "best": os.path.join(workdir, "best")}
    for w in which:
        restored = _restore_params(setup, dirs[w])
        if restored is None:
            print(f"no {w} checkpoint in {dirs[w]}; skipped", file=sys.stderr)
            continue
        step, params = restored
        entry: dict[str, Any] = {"step": int(step)}
        for role in roles:
            limit = validation_max_molecules if role == "validation" and validation_max_molecules > 0 else None
            pred = setup.predict(params, role, limit)
            entry[role] = split_metrics(setup, pred)
            if role == "test":
                png = os.path.join(workdir, f"parity_{w}.png")
                if writer:
                    parity_plot(cfg.task, name, pred, png,
                                f"{cfg.data.dataset} {name}: {w} checkpoint (step {step}), test")
                entry["parity_plot"] = os.path.relpath(png, workdir)  # the workdir can move
        results[w] = entry
    if not writer:
        return results
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    print(format_table(results), file=sys.stderr)
    if "note" in results:
        print(f"NOTE: {results['note']}", file=sys.stderr)
    print(f"results: {path}", file=sys.stderr)
    return results
