"""Input pipeline throughput vs the train step: does the pipeline keep the step fed?

    python -m benchmarks.input_pipeline                          # qm9/sample, Frad base config
    python -m benchmarks.input_pipeline --config experiments/configs/pretrain_frad.py:tiny \\
        --modes inline,threads:2,workers:2 --batches 40 --repeats 3

Measures, on the same machine and the same dataset/config as training:

* the **pipeline**: global batches per second delivered by :class:`mspec.data.pipeline.PackedBatchIterator`
  (TFDS array_record read + decode, neighbour lists, greedy packing into the static budget), for
  each reader mode (``inline``, ``threads:N`` grain reader threads, ``workers:N`` grain worker
  processes); the first ``--warmup`` batches (thread/process start-up) are not timed;
* the **train step**: jitted ``Trainer.update_fn`` steps per second on batches from that pipeline
  (compilation excluded; ``block_until_ready`` after every step);

and reports median over ``--repeats`` of each, and the ratio pipeline batches/s ÷ train steps/s
(the issue asks for >= 10x). On a shared or busy machine the numbers are noisy; record them on a
quiet one. Nothing is written unless ``--json PATH`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time


def _load_config(spec: str):
    path, _, variant = spec.partition(":")
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def _parse_mode(mode: str) -> dict:
    name, _, n = mode.partition(":")
    if name == "inline":
        return {}
    if name == "threads":
        return {"num_threads": int(n or 2)}
    if name == "workers":
        return {"num_workers": int(n or 2)}
    raise ValueError(f"unknown mode {mode!r}; use inline, threads:N or workers:N")


def time_pipeline(ds, budget, num_devices, mode, batches, warmup, repeat) -> float:
    """Global batches per second of one fresh iterator (after ``warmup`` batches)."""
    from mspec.data import pipeline

    it = pipeline.PackedBatchIterator(ds, budget, num_devices, start=repeat * 100_003,
                                      **_parse_mode(mode))
    try:
        for _ in range(warmup):
            next(it)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches / (time.perf_counter() - t)
    finally:
        it.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="experiments/configs/pretrain_frad.py")
    p.add_argument("--dataset", default="qm9/sample", help="TFDS dataset name/config")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--modes", default="inline,threads:2")
    p.add_argument("--batches", type=int, default=50, help="timed pipeline batches per repeat")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed train steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from mspec import graph, models
    from mspec.data import datasets, pipeline
    from mspec.training import train

    config = _load_config(args.config)
    config.data.dataset = args.dataset
    builder = datasets.get_builder(args.dataset, args.data_dir)
    source = datasets.open_split(builder, "train")
    featurizer = pipeline.Featurizer(radius=config.model.cutoff + config.data.skin,
                                     max_z=config.model.max_z, dataset=args.dataset)
    budget = train.choose_budget(config, builder, featurizer, source)
    ds = pipeline.make_grain_dataset(source, featurizer, seed=config.seed, shuffle=True,
                                     repeat=True)
    n_dev = jax.local_device_count()
    print(f"dataset {args.dataset}, {len(source)} train molecules; budget {budget}; "
          f"{n_dev} device(s) ({jax.devices()[0].platform})", file=sys.stderr)

    results = {"pipeline_batches_per_s": {}}
    for mode in args.modes.split(","):
        rates = [time_pipeline(ds, budget, n_dev, mode, args.batches, args.warmup, r)
                 for r in range(args.repeats)]
        results["pipeline_batches_per_s"][mode] = {
            "median": statistics.median(rates), "min": min(rates), "max": max(rates)}
        print(f"pipeline {mode}: {statistics.median(rates):.1f} batches/s "
              f"(min {min(rates):.1f}, max {max(rates):.1f})", file=sys.stderr)

    mesh = train.make_mesh()
    trainer = train.Trainer(config, models.get_model(config.model), mesh)
    it = pipeline.PackedBatchIterator(ds, budget, n_dev)
    local = [next(it) for _ in range(min(8, args.steps))]
    it.close()
    mol_per_batch = float(np.mean([pipeline.fill(b)["molecules"] for b in local]))
    batches = [trainer.global_batch(b) for b in local]
    state = trainer.init_state(jax.random.key(0), graph.pack([], budget))
    t = time.perf_counter()
    state, m = trainer.update_fn(state, batches[0])
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t
    step_rates = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for i in range(args.steps):
            state, m = trainer.update_fn(state, batches[i % len(batches)])
            jax.block_until_ready(m["loss"])
        step_rates.append(args.steps / (time.perf_counter() - t))
    step = statistics.median(step_rates)
    results.update({
        "train_steps_per_s": {"median": step, "min": min(step_rates), "max": max(step_rates)},
        "compile_s": compile_s,
        "molecules_per_batch": mol_per_batch,
        "ratio_pipeline_over_step": {m: v["median"] / step
                                     for m, v in results["pipeline_batches_per_s"].items()},
        "config": args.config, "dataset": args.dataset, "budget": str(budget),
        "devices": f"{n_dev} x {jax.devices()[0].platform}", "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    })
    print(f"train step: {step:.2f} steps/s (compile {compile_s:.1f} s), "
          f"{mol_per_batch:.1f} molecules/batch", file=sys.stderr)
    print("| pipeline mode | pipeline batches/s | train steps/s | ratio |")
    print("|---|---|---|---|")
    for mode, v in results["pipeline_batches_per_s"].items():
        print(f"| {mode} | {v['median']:.1f} | {step:.2f} | {v['median'] / step:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
