"""Shared machinery of the step benchmarks (``train_step.py``, ``finetune_step.py``,
``stage2_step.py``, ``inference.py``).

Protocol (docs/spec/benchmark-protocol.md §5): every measurement runs in its own subprocess
under one allocator setting (``GLIBC_TUNABLES``, :data:`benchmarks.reference_runner.MALLOC_SETTINGS`),
so memory and allocator state never leak between runs; each worker reports one JSON line with
its timings and its own peak RSS; the orchestrating script interleaves the implementations and
appends its table to ``BENCHMARKS.md``. No JAX or torch import at module level.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(REPO, "BENCHMARKS.md")


def worker_env(malloc: str, base: Optional[dict] = None) -> dict:
    """Environment of an mspec worker process: the named allocator setting, the CPU backend, no
    inherited ``XLA_FLAGS``, and mspec's own malloc re-execution (mspec/kernels/host_malloc.py) off, since
    the worker is started with the setting under test."""
    from benchmarks.reference_runner import malloc_environment

    env = malloc_environment(dict(os.environ if base is None else base), malloc)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["MSPEC_MALLOC_TUNING"] = "0"
    return env


def run_worker(module: str, args: Sequence[str], malloc: str, label: str,
               timeout_s: float = 3600) -> Optional[dict]:
    """Run ``python -m <module> --worker ...`` under ``malloc``; its last stdout line as JSON
    (with ``"malloc"`` added), or None after printing the tail of its stderr."""
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(malloc), capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        print(f"mspec run failed ({label}, {malloc} malloc):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["malloc"] = malloc
    return out


def peak_rss_gb() -> float:
    """This process's peak resident set size in GB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def time_steps(step: Callable[[int], None], warmup: int, steps: int) -> tuple[float, list[float]]:
    """Call ``step(i)`` for ``warmup`` untimed and then ``steps`` timed iterations (``step`` must
    block until its result is ready); returns ``(warm-up seconds, per-step seconds)``."""
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    warm = time.perf_counter() - t0
    times = []
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    return warm, times


def time_updates(trainer, state, batches: Sequence, warmup: int, steps: int) -> dict:
    """Times a trainer's ``update_fn``: one call on ``batches[0]`` (compilation), then ``warmup``
    untimed and ``steps`` timed calls on the following batches, cycling. Exceptions propagate.

    Returns ``compile_s``, ``warmup_s``, ``loss_first``, ``loss_last``, ``compilations`` and the
    per-step seconds as ``times`` (for :func:`step_stats`).
    """
    losses = []

    def step(i):
        nonlocal state
        state, m = trainer.update_fn(state, batches[i % len(batches)])
        losses.append(float(m["loss"]))  # blocks until the step is done

    t0 = time.perf_counter()
    step(0)
    compile_s = time.perf_counter() - t0
    warmup_s, times = time_steps(lambda i: step(i + 1), warmup, steps)
    return {"compile_s": compile_s, "warmup_s": warmup_s, "loss_first": losses[0],
            "loss_last": losses[-1], "compilations": trainer.traces, "times": times}


def median_ratio(pairs: Sequence[tuple[float, float]]) -> tuple[float, list[float]]:
    """``(median of a / b, [a / b per pair])``."""
    ratios = [a / b for a, b in pairs]
    return statistics.median(ratios), ratios


def comma_choices(parser, option: str, text: str, known) -> list[str]:
    """The comma-separated values of ``option`` (blanks dropped); a value not in ``known`` is a
    one-line parser error naming the option and the choices."""
    given = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in given if x not in known]
    if unknown:
        parser.error(f"unknown {option} {unknown}; choose from {list(known)}")
    return given


def keep_row(rows: list, row: Optional[dict], repeat: int) -> None:
    """Appends a worker's result (None: it failed, already reported) tagged with its repeat, and
    echoes it to stderr."""
    if row:
        row["repeat"] = repeat
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)


def malloc_description(mallocs: Sequence[str]) -> str:
    """``"malloc settings: hugetlb = `...`, ..."`` for a BENCHMARKS.md record."""
    from benchmarks.reference_runner import MALLOC_SETTINGS

    return "malloc settings: " + ", ".join(
        f"{m} = `{MALLOC_SETTINGS[m] or 'glibc defaults'}`" for m in mallocs)


def reference_description(rows: Sequence[dict]) -> str:
    """``"reference torchmd-net 3.1.0 on torch 2.x"`` from the reference rows (``impl`` holds
    "torchmd"), or ``"no reference run"``."""
    refs = [r for r in rows if "torchmd" in r["impl"]]
    return (f"reference {refs[0]['impl'].split(' (')[0]} on torch {refs[0]['torch']}" if refs
            else "no reference run")


def print_results(blocks: Sequence[str], load_start: str, load_end: str) -> None:
    """Prints the tables and ratio lines, then the load average at the start and end."""
    for block in blocks:
        if block:
            print(block)
    print(f"load average (1/5/15 min): {load_start} at the start, {load_end} at the end")


def command_line(module: str, argv: Optional[Sequence[str]]) -> str:
    """``python -m <module> <args>`` as the script was called."""
    return f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])


def load_average() -> str:
    """``"1.23, 1.10, 0.98"`` (1, 5, 15 min) or ``"n/a"``."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def append_to_benchmarks(text: str) -> None:
    """Append ``text`` to BENCHMARKS.md."""
    with open(BENCHMARKS_MD, "a") as f:
        f.write(text)


def fitting_budget(per_batch: Sequence[Sequence[dict]], spectra: tuple = ()):
    """The static :class:`mspec.graph.Budget` that fits every batch of featurised molecules
    (``pipeline.Featurizer`` outputs, one list per batch): nodes rounded up to 8 plus one padding
    slot; edges of ``graph.pack``'s pair layout (both directions of every pair, then one
    self-loop per node slot); one padding graph slot; ``spectra`` as the featuriser carries them.
    Every batch then packs into one compiled shape, as in training."""
    from mspec import graph

    nodes = max(sum(len(m["atomic_numbers"]) for m in mols) for mols in per_batch)
    pair_edges = max(sum(len(m["senders"]) - len(m["atomic_numbers"]) for m in mols)
                     for mols in per_batch)
    n_node = 8 * ((nodes + 8) // 8) + 1
    return graph.Budget(n_node=n_node, n_edge=n_node + pair_edges,
                        n_graph=max(len(m) for m in per_batch) + 1, max_torsions=1,
                        spectra=tuple(spectra))


def step_stats(times: Sequence[float], n_mol: int) -> dict:
    """``step_s_median/min/max`` and ``mol_per_s_median`` of per-step times in seconds."""
    med = statistics.median(times)
    return {"step_s_median": med, "step_s_min": min(times), "step_s_max": max(times),
            "mol_per_s_median": n_mol / med, "steps": len(times)}


def cost_analysis(compiled) -> dict:
    """XLA's static cost estimate of a compiled function (``jax.jit(f).lower(...).compile()``):
    ``{"gflop": ..., "gbytes": ...}`` (floating-point operations and bytes accessed, in 1e9), or
    ``{}`` where the backend gives none."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - an estimate only
        return {}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    out = {}
    if "flops" in ca:
        out["gflop"] = float(ca["flops"]) / 1e9
    if "bytes accessed" in ca:
        out["gbytes"] = float(ca["bytes accessed"]) / 1e9
    return out


def matmul_gflop(fn: Callable, *args) -> float:
    """Floating-point operations of the matrix products that ``fn(*args)`` runs, in 1e9: every
    ``dot_general`` in its jaxpr (``2 x`` the product of the left operand's dimensions ``x`` the
    right operand's free dimensions), counted through nested jaxprs (jit, custom derivatives,
    remat) and ``length`` times inside a ``scan``; of a ``cond`` the cheapest branch. A lower
    bound on the arithmetic any implementation of ``fn`` must do, whatever its elementwise work.
    Raises ``ValueError`` for a ``while`` loop (its trip count is not static)."""
    import math

    import jax

    def walk(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
                (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
                free = [d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
                total += 2.0 * math.prod(lhs) * math.prod(free)
                continue
            if name == "while":
                raise ValueError("matmul_gflop: a while loop has no static trip count")
            subs = [walk(j) for j in _sub_jaxprs(eqn.params)]
            if name == "cond":
                total += min(subs, default=0.0)
            else:
                total += sum(subs) * (eqn.params["length"] if name == "scan" else 1)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr) / 1e9


def _sub_jaxprs(params: dict) -> list:
    """The jaxprs nested in an equation's parameters (closed ones opened)."""
    found = []
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            v = getattr(v, "jaxpr", v)  # a ClosedJaxpr holds its Jaxpr
            if hasattr(v, "eqns"):
                found.append(v)
    return found


#: ``(M, K, N)`` float32 products timed by :func:`best_gemm_gflops`: large square ones (the
#: machine's best case) and the shapes of the paper-size SpecFormer's projections at batch 128.
GEMM_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096), (44416, 128, 128), (44416, 128, 256),
               (44416, 256, 128))


def best_gemm_gflops(shapes=GEMM_SHAPES, repeats: int = 5) -> dict:
    """Measured float32 matrix-product throughput of this process's backend (``jnp.dot`` under
    ``jax.jit``, random operands, median of ``repeats`` after one untimed call):
    ``{"MxKxN": GFLOP/s, ..., "best": the highest}``."""
    import jax
    import jax.numpy as jnp

    dot = jax.jit(jnp.dot)
    out = {}
    for m, k, n in shapes:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        dot(a, b).block_until_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dot(a, b).block_until_ready()
            times.append(time.perf_counter() - t0)
        out[f"{m}x{k}x{n}"] = 2.0 * m * k * n / statistics.median(times) / 1e9
    out["best"] = max(out.values())
    return out


def versions() -> str:
    """``"Python 3.11.7, jax 0.10.2, flax 0.12.8"`` (imports jax and flax)."""
    import flax
    import jax

    return f"Python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}"


def record_header(title: str, command: str, load_start: str, load_end: str, details: str = "",
                  reference: str = "") -> str:
    """The heading and the machine paragraph of a BENCHMARKS.md section: ``### <title> — <date>``,
    then the CPU, core count, versions (``reference``: e.g. "reference torchmd-net 3.1.0 on torch
    2.13.0+cpu"), the load average at the start and end, the command and ``details``."""
    import datetime

    ref = f"; {reference}" if reference else ""
    return (
        f"\n### {title} — {datetime.date.today().isoformat()}\n\n"
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; {versions()}{ref}. Load average "
        f"(1/5/15 min) {load_start} at the start, {load_end} at the end. Command: `{command}`"
        + (f"; {details}" if details else "") + ".\n\n"
    )
