"""MolSpectra stage-2 step time vs the denoising-only pre-training step (same encoder, same molecules).

    python -m benchmarks.stage2_step                         # stage2, denoise, parts; batch 128
    python -m benchmarks.stage2_step --batch-size 32 --steps 3 --workloads stage2,denoise
    python -m benchmarks.stage2_step --repeats 2 --record    # append a section to BENCHMARKS.md

mspec only (no torch reference: torchmd-net has no stage 2). Each measurement is one subprocess
(``benchmarks/harness.py``); the repeats interleave the workloads. The machine should be otherwise
idle (pause background jobs); the summary prints the load average at the start and the end.

Workloads:

* ``stage2``: the jitted step of ``experiments.pretrain`` with
  ``experiments/configs/pretrain_molspectra.py``'s default config
  (:class:`mspec.training.molspectra.MolSpectraTrainer.update_fn`): ET H=256, 8 layers, per-layer
  affine norms, Coord noise 0.04 Å with the noise head; the paper-size SpecFormer (d 128, 3 layers,
  16 heads, d_ff 256; UV/IR/Raman patches 20/50/50 with strides 10/25/25: 69 + 139 + 139 tokens
  per molecule, 10 % masked) on all three spectra; loss = denoising + masked-patch reconstruction
  + 3D→spectrum InfoNCE (τ = 0.07); AdamW. No stage-1 checkpoint: the ET starts random, which
  costs the same per step.
* ``denoise``: the denoising-only step (:class:`mspec.training.train.Trainer.update_fn`, what
  stage 1 runs) with the same config (same ET, same noise, same molecules) and
  ``config.microbatches = 1``: one batch, as stage 2 must run it (its contrastive loss needs the
  whole batch). The ratio line compares ``stage2`` with this.
* ``denoise-accum``: the same with ``config.microbatches = 0`` (automatic: stage 1's default, 4
  accumulated sub-batches of 32 molecules at batch 128 on one CPU device); optional.
* ``parts``: where the stage-2 step's time goes, each piece jitted and timed on its own in one
  process (compiled with XLA's static cost estimate; the fused message-passing kernels are custom
  calls, invisible to it): ``et`` = the ET forward + backward (noise, in-step cutoff filter, model,
  denoising loss, plus the gradient that the molecule features receive from the contrastive
  loss); ``specformer`` = SpecFormer forward + backward with the reconstruction and InfoNCE losses
  (the molecule features held fixed); ``contrastive`` = the InfoNCE loss alone, forward +
  backward; ``adamw`` = the optimiser update of all stage-2 parameters.
* ``bound``: how fast stage 2 could be at best on this machine. It counts the matrix-product
  FLOPs of the ``specformer`` piece (its forward and backward, from the jaxpr:
  :func:`benchmarks.harness.matmul_gflop`) and measures the machine's best float32 GEMM rate
  (:func:`benchmarks.harness.best_gemm_gflops`: large square products and the SpecFormer's own
  projection shapes). Stage 2 runs the denoising step's ET work plus the SpecFormer, so with the
  ``denoise`` rows of the same run the ratio lines print the lowest ratio reachable if every
  SpecFormer matrix product ran at that best rate and nothing else cost anything:
  ``1 + (GFLOP / best rate) / denoise s/step``.

Molecules: the first molecules of the stick spectra that ship with the repository
(``data_pipelines/spectra/data/qm9_gfn2``, the source of the ``qm9s/gfn2`` dataset: GFN2-xTB
IR/Raman and sTDA UV sticks of a random sample of QM9), broadened onto the QM9S grids as the
dataset builder does, with their QM9 B3LYP geometries from qm9pack (joined by QM9 index, as the
builder does), in batches of ``--batch-size``; no dataset build is needed. Both steps train on
the same batches, packed by the training pipeline's featuriser into one static budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from benchmarks.harness import REPO  # noqa: F401  (the working tree the workers run in)

SPECTRA = ("uv", "ir", "raman")
WORKLOADS = ("stage2", "denoise", "denoise-accum", "parts", "bound")
PARTS = ("et", "specformer", "contrastive", "adamw")


def get_config(workload: str, batch_size: int = 128, message_passing: str = "config"):
    """``pretrain_molspectra.py``'s default config at ``batch_size``; for the denoising workloads
    the same config with ``task = "denoise"`` (``microbatches`` 1, or 0 = automatic for
    ``denoise-accum``)."""
    from experiments.configs import pretrain_molspectra

    c = pretrain_molspectra.get_config()
    c.batch_size = batch_size
    if message_passing != "config":
        c.model.message_passing = message_passing
    c.optim.warmup_steps = 10  # a non-trivial learning rate from the first steps
    if workload.startswith("denoise"):
        c.task = "denoise"
        c.microbatches = 0 if workload == "denoise-accum" else 1
    return c


# --------------------------------------------------------------------------------------------------
# Molecules with spectra
# --------------------------------------------------------------------------------------------------


def load_molecules_with_spectra(n: int):
    """The first ``n`` molecules of the shipped GFN2 stick spectra (file order: a random sample
    of QM9), broadened as ``qm9s/gfn2`` is: ``(molecules [(z, pos)], {type: [L] arrays},
    QM9 indices)``, positions the qm9pack B3LYP geometry."""
    import itertools

    import numpy as np

    from data_pipelines import qm9s
    from data_pipelines.qm9s_source import read_sticks

    spectra_iter, _ = read_sticks(qm9s.DEFAULT_GFN2_DIR)
    records = list(itertools.islice(spectra_iter, n))
    if len(records) < n:
        raise ValueError(f"the shipped stick spectra hold {len(records)} molecules, fewer than {n}")
    qm9 = qm9s._qm9pack_by_index({r.qm9_index for r in records})
    mols = []
    for r in records:
        rec = qm9[r.qm9_index]
        z = np.asarray(rec["atomic_numbers"], np.int32)
        if r.atomic_numbers is not None and not np.array_equal(np.sort(z), np.sort(r.atomic_numbers)):
            raise ValueError(f"{r.where}: atoms disagree with QM9 index {r.qm9_index}")
        mols.append((z, np.asarray(rec["positions"], np.float32)))
    spectra = {t: [getattr(r, t) for r in records] for t in SPECTRA}
    return mols, spectra, [r.qm9_index for r in records]


def write_batches(batch_size: int, n_batches: int, path: str) -> dict:
    """Writes ``n_batches`` batches (``qm9_molecules.save_batches_npz`` layout plus the spectra
    ``uv_b`` / ``ir_b`` / ``raman_b`` ``[batch, L]``) to ``path``; returns a description."""
    from benchmarks.qm9_molecules import save_batches_npz

    mols, spectra, _ = load_molecules_with_spectra(n_batches * batch_size)
    save_batches_npz(path, mols, batch_size, per_molecule=spectra)
    return {"source": "shipped qm9_gfn2 stick spectra (qm9s/gfn2), qm9pack geometries",
            "molecules": len(mols), "atoms_per_mol": sum(len(z) for z, _ in mols) / len(mols)}


def featurized_batches(config, batches_path: str):
    """Per batch, the molecules as the training pipeline's ``Featurizer`` returns them (with the
    spectra), and the spectra ``(name, length)`` it carries."""
    import numpy as np

    from benchmarks.qm9_molecules import load_batches_npz
    from mspec.data import pipeline

    with np.load(batches_path) as data:
        spec = {t: [data[f"{t}_{b}"] for b in range(int(data["num_batches"]))] for t in SPECTRA}
    lengths = tuple((t, int(spec[t][0].shape[1])) for t in SPECTRA)
    feat = pipeline.Featurizer(radius=config.model.cutoff + config.data.skin,
                               max_z=config.model.max_z, dataset=config.data.dataset,
                               spectra=lengths)
    per_batch = []
    for b, (z, pos, seg) in enumerate(load_batches_npz(batches_path)):
        mols = []
        for g in range(int(seg.max()) + 1):
            sel = seg == g
            mols.append(feat({"atomic_numbers": z[sel], "positions": pos[sel],
                              **{t: spec[t][b][g] for t in SPECTRA}}))
        per_batch.append(mols)
    return per_batch, lengths


def host_batches(config, batches_path: str, with_spectra: bool):
    """The packed host batches the step trains on (leading device axis of 1; for a
    micro-batched config ``[K, 1, ...]``: K consecutive sub-batches of each batch), the budget and
    the molecules per batch."""
    from benchmarks.harness import fitting_budget
    from mspec import graph
    from mspec.training import train

    per_batch, lengths = featurized_batches(config, batches_path)
    spectra = lengths if with_spectra else ()
    k = train.microbatches(config)
    n_mol = len(per_batch[0])
    per = -(-n_mol // k)
    split = [[mols[i: i + per] for i in range(0, n_mol, per)] for mols in per_batch]
    budget = fitting_budget([sub for b in split for sub in b], spectra)
    if k == 1:
        packed = [graph.stack([graph.pack(b[0], budget)]) for b in split]
    else:
        packed = [train.stack_microbatches([graph.stack([graph.pack(sub, budget)]) for sub in b])
                  for b in split]
    return packed, budget, n_mol


# --------------------------------------------------------------------------------------------------
# Workers: one measurement in this process
# --------------------------------------------------------------------------------------------------


def make_trainer(config, lengths):
    import jax
    import numpy as np

    from mspec import models
    from mspec.training import molspectra, train

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    if config.task == "molspectra":
        trainer = molspectra.MolSpectraTrainer(config, models.get_model(config.model), mesh,
                                               spectrum_lengths=dict(lengths))
    else:
        trainer = train.Trainer(config, models.get_model(config.model), mesh)
    trainer.check()
    return trainer


def run_step_worker(batches_path: str, workload: str, batch_size: int, path: str, steps: int,
                    warmup: int) -> dict:
    import jax
    import numpy as np

    from benchmarks.harness import peak_rss_gb, step_stats, time_updates
    from mspec import graph
    from mspec.models import count_params
    from mspec.training import train

    c = get_config(workload, batch_size, path)
    stage2 = c.task == "molspectra"
    packed, budget, n_mol = host_batches(c, batches_path, with_spectra=stage2)
    trainer = make_trainer(c, budget.spectra)
    k = train.microbatches(c)
    batches = [trainer.global_batch(b, microbatched=k > 1) for b in packed]
    state = trainer.init_state(jax.random.key(0), graph.pack([], budget))
    result = {
        "impl": f"mspec (jax {jax.__version__})",
        "workload": workload,
        "path": c.model.message_passing + (" (config)" if path == "config" else ""),
        "n_params": count_params(state["params"]),
        "batch_size": n_mol,
        "microbatches": k,
    }
    timed = time_updates(trainer, state, batches, warmup, steps)
    times = timed.pop("times")
    return {
        **result,
        **step_stats(times, n_mol),
        **timed,
        "peak_rss_gb": peak_rss_gb(),
        "node_fill": float(np.mean([np.sum(b["node_mask"]) for b in packed]) / (k * budget.n_node)),
    }


def stage2_parts(trainer, state, batch):
    """The pieces of the stage-2 step as ``{name: (function, args)}`` (see the module
    docstring), each a pure function of device arrays, to be jitted."""
    import jax
    import jax.numpy as jnp

    from mspec import graph, losses
    from mspec.training import step as shared_step

    cfg = trainer.config
    params = state["params"]
    et_params = trainer._et_params(params)
    stats = losses.RunningStats(*state["normalizer"])
    rng = jax.random.key(1)
    k_struct, k_mask = jax.random.split(rng)
    d, g = batch["graph_mask"].shape
    gm = batch["graph_mask"].reshape(d * g)
    spec_in = {s.name: batch[graph.spectrum_key(s.name)].reshape(d * g, s.length)
               for s in trainer.spectrum_specs}
    tau = trainer.temperature(params)

    def et(p, b, cot):
        pred, target_a, mol = trainer._structure(p, k_struct, b)
        target = losses.denoising_target(target_a, cfg.loss.target_normalization,
                                         tau=cfg.noise.tau, stats=stats)
        # The contrastive loss's gradient reaches the ET through the molecule features: a fixed
        # cotangent stands in for it (same backward work).
        return losses.denoising_mse(pred, target, b["node_mask"]) + jnp.vdot(mol, cot)

    def specformer(sp, batch_stats, mol, spec, gmask):
        out, updated = trainer.specformer.apply(
            {"params": sp, "batch_stats": batch_stats}, spec, gmask, mask_rng=k_mask, train=True,
            mutable=["batch_stats"])
        mpr = sum(losses.masked_patch_mse(out["reconstruction"][t], out["patches"][t],
                                          out["mask"][t], gmask) for t in out["patches"])
        con = losses.info_nce(mol, out["embedding"], gmask, tau,
                              symmetric=cfg.loss.contrastive.symmetric)
        return mpr + con, updated["batch_stats"]

    def contrastive(mol, emb, gmask):
        return losses.info_nce(mol, emb, gmask, tau, symmetric=cfg.loss.contrastive.symmetric)

    def adamw(st, grads):
        return shared_step.apply_gradients(trainer.tx, trainer.schedule, st, grads)

    # Inputs of the later pieces, computed once (their values do not change the work).
    mol = jax.jit(lambda p, b: trainer._structure(p, k_struct, b)[2])(et_params, batch)
    mol = mol.reshape(d * g, -1)
    cot = jnp.full(mol.shape, 1e-3, mol.dtype).reshape(d, g, -1)
    emb = jax.random.normal(jax.random.key(2), mol.shape, mol.dtype)
    grads = jax.tree.map(jnp.zeros_like, params)
    return {
        "et": (jax.value_and_grad(et), (et_params, batch, cot)),
        "specformer": (jax.value_and_grad(specformer, has_aux=True),
                       (params["specformer"], state["batch_stats"], mol, spec_in, gm)),
        "contrastive": (jax.value_and_grad(contrastive, argnums=(0, 1)), (mol, emb, gm)),
        "adamw": (adamw, (state, grads)),
    }


def _stage2_on_first_batch(batches_path: str, batch_size: int, path: str):
    """``(config, trainer, fresh state, first device batch, molecules per batch)`` of stage 2."""
    import jax

    from mspec import graph

    c = get_config("stage2", batch_size, path)
    packed, budget, n_mol = host_batches(c, batches_path, with_spectra=True)
    trainer = make_trainer(c, budget.spectra)
    state = trainer.init_state(jax.random.key(0), graph.pack([], budget))
    return c, trainer, state, trainer.global_batch(packed[0]), n_mol


def run_parts_worker(batches_path: str, batch_size: int, path: str, steps: int, warmup: int) -> dict:
    import jax

    from benchmarks.harness import cost_analysis, peak_rss_gb, step_stats, time_steps

    c, trainer, state, batch, n_mol = _stage2_on_first_batch(batches_path, batch_size, path)
    parts = {}
    for name, (fn, args) in stage2_parts(trainer, state, batch).items():
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        cost = cost_analysis(compiled)
        jax.block_until_ready(compiled(*args))
        compile_s = time.perf_counter() - t0
        _, times = time_steps(lambda i: jax.block_until_ready(compiled(*args)), warmup, steps)
        parts[name] = {**step_stats(times, n_mol), **cost, "compile_s": compile_s}
        print(f"part {name}: {json.dumps(parts[name])}", file=sys.stderr, flush=True)
    return {"impl": f"mspec (jax {jax.__version__})", "workload": "parts",
            "path": c.model.message_passing + (" (config)" if path == "config" else ""),
            "batch_size": n_mol, "parts": parts, "peak_rss_gb": peak_rss_gb()}


def run_bound_worker(batches_path: str, batch_size: int, path: str) -> dict:
    import jax

    from benchmarks.harness import best_gemm_gflops, matmul_gflop, peak_rss_gb

    c, trainer, state, batch, n_mol = _stage2_on_first_batch(batches_path, batch_size, path)
    fn, args = stage2_parts(trainer, state, batch)["specformer"]
    gflop = matmul_gflop(fn, *args)
    del state, batch, args
    gemm = best_gemm_gflops()
    print(f"bound: specformer matmul {gflop:.1f} GFLOP, GEMM GFLOP/s {json.dumps(gemm)}",
          file=sys.stderr, flush=True)
    return {"impl": f"mspec (jax {jax.__version__})", "workload": "bound",
            "path": c.model.message_passing + (" (config)" if path == "config" else ""),
            "batch_size": n_mol, "specformer_matmul_gflop": gflop, "gemm_gflops": gemm,
            "peak_rss_gb": peak_rss_gb()}


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    head = ("| workload | message passing | malloc | repeat | s/step median (min–max) | mol/s "
            "| compile s | peak RSS GB | params |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r["workload"] in ("parts", "bound"):
            continue
        name = r["workload"] + (f" ({r['microbatches']} sub-batches)" if r.get("microbatches", 1) > 1 else "")
        lines.append(
            f"| {name} | {r['path']} | {r['malloc']} | {r.get('repeat', 0) + 1} | "
            f"{r['step_s_median']:.2f} ({r['step_s_min']:.2f}–{r['step_s_max']:.2f}) | "
            f"{r['mol_per_s_median']:.1f} | {r['compile_s']:.1f} | {r['peak_rss_gb']:.2f} | "
            f"{r['n_params']:,} |")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    """Milliseconds, three significant digits at most (``"1234"``, ``"12.3"``, ``"0.123"``)."""
    ms = 1e3 * seconds
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def parts_table(rows: list[dict]) -> str:
    """One line per piece (median over the ``parts`` runs), with its share of the median stage-2
    step of the same message-passing path and XLA's cost estimate."""
    parts_rows = [r for r in rows if r["workload"] == "parts"]
    if not parts_rows:
        return ""
    lines = ["| piece | ms median (min–max) | share of the stage-2 step | GFLOP (XLA estimate) "
             "| GB accessed (estimate) | GFLOP/s | compile s |", "|" + "---|" * 7]
    for path in dict.fromkeys(r["path"] for r in parts_rows):
        step = [r["step_s_median"] for r in rows if r["workload"] == "stage2" and r["path"] == path]
        step_s = statistics.median(step) if step else None
        runs = [r["parts"] for r in parts_rows if r["path"] == path]
        total = 0.0
        for name in PARTS:
            got = [p[name] for p in runs if name in p]
            if not got:
                continue
            med = statistics.median(x["step_s_median"] for x in got)
            total += med
            lo = min(x["step_s_min"] for x in got)
            hi = max(x["step_s_max"] for x in got)
            gflop = got[0].get("gflop")
            gbytes = got[0].get("gbytes")
            share = f"{100 * med / step_s:.0f}%" if step_s else "—"
            lines.append(
                f"| {name} ({path}) | {_ms(med)} ({_ms(lo)}–{_ms(hi)}) | {share} | "
                + (f"{gflop:.3g} | " if gflop is not None else "— | ")
                + (f"{gbytes:.3g} | " if gbytes is not None else "— | ")
                + (f"{gflop / med:.3g} | " if gflop is not None else "— | ")
                + f"{got[0]['compile_s']:.1f} |")
        share = f"{100 * total / step_s:.0f}%" if step_s else "—"
        lines.append(f"| sum of the pieces ({path}) | {_ms(total)} | {share} | | | | |")
    return "\n".join(lines)


def ratio_lines(rows: list[dict], target: float = 1.5) -> list[str]:
    """Per message-passing path: median stage-2 s/step over median denoising s/step (one batch),
    the per-repeat ratios, and whether it is within ``target``; the same against the accumulated
    denoising step when it ran."""
    lines = []
    for path in dict.fromkeys(r["path"] for r in rows if r["workload"] == "stage2"):
        s2 = {r.get("repeat"): r["step_s_median"] for r in rows
              if r["workload"] == "stage2" and r["path"] == path}
        for base in ("denoise", "denoise-accum"):
            den = {r.get("repeat"): r["step_s_median"] for r in rows
                   if r["workload"] == base and r["path"] == path}
            if not den:
                continue
            ratio = statistics.median(s2.values()) / statistics.median(den.values())
            per = [s2[k] / den[k] for k in s2 if k in den]
            verdict = f"target <= {target:g}x {'met' if ratio <= target else 'NOT met'}"
            lines.append(
                f"- {path}: stage 2 {statistics.median(s2.values()):.2f} s/step vs {base} "
                f"{statistics.median(den.values()):.2f} s/step = {ratio:.2f}x "
                f"(per-repeat {', '.join(f'{x:.2f}' for x in per)})"
                + (f"; {verdict}" if base == "denoise" else ""))
    lines += bound_lines(rows, target)
    return lines


def bound_lines(rows: list[dict], target: float = 1.5) -> list[str]:
    """Per path with ``bound`` and ``denoise`` rows: the GEMM rates measured, and the lowest
    stage-2 ratio reachable, ``1 + (SpecFormer matmul GFLOP / best GEMM GFLOP/s) / denoise s``
    (medians over the runs)."""
    lines = []
    for path in dict.fromkeys(r["path"] for r in rows if r["workload"] == "bound"):
        bounds = [r for r in rows if r["workload"] == "bound" and r["path"] == path]
        den = [r["step_s_median"] for r in rows if r["workload"] == "denoise" and r["path"] == path]
        gflop = statistics.median(r["specformer_matmul_gflop"] for r in bounds)
        best = statistics.median(r["gemm_gflops"]["best"] for r in bounds)
        shapes = [k for k in bounds[0]["gemm_gflops"] if k != "best"]
        rates = ", ".join(
            f"{k} {statistics.median(r['gemm_gflops'][k] for r in bounds):.0f}" for k in shapes)
        lines.append(f"- float32 GEMM GFLOP/s on this machine (M x K x N, median of runs): {rates}")
        floor_s = gflop / best
        if not den:
            lines.append(f"- {path}: SpecFormer forward + backward has {gflop:.1f} GFLOP of matrix "
                         f"products: at least {floor_s:.2f} s at {best:.0f} GFLOP/s")
            continue
        d = statistics.median(den)
        lowest = 1.0 + floor_s / d
        verdict = "reachable in principle" if lowest <= target else "out of reach on this machine"
        lines.append(
            f"- {path}: lower bound: stage 2 >= denoise {d:.2f} s + SpecFormer matrix products "
            f"{gflop:.1f} GFLOP / {best:.0f} GFLOP/s = {d + floor_s:.2f} s/step = {lowest:.2f}x "
            f"the denoising step; target <= {target:g}x {verdict}")
    return lines


def main(argv=None) -> int:
    from benchmarks.reference_runner import MALLOC_SETTINGS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="stage2,denoise,parts",
                   help=f"comma list of {list(WORKLOADS)}")
    p.add_argument("--paths", default="config",
                   help="comma list of message-passing settings: config (the config's own, auto), "
                   "xla, auto, fused")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--malloc", default="hugetlb",
                   help=f"comma list of allocator settings: {', '.join(MALLOC_SETTINGS)} (hugetlb "
                   "is what mspec's entry points set)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--path", default="config", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        if args.worker == "parts":
            out = run_parts_worker(args.batches, args.batch_size, args.path, args.steps, args.warmup)
        elif args.worker == "bound":
            out = run_bound_worker(args.batches, args.batch_size, args.path)
        else:
            out = run_step_worker(args.batches, args.worker, args.batch_size, args.path,
                                  args.steps, args.warmup)
        print(json.dumps(out))
        return 0

    from benchmarks import harness

    workloads = harness.comma_choices(p, "workload", args.workloads, WORKLOADS)
    paths = harness.comma_choices(p, "--paths", args.paths, ("config", "xla", "auto", "fused"))
    mallocs = harness.comma_choices(p, "--malloc", args.malloc, MALLOC_SETTINGS)
    load_start = harness.load_average()
    tmp = tempfile.mkdtemp(prefix="mspec_stage2_bench_")
    batches = os.path.join(tmp, f"spectra_b{args.batch_size}.npz")
    n_batches = max(2, min(args.steps + args.warmup + 1, 1119 // args.batch_size, 8))
    data = write_batches(args.batch_size, n_batches, batches)
    print(json.dumps(data), file=sys.stderr)

    rows = []
    for repeat in range(args.repeats):
        for malloc in mallocs:
            for path in paths:
                for w in workloads:
                    print(f"[{repeat + 1}/{args.repeats}] {w} {path} ({malloc} malloc) ...",
                          file=sys.stderr, flush=True)
                    harness.keep_row(rows, harness.run_worker(
                        "benchmarks.stage2_step",
                        ["--worker", w, "--path", path, "--batches", batches,
                         "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                         "--warmup", str(args.warmup)], malloc, f"{w} {path}"), repeat)
    load_end = harness.load_average()
    out_table, out_parts, ratios = table(rows), parts_table(rows), "\n".join(ratio_lines(rows))
    harness.print_results([out_table, "\n" + out_parts if out_parts else "", ratios],
                          load_start, load_end)
    if args.record:
        details = (
            f"batch {args.batch_size}, {n_batches} batches of the {data['source']} "
            f"({data['atoms_per_mol']:.1f} atoms/molecule); medians of {args.steps} steps after "
            f"{args.warmup} warm-up (parts: the same per piece); {harness.malloc_description(mallocs)}")
        harness.append_to_benchmarks(
            harness.record_header("stage2_step", harness.command_line("benchmarks.stage2_step", argv),
                                  load_start, load_end, details)
            + out_table + "\n" + (f"\n{out_parts}\n" if out_parts else "") + ratios + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
