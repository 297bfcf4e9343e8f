"""Fine-tuning step time of mspec vs torchmd-net 3.1.0 on identical real molecules.

    python -m benchmarks.finetune_step                       # all workloads, hugetlb + tuned malloc
    python -m benchmarks.finetune_step --workloads md17-b8 --paths config --repeats 3
    python -m benchmarks.finetune_step --repeats 2 --record  # append a section to BENCHMARKS.md

How to run it: build the reference venv first (``~/torchref-venv``, docs/spec/benchmark-protocol.md
§2; without it only mspec is timed, with a ``reference skipped`` line). Each run is one subprocess;
a full default run (3 workloads × 2 mspec paths × 2 allocator settings, each with the reference)
takes about 13 minutes per repeat on 2 cores (QM9 about 7 of them). The machine should be
otherwise idle (pause background jobs; the reference's QM9 step slows down 2–4x under contention):
the summary prints the load average seen at the start and the end. ``--record`` appends the table, the ratio lines
and the machine/versions to BENCHMARKS.md.

Workloads (docs/spec/benchmark-protocol.md §5; same protocol as ``benchmarks/train_step.py``):

* ``qm9``: the QM9 fine-tuning step of ``experiments/configs/finetune_qm9.py:homo`` (ET H=256,
  8 layers, 64 RBF, per-layer norms + whitened vector norm; scalar head with sum readout and
  the training-set standardiser; Noisy Nodes: Coord noise 0.005 Å, noise head, weight 0.1;
  AdamW) at batch 128: real QM9 molecules with their HOMO labels (qm9pack, the
  ``train_step.py`` selection: seed 0).
* ``md17-b8`` / ``md17-b80``: the MD17 step of ``finetune_md17.py:aspirin`` (``train=9500`` for
  batch 80): ET H=128, 6 layers, 32 RBF, no per-layer norms; E = std Σ h_i + mean, F = -∂E/∂x
  by autodiff inside the differentiated loss, 0.2 × smooth-L1 energy (Frad's EMA, α = 0.05) +
  0.8 × smooth-L1 forces, AdamW; no noisy-node pass (the config's default). Frames: the shipped
  GFN2-xTB aspirin trajectory (``md17/gfn2_aspirin``), the first frames of its ``train_950``
  split, standardiser fitted on the whole split.

mspec runs ``mspec.training.finetune.FinetuneTrainer.update_fn`` (the jitted step of
``experiments.finetune``) on batches packed by its own ``LabeledFeaturizer`` / ``pack_labeled``;
``--paths`` picks the message passing: ``config`` (the config's ``model.message_passing``,
``"auto"`` for both tasks) and/or ``xla``, ``auto`` (the fused CPU kernels), ``fused``. A path
that fails is reported as failed with its error (once: a failed path is not retried). The reference (``benchmarks/torchmd_finetune_reference.py``) is torchmd-net's
upstream ET with the same sizes and ``output_model="Scalar"`` (``derivative=True`` for MD17),
with the same losses and AdamW, float32, ``--threads`` torch threads.

Each workload runs under every ``--malloc`` setting for both implementations, interleaved
(mspec, reference, ...) per repeat; the ratio line per workload and mspec path compares each
implementation at its best setting (median over repeats), with the per-repeat ratios at those
settings. Speed-up = reference ms/step / mspec ms/step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from benchmarks.harness import REPO  # noqa: F401  (the working tree the workers run in)

HARTREE_TO_EV = 27.211386246
MD17_MOLECULE = "aspirin"

#: name -> (task, config module, config argument, batch size, default timed steps, warm-up steps).
WORKLOADS = {
    "qm9": ("qm9", "finetune_qm9", "homo", 128, 6, 1),
    "md17-b8": ("md17", "finetune_md17", MD17_MOLECULE, 8, 30, 3),
    "md17-b80": ("md17", "finetune_md17", f"{MD17_MOLECULE},train=9500", 80, 6, 2),
}

#: Reference model sizes and losses per task (the configs' values; see the module docstring).
REFERENCE_ARGS = {
    "qm9": ["--task", "qm9", "--loss", "mse", "--tau", "0.005", "--denoising-weight", "0.1",
            "--denoising-scale", "0.04", "--lr", "4e-4"],
    "md17": ["--task", "md17", "--loss", "smooth_l1", "--energy-weight", "0.2",
             "--force-weight", "0.8", "--ema-alpha", "0.05", "--lr", "5e-4"],
}
REFERENCE_SIZES = {"qm9": dict(hidden=256, layers=8, heads=8, rbf=64),
                   "md17": dict(hidden=128, layers=6, heads=8, rbf=32)}


def get_config(workload: str, message_passing: str = "config"):
    """The experiment config of a workload, its message passing set (``"config"`` keeps it)."""
    import importlib

    task, module, arg, batch, _, _ = WORKLOADS[workload]
    c = importlib.import_module(f"experiments.configs.{module}").get_config(arg)
    if message_passing != "config":
        c.model.message_passing = message_passing
    # A non-trivial learning rate from the first steps (the configs warm up over 1k-10k steps).
    c.optim.warmup_steps = 10
    assert c.batch_size == batch, (workload, c.batch_size)
    return c


# --------------------------------------------------------------------------------------------------
# Identical molecules for both implementations
# --------------------------------------------------------------------------------------------------


def write_batches(workload: str, n_batches: int, path: str, batch_size: int = 0) -> dict:
    """Write ``n_batches`` batches (of ``batch_size`` molecules; 0 = the workload's) of the
    workload's molecules with their labels to ``path``
    (``qm9_molecules.save_batches_npz`` layout, which both implementations read), and the
    standardiser (``targets.Standardizer.fit``, as the fine-tuning run fits it) as the scalars
    ``target_mean`` / ``target_std``. Returns a description of the data."""
    from benchmarks.qm9_molecules import load_qm9_labeled_sample, save_batches_npz
    from mspec.training.targets import Standardizer

    task, _, _, batch, _, _ = WORKLOADS[workload]
    batch = batch_size or batch
    if task == "qm9":
        mols, homo = load_qm9_labeled_sample(n_batches * batch, "HOMO_au", seed=0)
        y = homo * HARTREE_TO_EV
        st = Standardizer.fit(y)
        save_batches_npz(path, mols, batch, targets=y,
                         scalars={"target_mean": st.mean, "target_std": st.std})
        return {"source": "qm9pack, seed 0", "label": "homo (eV)", "molecules": len(mols),
                "atoms_per_mol": sum(len(z) for z, _ in mols) / len(mols)}
    from data_pipelines import md17

    traj = md17.read_md17(os.path.join(md17.GFN2_DIR, f"md17_{MD17_MOLECULE}.npz"))
    train = md17.random_splits(len(traj.E))["train_950"]
    n_batches = min(n_batches, len(train) // batch)
    st = Standardizer.fit(traj.E[train])
    frames = train[: n_batches * batch]
    mols = [(traj.z, traj.R[i].astype("float32")) for i in frames]
    save_batches_npz(path, mols, batch, targets=traj.E[frames],
                     forces=[traj.F[i] for i in frames],
                     scalars={"target_mean": st.mean, "target_std": st.std})
    return {"source": f"md17/gfn2_{MD17_MOLECULE} train_950", "label": "energy (kcal/mol)",
            "molecules": len(mols), "atoms_per_mol": float(len(traj.z))}


def mspec_batches(config, batches_path: str):
    """The packed host batches (device keys, leading device axis of 1) that mspec trains on, built
    from the batches file by the fine-tuning pipeline's own featuriser and packer, and the budget.
    Molecule ``k`` of batch ``b`` is graph slot ``k`` of packed batch ``b``."""
    import numpy as np

    from benchmarks.harness import fitting_budget
    from benchmarks.qm9_molecules import load_batches_npz
    from mspec.training.targets import QM9_LABEL_COLUMNS as TARGET_NAMES
    from mspec import graph
    from mspec.data import pipeline
    from mspec.training import finetune

    md17 = config.task == "md17"
    with np.load(batches_path) as data:
        mean = float(data["target_mean"])
        labels = [data[f"y_{b}"] for b in range(int(data["num_batches"]))]
        forces = [data[f"forces_{b}"] for b in range(int(data["num_batches"]))] if md17 else None
    base = pipeline.Featurizer(radius=config.model.cutoff + config.data.skin,
                               max_z=config.model.max_z, dataset=config.data.dataset)
    feat = finetune.LabeledFeaturizer(base, config.task, config.target.name, mean,
                                      config.target.atomref)
    per_batch = []
    for b, (z, pos, seg) in enumerate(load_batches_npz(batches_path)):
        mols = []
        for g in range(int(seg.max()) + 1):
            sel = seg == g
            example = {"atomic_numbers": z[sel], "positions": pos[sel]}
            if md17:
                example.update(energy=labels[b][g], forces=forces[b][sel])
            else:
                t = np.zeros(len(TARGET_NAMES))
                t[TARGET_NAMES.index(config.target.name)] = labels[b][g]
                example["targets"] = t
            mols.append(feat(example))
        per_batch.append(mols)
    # A static budget that fits every batch (as train_step.py).
    budget = fitting_budget(per_batch)
    packed = [finetune.split_host(finetune.pack_labeled(m, budget, with_forces=md17))[0]
              for m in per_batch]
    return [graph.stack([p]) for p in packed], budget


# --------------------------------------------------------------------------------------------------
# Worker: one mspec measurement in this process
# --------------------------------------------------------------------------------------------------


def run_mspec_worker(batches_path: str, workload: str, path: str, steps: int, warmup: int) -> dict:
    import jax
    import numpy as np

    from benchmarks.harness import peak_rss_gb, step_stats, time_updates
    from mspec.models import count_params
    from mspec import models
    from mspec.training import finetune

    c = get_config(workload, path)
    with np.load(batches_path) as data:
        std = float(data["target_std"])
    host_batches, budget = mspec_batches(c, batches_path)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    trainer = finetune.FinetuneTrainer(c, models.get_model(c.model), mesh, std=std)
    batches = [trainer.global_batch(b) for b in host_batches]
    dummy = finetune.split_host(finetune.pack_labeled([], budget, c.task == "md17"))[0]
    state = trainer.init_state(jax.random.key(0), dummy)
    n_mol = int(np.sum(host_batches[0]["graph_mask"]))
    result = {
        "impl": f"mspec (jax {jax.__version__})",
        "workload": workload,
        "path": c.model.message_passing + (" (config)" if path == "config" else ""),
        "n_params": count_params(state["params"]),
        "batch_size": n_mol,
    }
    try:
        timed = time_updates(trainer, state, batches, warmup, steps)
    except Exception as e:  # noqa: BLE001 - reported as this path's result
        msg = " ".join(str(e).split())
        result.update(error=f"{type(e).__name__}: {msg[:300]}", peak_rss_gb=peak_rss_gb())
        return result
    times = timed.pop("times")
    return {
        **result,
        "threads": os.cpu_count(),
        **step_stats(times, n_mol),
        **timed,
        "peak_rss_gb": peak_rss_gb(),
        "node_fill": float(np.mean([np.sum(b["node_mask"]) for b in host_batches]) / budget.n_node),
    }


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def _reference(batches, workload, threads, steps, warmup, malloc):
    from benchmarks.reference_runner import run_reference

    task = WORKLOADS[workload][0]
    ref = run_reference(
        batches, threads, steps, warmup, malloc, **REFERENCE_SIZES[task],
        extra_args=REFERENCE_ARGS[task],
        script=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "torchmd_finetune_reference.py"),
    )
    if ref:
        ref.update(workload=workload, path="upstream ET",
                   impl=f"{ref['impl']} ({ref['threads']} thr)")
    return ref


def table(rows: list[dict]) -> str:
    head = ("| workload | implementation | message passing | malloc | repeat | ms/step median (min–max) "
            "| mol/s | compile s | peak RSS GB | params |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        cells = [r["workload"], r["impl"], r["path"], r["malloc"], str(r.get("repeat", 0) + 1)]
        if "error" in r:
            cells += [f"failed: {r['error']}", "—", "—", f"{r['peak_rss_gb']:.2f}",
                      f"{r['n_params']:,}"]
        else:
            cells += [
                f"{1e3 * r['step_s_median']:.1f} ({1e3 * r['step_s_min']:.1f}–{1e3 * r['step_s_max']:.1f})",
                f"{r['mol_per_s_median']:.1f}",
                f"{r.get('compile_s', r.get('warmup_s', float('nan'))):.1f}",
                f"{r['peak_rss_gb']:.2f}", f"{r['n_params']:,}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best(runs: list[dict]):
    """``(median step s, malloc, runs at that setting)`` of the fastest setting, or None."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        if "error" not in r:
            by.setdefault(r["malloc"], []).append(r)
    if not by:
        return None
    med, malloc = min((statistics.median(x["step_s_median"] for x in v), k) for k, v in by.items())
    return med, malloc, by[malloc]


def ratio_lines(rows: list[dict], target: float = 2.0) -> list[str]:
    """One line per workload and mspec message-passing path: each implementation at its best
    allocator setting (median ms/step over repeats), speed-up = reference / mspec, the per-repeat
    ratios at those settings, and whether the ``target`` speed-up is met."""
    lines = []
    for workload in WORKLOADS:
        ref = _best([r for r in rows if r["workload"] == workload and "torchmd" in r["impl"]])
        ours = [r for r in rows if r["workload"] == workload and "torchmd" not in r["impl"]]
        for path in dict.fromkeys(r["path"] for r in ours):
            runs = [r for r in ours if r["path"] == path]
            best = _best(runs)
            if best is None:
                lines.append(f"- {workload}, mspec {path}: failed ({runs[0]['error']})")
                continue
            if ref is None:
                lines.append(f"- {workload}, mspec {path}: {1e3 * best[0]:.1f} ms/step ({best[1]}); "
                             "no reference run")
                continue
            ratio = ref[0] / best[0]
            ref_by_repeat = {r.get("repeat"): r["step_s_median"] for r in ref[2]}
            per = [ref_by_repeat[r.get("repeat")] / r["step_s_median"] for r in best[2]
                   if r.get("repeat") in ref_by_repeat]
            lines.append(
                f"- {workload}, mspec {path}: mspec {1e3 * best[0]:.1f} ms/step ({best[1]}) vs "
                f"torchmd-net {1e3 * ref[0]:.1f} ms/step ({ref[1]}) = {ratio:.2f}x "
                f"(per-repeat {', '.join(f'{x:.2f}' for x in per)}); "
                f"target >= {target:g}x {'met' if ratio >= target else 'NOT met'}"
            )
    return lines


def main(argv=None) -> int:
    from benchmarks.reference_runner import MALLOC_SETTINGS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {list(WORKLOADS)}")
    p.add_argument("--paths", default="config,xla",
                   help="comma list of mspec message-passing settings: config (the config's own, "
                   "auto), xla, auto, fused")
    p.add_argument("--steps", type=int, default=0, help="timed steps (0: per-workload default)")
    p.add_argument("--warmup", type=int, default=-1, help="warm-up steps (-1: per-workload default)")
    p.add_argument("--threads", type=int, default=2, help="reference torch threads")
    p.add_argument("--malloc", default="hugetlb,tuned",
                   help=f"comma list of allocator settings: {', '.join(MALLOC_SETTINGS)}")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--path", default="config", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_mspec_worker(args.batches, args.worker, args.path, args.steps,
                                          args.warmup)))
        return 0

    from benchmarks import harness

    workloads = harness.comma_choices(p, "workload", args.workloads, WORKLOADS)
    paths = harness.comma_choices(p, "--paths", args.paths, ("config", "xla", "auto", "fused"))
    mallocs = harness.comma_choices(p, "--malloc", args.malloc, MALLOC_SETTINGS)
    load_start = harness.load_average()
    tmp = tempfile.mkdtemp(prefix="mspec_ft_bench_")
    plan, data = {}, {}
    for w in workloads:
        steps = args.steps or WORKLOADS[w][4]
        warmup = WORKLOADS[w][5] if args.warmup < 0 else args.warmup
        path = os.path.join(tmp, f"{w}.npz")
        data[w] = write_batches(w, max(4, min(steps + warmup + 1, 12)), path)
        plan[w] = (path, steps, warmup)
        print(f"{w}: {json.dumps(data[w])}", file=sys.stderr)

    rows, failed = [], set()
    for repeat in range(args.repeats):
        for w in workloads:
            batches, steps, warmup = plan[w]
            for malloc in mallocs:
                for path in paths:
                    if (w, path) in failed:  # a path that cannot run fails the same way again
                        continue
                    print(f"[{repeat + 1}/{args.repeats}] mspec {w} {path} ({malloc} malloc) ...",
                          file=sys.stderr, flush=True)
                    r = harness.run_worker("benchmarks.finetune_step",
                                           ["--worker", w, "--path", path, "--batches", batches,
                                            "--steps", str(steps), "--warmup", str(warmup)],
                                           malloc, f"{w} {path}")
                    harness.keep_row(rows, r, repeat)
                    if r and "error" in r:
                        failed.add((w, path))
                if args.no_reference:
                    continue
                print(f"[{repeat + 1}/{args.repeats}] torchmd-net {w} ({malloc} malloc, "
                      f"{args.threads} threads) ...", file=sys.stderr, flush=True)
                harness.keep_row(rows, _reference(batches, w, args.threads, steps, warmup, malloc),
                                 repeat)
    load_end = harness.load_average()
    out_table, ratios = table(rows), "\n".join(ratio_lines(rows))
    harness.print_results([out_table, ratios], load_start, load_end)
    if args.record:
        steps_txt = ", ".join(f"{w} {plan[w][1]} steps after {plan[w][2]} warm-up" for w in workloads)
        data_txt = "; ".join(
            f"{w}: batch {WORKLOADS[w][3]}, {data[w]['source']}, {data[w]['atoms_per_mol']:.1f} atoms/molecule"
            for w in workloads)
        details = f"medians of {steps_txt}; {data_txt}; {harness.malloc_description(mallocs)}"
        harness.append_to_benchmarks(
            harness.record_header("finetune_step", harness.command_line("benchmarks.finetune_step", argv),
                                  load_start, load_end, details, harness.reference_description(rows))
            + out_table + "\n" + ratios + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
