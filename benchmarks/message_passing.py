"""One ET layer's message passing, forward + backward: XLA ops vs the fused CPU kernel.

    python -m benchmarks.message_passing            # batch 128 QM9 molecules, H=256, 8 heads

Real QM9 molecules (deterministic sample, seed 0), their directed edges within 5 Å (self-loops
included) packed by ``graph.pack`` into the pair layout, masked by the cutoff and 32-neighbour cap
as in the model; random projections and filters of the qm9 config's sizes, one filter row per atom
pair. Both start from the filter rows [pk | pv] before their bias and SiLU (the kernel applies both).
Times ``jax.value_and_grad`` of a linear function of both outputs with respect to all eight float
inputs (:mod:`mspec.kernels.message`), median of ``--repeats`` interleaved timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--impl", default="xla,fused",
                   help="comma-separated subset of xla, fused (the kernel's automatic schedule), "
                   "fused-components, fused-passes")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.qm9_molecules import load_qm9_sample
    from mspec import graph
    from mspec.kernels import message as fm
    from mspec.models import et as et_lib

    mols = load_qm9_sample(args.batch_size, seed=0)
    # The edges as training sees them: graph.pack's pair layout (one filter row per atom pair
    # plus one for the self-loops), the cutoff and the 32-neighbour cap applied as the model does.
    examples = []
    for z, pos in mols:
        pos = np.asarray(pos, np.float32)
        snd, rcv = graph.radius_graph(pos, 5.0)
        examples.append({"atomic_numbers": np.asarray(z), "positions": pos, "senders": snd,
                         "receivers": rcv, "torsions": np.zeros((0, 4), np.int32),
                         "moving": np.zeros((0, len(z)), bool)})
    n_real = sum(len(m["atomic_numbers"]) for m in examples)
    e_real = sum(len(m["senders"]) for m in examples)
    n_node = n_real + 1
    budget = graph.Budget(n_node=n_node, n_edge=n_node + (e_real - n_real), n_graph=len(examples) + 1,
                          max_torsions=1)
    batch = graph.pack(examples, budget)
    s, r = jnp.asarray(batch["senders"]), jnp.asarray(batch["receivers"])
    mask = graph.active_edges(jnp.asarray(batch["positions"]), s, r, jnp.asarray(batch["edge_mask"]),
                              5.0, 32).astype(jnp.float32)
    n, e, f = budget.n_node, budget.n_edge, args.hidden
    pairs = graph.num_pairs(e, n)
    rows = pairs + 1
    rng = np.random.default_rng(0)
    rn = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    # q, k, u, vec, filter rows [pk | pv] before bias and SiLU, the bias, unit, cut
    floats = (rn(n, f), rn(n, f), rn(n, 3 * f), rn(n, 3, f), rn(rows, 4 * f), rn(4 * f), rn(e, 3),
              jnp.asarray(rng.random(e).astype(np.float32)))
    cx, cv = rn(n, f), rn(n, 3, f)

    # Everything goes in as an argument: closed-over arrays would be constant-folded by XLA.
    fixed = (cx, cv, mask, s, r)

    def timed(fn):
        def loss(q, k, u, vec, filters, bias, unit, cut, cx, cv, mask, s, r):
            x, v = fn(q, k, u, vec, filters, bias, unit, cut, mask, s, r)
            return jnp.sum(x * cx) + jnp.sum(v * cv)

        step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8))))
        jax.block_until_ready(step(*floats, *fixed))

        def once():
            t = time.perf_counter()
            jax.block_until_ready(step(*floats, *fixed))
            return time.perf_counter() - t

        return once

    def xla_ops(q, k, u, vec, filters, bias, unit, cut, mask, s, r):  # both from pre-bias rows
        dk, dv = (graph.expand_pair_rows(jax.nn.silu(x), e) for x in jnp.split(filters + bias, [f], 1))
        return et_lib.message_passing_xla(q, k, u, vec, dk, dv, unit, cut, mask, s, r, args.heads)

    impls = {
        "xla": lambda: timed(xla_ops),
        "fused": lambda: timed(lambda *a: fm.message_fused(*a, args.heads, pairs=pairs)),
        # The kernel's two schedules forced (see mspec/kernels/et_message.cc).
        "fused-components": lambda: timed(
            lambda *a: fm.message_fused(*a, args.heads, pairs=pairs, schedule="components")),
        "fused-passes": lambda: timed(
            lambda *a: fm.message_fused(*a, args.heads, pairs=pairs, schedule="passes")),
    }
    chosen = args.impl.split(",")
    if not chosen or any(c not in impls for c in chosen):
        p.error(f"--impl {args.impl!r}: expected a comma-separated subset of {','.join(impls)}")
    runs = {c: impls[c]() for c in chosen}
    times = {c: [] for c in chosen}
    for _ in range(args.repeats):
        for c, once in runs.items():
            times[c].append(once())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{n_real} atoms, {e_real} edges ({int(mask.sum())} within the cutoff and cap), "
          f"{rows} filter rows, F={f}, {args.heads} heads; forward + backward of one layer, "
          f"median of {args.repeats}:")
    print("| implementation | ms (min–max) |\n|---|---|")
    for k, v in times.items():
        print(f"| {k} | {1e3 * med[k]:.1f} ({1e3 * min(v):.1f}–{1e3 * max(v):.1f}) |")
    for c in med:
        if c != "xla" and "xla" in med:
            print(f"{c} / xla speed-up: {med['xla'] / med[c]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
