"""Train-step throughput of mspec vs the PyTorch reference (torchmd-net 3.1.0), same molecules.

    python -m benchmarks.train_step                       # QM9-track config + tiny, batch 128
    python -m benchmarks.train_step --configs qm9 --malloc hugetlb,tuned,tuned+hugetlb \
        --repeats 2 --record

Protocol (docs/spec/benchmark-protocol.md §5): real QM9 molecules (deterministic sample, seed 0) in
batches of 128; both implementations train on the same batches; the Coord denoising step
(σ = 0.04 Å noise, MSE on the predicted per-atom noise, AdamW); compilation / warm-up excluded and
reported separately; the median over the timed steps; peak RSS of each run's own process. Every
run is a separate subprocess, so memory and allocator settings do not leak between runs. The
allocator matters on CPU (docs/spec/benchmark-protocol.md §3; mspec/kernels/host_malloc.py): every
implementation runs under each ``--malloc`` setting, and the summary compares them per setting
and each at its best.
The reference is skipped with a message when its interpreter (``~/torchref-venv`` or
``$MSPEC_TORCH_PYTHON``) is not installed.

mspec runs its real training path: pipeline neighbour lists with radius cutoff + skin, the
in-step cutoff / 32-neighbour filter, the jitted update of :mod:`mspec.training.train`. Config
``qm9`` is the papers' ET variant (per-layer norms, whitened vector norm, scalar + noise heads;
7.2 M parameters), which does more work per molecule than torchmd-net's upstream ET;
``qm9-upstream`` is the upstream architecture itself (6,864,898 parameters, as the reference),
the like-for-like comparison. mspec's configs run the message passing as the fused CPU kernel
(``model.message_passing = "auto"``, as the pre-training configs do); append ``-xla`` to a config
name (``qm9-xla``) for the XLA-ops implementation. ``painn`` is the second backbone
(``model.name = "painn"``, pure JAX) in its published configuration (F=128, 3 blocks, 20 RBF;
580,736 encoder parameters) and ``painn-qm9`` at the ET's QM9-track size (F=256, 8 blocks,
64 RBF), same task and batches; no PyTorch PaiNN is installed, so its rows have no reference
ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------
# Worker: one mspec measurement in this process
# --------------------------------------------------------------------------------------------------


def run_mspec_worker(
    batches_path: str, config_name: str, steps: int, warmup: int, microbatches: int = 1
) -> dict:
    import jax
    import numpy as np

    from benchmarks.harness import peak_rss_gb
    from benchmarks.qm9_molecules import load_batches_npz
    from experiments.configs import pretrain_coord
    from mspec import graph, models
    from mspec.data import pipeline
    from mspec.models import count_params
    from mspec.training import train

    # A "-xla" suffix runs the message passing as XLA ops instead of the fused CPU kernel that
    # the pre-training configs use on CPU (model.message_passing "auto").
    xla = config_name.endswith("-xla")
    config_name = config_name.removesuffix("-xla")
    c = pretrain_coord.get_config("tiny" if config_name == "tiny" else None)
    c.model.message_passing = "xla" if xla else "auto"
    if config_name.startswith("painn"):
        c.model.name = "painn"
        if config_name == "painn":  # Schütt et al. 2021's configuration
            c.model.hidden, c.model.num_layers, c.model.num_rbf = 128, 3, 20
    if config_name == "qm9-upstream":
        # torchmd-net's upstream ET exactly: no per-layer norms, no whitened vector norm, one
        # (noise) head: 6,864,898 parameters, as the reference.
        c.model.interlayer_norm = "none"
        c.model.vector_norm = "none"
        c.model.heads = ("noise",)
    c.total_steps = 400_000
    c.optim.warmup_steps = 10  # a non-trivial learning rate from the first steps
    c.microbatches = microbatches
    feat = pipeline.Featurizer(radius=c.model.cutoff + c.data.skin, max_z=c.model.max_z)
    mols_per_batch = []
    for z, pos, seg in load_batches_npz(batches_path):
        mols = []
        for g in range(int(seg.max()) + 1):
            sel = seg == g
            mols.append(feat({"atomic_numbers": z[sel], "positions": pos[sel]}))
        mols_per_batch.append(mols)
    n_mol = len(mols_per_batch[0])
    # With micro-batches, each batch of n_mol molecules is split into equal consecutive parts.
    per = -(-n_mol // microbatches)
    split = [[b[i : i + per] for i in range(0, n_mol, per)] for b in mols_per_batch]
    nodes = max(sum(len(m["atomic_numbers"]) for m in sub) for b in split for sub in b)
    # Edges of the pair layout (graph.pack): both directions of every pair, then N self-loops.
    pair_edges = max(
        sum(len(m["senders"]) - len(m["atomic_numbers"]) for m in sub) for b in split for sub in b
    )
    n_node = 8 * ((nodes + 8) // 8) + 1
    budget = graph.Budget(
        n_node=n_node, n_edge=n_node + pair_edges, n_graph=per + 1, max_torsions=1,
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    trainer = train.Trainer(c, models.get_model(c.model), mesh)
    if microbatches == 1:
        batches = [trainer.global_batch(graph.stack([graph.pack(b[0], budget)])) for b in split]
    else:
        batches = [
            trainer.global_batch(
                train.stack_microbatches([graph.stack([graph.pack(sub, budget)]) for sub in b]),
                microbatched=True,
            )
            for b in split
        ]
    state = trainer.init_state(jax.random.key(0), graph.pack([], budget))
    n_params = count_params(state["params"])

    t0 = time.perf_counter()
    state, m = trainer.update_fn(state, batches[0])
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        state, m = trainer.update_fn(state, batches[(i + 1) % len(batches)])
    jax.block_until_ready(m["loss"])
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, m = trainer.update_fn(state, batches[(warmup + 1 + i) % len(batches)])
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    rates = [n_mol / t for t in times]
    return {
        "impl": f"mspec (jax {jax.__version__})",
        "config": (config_name + ("-xla" if xla else ""))
        + ("" if microbatches == 1 else f", microbatches={microbatches}"),
        "microbatches": microbatches,
        "threads": os.cpu_count(),
        "mol_per_s_median": statistics.median(rates),
        "mol_per_s_min": min(rates),
        "mol_per_s_max": max(rates),
        "step_s_median": statistics.median(times),
        "compile_s": compile_s,
        "peak_rss_gb": peak_rss_gb(),
        "n_params": n_params,
        "batch_size": n_mol,
        "node_fill": float(
            np.mean([sum(len(m["atomic_numbers"]) for m in sub) for b in split for sub in b])
            / budget.n_node
        ),
        "compilations": trainer.traces,
    }


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def _mspec_subprocess(batches, config, steps, warmup, malloc, microbatches=1) -> dict | None:
    from benchmarks.harness import run_worker

    return run_worker(
        "benchmarks.train_step",
        ["--worker", config, "--batches", batches, "--steps", str(steps), "--warmup", str(warmup),
         "--microbatches", str(microbatches)],
        malloc, config,
    )


def _table(rows: list[dict]) -> str:
    head = "| implementation | config | malloc | repeat | train mol/s median (min–max) | step s | compile/warm-up s | peak RSS GB | params |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r.get('config_name', r.get('config'))} | {r['malloc']} | "
            f"{r.get('repeat', 0) + 1} | "
            f"{r['mol_per_s_median']:.1f} ({r['mol_per_s_min']:.1f}–{r['mol_per_s_max']:.1f}) | "
            f"{r['step_s_median']:.2f} | {r.get('compile_s', r.get('warmup_s', float('nan'))):.1f} | "
            f"{r['peak_rss_gb']:.2f} | {r['n_params']:,} |"
        )
    return "\n".join(lines)


def ratio_summary(rows: list[dict], mallocs: list[str]) -> list[str]:
    """Lines comparing mspec (qm9 and qm9-upstream configs) with the reference, per allocator
    setting and best vs best. Runs of one repeat are paired (they ran back to back); the ratio is
    the median of the per-pair ratios, and each side's rate the median over its repeats."""
    lines = []
    refs = [r for r in rows if "torchmd" in r["impl"]]
    ref32 = [r for r in refs if r.get("precision", "float32") == "float32"]
    ref16 = [r for r in refs if r.get("precision") == "bfloat16"]
    # The QM9-size configs, each also with gradient accumulation ("qm9, microbatches=4" is what
    # the default config.microbatches = 0 picks on one CPU device at batch 128).
    configs = sorted(
        {r["config"] for r in rows if "torchmd" not in r["impl"]
         and r.get("config", "").split(",")[0] in ("qm9", "qm9-upstream")},
        key=lambda c: (c.split(",")[0], c),
    )
    for config in configs:
        ours = [r for r in rows if r.get("config") == config and "torchmd" not in r["impl"]]
        if ours:
            lines.extend(_ratio_lines(config, ours, ref32, mallocs))
            if ref16:
                lines.extend(
                    line.replace("torchmd-net", "torchmd-net (bf16 autocast)")
                    for line in _ratio_lines(config, ours, ref16, mallocs)
                )
    return lines


def _ratio_lines(config: str, ours: list[dict], ref: list[dict], mallocs: list[str]) -> list[str]:
    lines = []
    for malloc in mallocs:
        pairs = [
            (a["mol_per_s_median"], b["mol_per_s_median"])
            for a in ours for b in ref
            if a["malloc"] == b["malloc"] == malloc and a.get("repeat") == b.get("repeat")
        ]
        if pairs:
            ratios = [a / b for a, b in pairs]
            lines.append(
                f"- {config}, {malloc} malloc: mspec / torchmd-net = {statistics.median(ratios):.2f}x "
                f"(per-repeat {', '.join(f'{x:.2f}' for x in ratios)})"
            )

    def best(runs):
        by = {}
        for r in runs:
            by.setdefault(r["malloc"], []).append(r["mol_per_s_median"])
        return max(((statistics.median(v), k) for k, v in by.items()), default=None)

    b_ours, b_ref = best(ours), best(ref)
    if b_ours and b_ref:
        lines.append(
            f"- {config}, each at its best setting: mspec {b_ours[0]:.1f} mol/s ({b_ours[1]}) / torchmd-net "
            f"{b_ref[0]:.1f} mol/s ({b_ref[1]}) = {b_ours[0] / b_ref[0]:.2f}x"
        )
    return lines


def main(argv=None) -> int:
    from benchmarks.reference_runner import MALLOC_SETTINGS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs", default="qm9,qm9-upstream,tiny",
        help="comma list of: qm9 (the papers' ET, H=256, 7.2 M parameters), qm9-upstream "
        "(torchmd-net's upstream ET: no per-layer or vector norms, noise head only; 6.9 M "
        "parameters, the reference's architecture), tiny, painn (PaiNN, published size), painn-qm9 "
        "(PaiNN at the ET's QM9 size); each ET config with the suffix -xla runs the message "
        "passing as XLA ops instead of the fused CPU kernel",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="reference torch threads")
    p.add_argument(
        "--malloc", default="hugetlb,tuned",
        help=f"comma list of allocator settings, each run for both implementations: "
        f"{', '.join(MALLOC_SETTINGS)} (hugetlb is what mspec's entry points use; tuned is the "
        "reference's best, docs/spec/benchmark-protocol.md §3)",
    )
    p.add_argument("--repeats", type=int, default=1,
                   help="interleaved repeats (mspec, reference, mspec, ...) per setting")
    p.add_argument(
        "--microbatches", default="1",
        help="comma list; values > 1 add mspec qm9 runs that accumulate gradients over that many "
        "sub-batches of the same 128 molecules (config.microbatches; peak memory)",
    )
    p.add_argument("--no-reference", action="store_true")
    p.add_argument(
        "--reference-bf16", action="store_true",
        help="also time the reference with its forward pass under torch.autocast(bfloat16) "
        "(reported separately; the ratios compare with the float32 reference)",
    )
    p.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_mspec_worker(
            args.batches, args.worker, args.steps, args.warmup, int(args.microbatches)
        )))
        return 0

    from benchmarks.qm9_molecules import load_qm9_sample, save_batches_npz
    from benchmarks.reference_runner import run_reference

    from benchmarks import harness

    mallocs = harness.comma_choices(p, "--malloc", args.malloc, MALLOC_SETTINGS)
    load_start = harness.load_average()
    n_batches = max(4, min(args.steps + args.warmup + 1, 12))
    tmp = tempfile.mkdtemp(prefix="mspec_bench_")
    batches = os.path.join(tmp, f"qm9_b{args.batch_size}.npz")
    save_batches_npz(batches, load_qm9_sample(n_batches * args.batch_size, seed=0), args.batch_size)
    rows = []
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    # The reference runs once per repeat and setting, right after the first QM9-size mspec run.
    reference_after = next((c for c in configs if c.startswith("qm9")), None)
    for repeat in range(args.repeats):
        for config in configs:
            for malloc in mallocs:
                print(f"[{repeat + 1}/{args.repeats}] mspec {config} ({malloc} malloc) ...",
                      file=sys.stderr, flush=True)
                harness.keep_row(rows, _mspec_subprocess(batches, config, args.steps, args.warmup,
                                                         malloc), repeat)
                if config in ("qm9", "qm9-upstream"):
                    for k in (int(x) for x in args.microbatches.split(",") if int(x) > 1):
                        print(f"[{repeat + 1}/{args.repeats}] mspec qm9, {k} microbatches "
                              f"({malloc} malloc) ...", file=sys.stderr, flush=True)
                        harness.keep_row(rows, _mspec_subprocess(
                            batches, config, args.steps, args.warmup, malloc, k), repeat)
                if config != reference_after or args.no_reference:
                    continue
                for precision in ("float32", "bfloat16") if args.reference_bf16 else ("float32",):
                    print(f"[{repeat + 1}/{args.repeats}] torchmd-net reference ({malloc} malloc, "
                          f"{args.threads} threads, {precision}) ...", file=sys.stderr, flush=True)
                    ref = run_reference(
                        batches, args.threads, args.steps, args.warmup, malloc,
                        extra_args=["--autocast-bf16"] if precision == "bfloat16" else [],
                    )
                    if ref:
                        ref["config_name"] = "qm9 (upstream ET)"
                        ref["precision"] = precision
                        autocast = ", bf16 autocast" if precision == "bfloat16" else ""
                        ref["impl"] = f"{ref['impl']} ({ref['threads']} thr{autocast})"
                    harness.keep_row(rows, ref, repeat)
    load_end = harness.load_average()
    table = _table(rows)
    ratios = "\n".join(ratio_summary(rows, mallocs))
    harness.print_results([table, ratios], load_start, load_end)
    if args.record:
        details = (f"batch {args.batch_size} QM9 molecules (seed 0), median of {args.steps} steps "
                   f"after {args.warmup} warm-up; {harness.malloc_description(mallocs)}")
        harness.append_to_benchmarks(
            harness.record_header("train_step", harness.command_line("benchmarks.train_step", argv),
                                  load_start, load_end, details, harness.reference_description(rows))
            + table + "\n" + ratios + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
