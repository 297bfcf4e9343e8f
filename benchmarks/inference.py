"""Forward-only prediction time of mspec (``mspec.inference.Predictor``) vs torchmd-net 3.1.0.

    python -m benchmarks.inference                       # xla + auto, hugetlb + tuned malloc
    python -m benchmarks.inference --paths auto --malloc hugetlb --steps 3
    python -m benchmarks.inference --repeats 2 --record  # append a section to BENCHMARKS.md

What is timed, per batch of ``--batch-size`` (256) real QM9 molecules (the ``train_step.py``
selection: qm9pack, seed 0), clean input, no gradients:

* mspec: one call of :class:`mspec.inference.Predictor` (what ``experiments.predict`` runs per
  batch) on a fine-tuned QM9 model of ``experiments/configs/finetune_qm9.py:homo``'s architecture
  (ET H=256, 8 layers, 64 RBF, per-layer norms + whitened vector norm, scalar head with sum
  readout, standardiser std), randomly initialised (the weights do not change the work): the
  host batch goes in (``graph.pack`` layout of :func:`mspec.inference.featurize`'s molecules:
  neighbour lists within cutoff + skin, one static budget that fits every batch), the in-step
  cutoff / 32-neighbour filter and the model run, the per-molecule prediction comes back to the
  host. The molecules' host featurisation and packing (numpy, done before the model runs in
  ``experiments.predict``) is timed separately (``host prep``); the ``+ host`` ratio line adds
  it to mspec's time. ``--paths`` picks the message passing: ``xla`` (XLA ops) and/or ``auto``
  (the fused CPU kernels; forward only, so they apply), ``config`` (the config's own).
* torchmd-net (``benchmarks/torchmd_finetune_reference.py --task qm9 --inference``): upstream's
  ET from ``create_model`` with the same sizes and ``output_model="Scalar"``, ``model.eval()``,
  ``torch.inference_mode()``, ``model(z, pos, batch)`` on the same batches: its neighbour
  search, the ET, the scalar head and the sum, float32, ``--threads`` torch threads.

Each implementation runs under every ``--malloc`` setting, in its own subprocess
(``benchmarks/harness.py``), interleaved per repeat; the ratio line per mspec path compares each
implementation at its best setting (median over repeats). Speed-up = reference ms/batch / mspec
ms/batch (target >= 2x). Build the reference venv first (``~/torchref-venv``,
docs/spec/benchmark-protocol.md §2); without it only mspec is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from benchmarks.harness import REPO  # noqa: F401  (the working tree the workers run in)

WORKLOAD = "qm9"  # benchmarks/finetune_step.py's QM9 workload: its config and molecules


def get_config(message_passing: str = "config"):
    """``finetune_qm9.py:homo``'s config with ``model.message_passing`` set (``"config"`` keeps it)."""
    from benchmarks import finetune_step

    return finetune_step.get_config(WORKLOAD, message_passing)


def write_batches(batch_size: int, n_batches: int, path: str) -> dict:
    """The QM9 molecules with HOMO labels and standardiser (``finetune_step.write_batches``'s
    layout, which both implementations read) in batches of ``batch_size``."""
    from benchmarks import finetune_step

    return finetune_step.write_batches(WORKLOAD, n_batches, path, batch_size=batch_size)


def trained_model(config, std: float, mean: float, budget):
    """A :class:`mspec.inference.TrainedModel` of ``config``'s architecture with freshly
    initialised parameters (seed 0) and the given standardiser."""
    import jax

    from mspec import graph, inference, models
    from mspec.training import targets

    params = jax.device_get(jax.jit(models.get_model(config.model).init)(
        jax.random.key(0), graph.pack([], budget))["params"])
    return inference.TrainedModel(workdir="(benchmark)", config=config, checkpoint="(random init)",
                                  step=0, params=params,
                                  standardizer=targets.Standardizer(mean=mean, std=std))


def predictor_batches(config, batches_path: str):
    """Per batch, the molecules featurised as ``experiments.predict`` does
    (:func:`mspec.inference.featurize`), the budget that fits them all, and a function that packs
    one batch (``graph.pack``, the predictor's host input). Molecule ``k`` of batch ``b`` is
    graph slot ``k`` of packed batch ``b``."""
    import functools

    from benchmarks.harness import fitting_budget
    from benchmarks.qm9_molecules import load_batches_npz
    from mspec import graph, inference

    # featurize reads the config only (cutoff, skin); a model without parameters serves.
    shell = inference.TrainedModel("", config, "", 0, {}, None)
    raw = load_batches_npz(batches_path)

    def featurize(b):
        z, pos, seg = raw[b]
        return [inference.featurize(shell, z[seg == g], pos[seg == g])
                for g in range(int(seg.max()) + 1)]

    per_batch = [featurize(b) for b in range(len(raw))]
    budget = fitting_budget(per_batch)

    def prepare(b):  # what is timed as host prep: featurise and pack batch b
        return graph.pack(featurize(b), budget)

    return per_batch, budget, functools.partial(graph.pack, budget=budget), prepare


# --------------------------------------------------------------------------------------------------
# Worker: one mspec measurement in this process
# --------------------------------------------------------------------------------------------------


def run_mspec_worker(batches_path: str, path: str, steps: int, warmup: int) -> dict:
    import jax
    import numpy as np

    from benchmarks.harness import peak_rss_gb, step_stats, time_steps
    from mspec import inference
    from mspec.models import count_params

    c = get_config(path)
    with np.load(batches_path) as data:
        mean, std = float(data["target_mean"]), float(data["target_std"])
    per_batch, budget, pack, prepare = predictor_batches(c, batches_path)
    batches = [pack(mols) for mols in per_batch]
    model = trained_model(c, std, mean, budget)
    predictor = inference.Predictor(model)
    n_mol = len(per_batch[0])
    preds = []
    t0 = time.perf_counter()
    preds.append(predictor(batches[0])["pred"])
    compile_s = time.perf_counter() - t0

    def step(i):
        preds.append(predictor(batches[(i + 1) % len(batches)])["pred"])  # host arrays: blocks

    warmup_s, times = time_steps(step, warmup, steps)
    _, prep = time_steps(lambda i: prepare(i % len(per_batch)), 0, min(steps, len(per_batch)))
    prep_stats = step_stats(prep, n_mol)
    return {
        "impl": f"mspec (jax {jax.__version__})",
        "path": c.model.message_passing + (" (config)" if path == "config" else ""),
        "n_params": count_params(model.params),
        "batch_size": n_mol,
        "threads": os.cpu_count(),
        **step_stats(times, n_mol),
        "host_prep_s_median": prep_stats["step_s_median"],
        "compile_s": compile_s,
        "warmup_s": warmup_s,
        "peak_rss_gb": peak_rss_gb(),
        "pred_first": float(np.asarray(preds[0])[0]) * std + mean,
        "compilations": predictor.traces,
        "node_fill": float(np.mean([np.sum(b["node_mask"]) for b in batches]) / budget.n_node),
    }


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def _reference(batches, threads, steps, warmup, malloc):
    from benchmarks import finetune_step
    from benchmarks.reference_runner import run_reference

    ref = run_reference(
        batches, threads, steps, warmup, malloc, inference=True,
        **finetune_step.REFERENCE_SIZES[WORKLOAD], extra_args=finetune_step.REFERENCE_ARGS[WORKLOAD],
        script=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "torchmd_finetune_reference.py"),
    )
    if ref:
        ref.update(path="upstream ET", impl=f"{ref['impl']} ({ref['threads']} thr)")
    return ref


def table(rows: list[dict]) -> str:
    head = ("| implementation | message passing | malloc | repeat | ms/batch median (min–max) "
            "| mol/s | host prep ms | compile s | peak RSS GB | params |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        prep = r.get("host_prep_s_median")
        lines.append(
            f"| {r['impl']} | {r['path']} | {r['malloc']} | {r.get('repeat', 0) + 1} | "
            f"{1e3 * r['step_s_median']:.1f} ({1e3 * r['step_s_min']:.1f}–{1e3 * r['step_s_max']:.1f}) | "
            f"{r['mol_per_s_median']:.1f} | {'—' if prep is None else f'{1e3 * prep:.1f}'} | "
            f"{r.get('compile_s', r.get('warmup_s', float('nan'))):.1f} | {r['peak_rss_gb']:.2f} | "
            f"{r['n_params']:,} |")
    return "\n".join(lines)


def ratio_lines(rows: list[dict], target: float = 2.0) -> list[str]:
    """Per mspec path: each implementation at its best allocator setting (median ms/batch over
    repeats), speed-up = reference / mspec with the per-repeat ratios and whether ``target`` is
    met; then the same with mspec's host featurisation and packing added."""
    from benchmarks.finetune_step import _best

    ref = _best([r for r in rows if "torchmd" in r["impl"]])
    ours = [r for r in rows if "torchmd" not in r["impl"]]
    lines = []
    for path in dict.fromkeys(r["path"] for r in ours):
        best = _best([r for r in ours if r["path"] == path])
        if ref is None:
            lines.append(f"- mspec {path}: {1e3 * best[0]:.1f} ms/batch ({best[1]}); no reference run")
            continue
        ref_by_repeat = {r.get("repeat"): r["step_s_median"] for r in ref[2]}
        per = [ref_by_repeat[r.get("repeat")] / r["step_s_median"] for r in best[2]
               if r.get("repeat") in ref_by_repeat]
        ratio = ref[0] / best[0]
        lines.append(
            f"- inference, mspec {path}: mspec {1e3 * best[0]:.1f} ms/batch ({best[1]}) vs "
            f"torchmd-net {1e3 * ref[0]:.1f} ms/batch ({ref[1]}) = {ratio:.2f}x "
            f"(per-repeat {', '.join(f'{x:.2f}' for x in per)}); "
            f"target >= {target:g}x {'met' if ratio >= target else 'NOT met'}")
        prep = sorted(r["host_prep_s_median"] for r in best[2])[len(best[2]) // 2]
        lines.append(
            f"- inference + host featurisation and packing, mspec {path}: "
            f"{1e3 * (best[0] + prep):.1f} ms/batch = {ref[0] / (best[0] + prep):.2f}x")
    return lines


def main(argv=None) -> int:
    from benchmarks.reference_runner import MALLOC_SETTINGS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", default="xla,auto",
                   help="comma list of mspec message-passing settings: xla, auto (fused CPU "
                   "kernels), fused, config (finetune_qm9.py's own)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed batches")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="reference torch threads")
    p.add_argument("--malloc", default="hugetlb,tuned",
                   help=f"comma list of allocator settings: {', '.join(MALLOC_SETTINGS)}")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default="config", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_mspec_worker(args.batches, args.path, args.steps, args.warmup)))
        return 0

    from benchmarks import harness

    paths = harness.comma_choices(p, "--paths", args.paths, ("config", "xla", "auto", "fused"))
    mallocs = harness.comma_choices(p, "--malloc", args.malloc, MALLOC_SETTINGS)
    load_start = harness.load_average()
    tmp = tempfile.mkdtemp(prefix="mspec_inference_bench_")
    batches = os.path.join(tmp, f"qm9_b{args.batch_size}.npz")
    n_batches = max(2, min(args.steps + args.warmup + 1, 6))
    data = write_batches(args.batch_size, n_batches, batches)
    print(json.dumps(data), file=sys.stderr)

    rows = []
    for repeat in range(args.repeats):
        for malloc in mallocs:
            for path in paths:
                print(f"[{repeat + 1}/{args.repeats}] mspec {path} ({malloc} malloc) ...",
                      file=sys.stderr, flush=True)
                harness.keep_row(rows, harness.run_worker(
                    "benchmarks.inference",
                    ["--worker", "--path", path, "--batches", batches,
                     "--steps", str(args.steps), "--warmup", str(args.warmup)],
                    malloc, f"inference {path}"), repeat)
            if args.no_reference:
                continue
            print(f"[{repeat + 1}/{args.repeats}] torchmd-net ({malloc} malloc, {args.threads} "
                  "threads) ...", file=sys.stderr, flush=True)
            harness.keep_row(rows, _reference(batches, args.threads, args.steps, args.warmup, malloc),
                             repeat)
    load_end = harness.load_average()
    out_table, ratios = table(rows), "\n".join(ratio_lines(rows))
    harness.print_results([out_table, ratios], load_start, load_end)
    if args.record:
        details = (
            f"batch {args.batch_size}, {n_batches} batches of QM9 molecules ({data['source']}, "
            f"{data['atoms_per_mol']:.1f} atoms/molecule); medians of {args.steps} batches after "
            f"{args.warmup} warm-up; {harness.malloc_description(mallocs)}")
        harness.append_to_benchmarks(
            harness.record_header("inference", harness.command_line("benchmarks.inference", argv),
                                  load_start, load_end, details, harness.reference_description(rows))
            + out_table + "\n" + ratios + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
