"""One ET layer's message passing, forward + backward: XLA ops vs the fused CPU kernel.

    python -m benchmarks.message_passing            # batch 128 QM9 molecules, H=256, 8 heads

Real QM9 molecules (deterministic sample, seed 0), their directed edges within 5 Å (self-loops
included) in the pipeline's order; random projections and filters of the qm9 config's sizes. Both
start from the filters before their SiLU (the kernel applies it itself).
Times ``jax.value_and_grad`` of a linear function of both outputs with respect to all eight float
inputs (:mod:`mspec.models.fused_message`), median of ``--repeats`` interleaved timings.
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
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.qm9_molecules import load_qm9_sample
    from mspec import graph
    from mspec.models import fused_message as fm

    mols = load_qm9_sample(args.batch_size, seed=0)
    senders, receivers, offset = [], [], 0
    for z, pos in mols:
        s, r = graph.radius_graph(np.asarray(pos, np.float32), 5.0)
        senders.append(s + offset)
        receivers.append(r + offset)
        offset += len(z)
    s, r = jnp.asarray(np.concatenate(senders)), jnp.asarray(np.concatenate(receivers))
    n, e, f = offset, int(s.shape[0]), args.hidden
    rng = np.random.default_rng(0)
    rn = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    floats = (rn(n, f), rn(n, f), rn(n, 3 * f), rn(n, 3, f), rn(e, f), rn(e, 3 * f), rn(e, 3),
              jnp.asarray(rng.random(e).astype(np.float32)))
    mask = jnp.ones((e,), jnp.float32)
    cx, cv = rn(n, f), rn(n, 3, f)

    def timed(fn):
        def loss(*a):
            x, v = fn(*a)
            return jnp.sum(x * cx) + jnp.sum(v * cv)

        step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8))))
        jax.block_until_ready(step(*floats))

        def once():
            t = time.perf_counter()
            jax.block_until_ready(step(*floats))
            return time.perf_counter() - t

        return once

    def xla_ops(q, k, u, vec, pk, pv, unit, cut):  # both start from the pre-SiLU filters
        return fm.message_xla(
            q, k, u, vec, jax.nn.silu(pk), jax.nn.silu(pv), unit, cut, mask, s, r, args.heads
        )

    xla = timed(xla_ops)
    index = fm.edge_index(s, r, n)
    fused = timed(lambda *a: fm.message_fused(*a, mask, s, r, index, args.heads))
    times = {"xla": [], "fused": []}
    for _ in range(args.repeats):
        times["xla"].append(xla())
        times["fused"].append(fused())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{n} atoms, {e} edges, F={f}, {args.heads} heads; forward + backward of one layer, "
          f"median of {args.repeats}:")
    print("| implementation | ms (min–max) |\n|---|---|")
    for k, v in times.items():
        print(f"| {k} | {1e3 * med[k]:.1f} ({1e3 * min(v):.1f}–{1e3 * max(v):.1f}) |")
    print(f"fused / xla speed-up: {med['xla'] / med['fused']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
