"""Time the PyTorch reference (torchmd-net 3.1.0 Equivariant Transformer) on fixed batches.

Run this script with the *reference* interpreter, not the mspec environment::

    ~/torchref-venv/bin/python benchmarks/torchmd_reference.py \
        --batches /tmp/qm9_b128.npz --threads 2 --steps 10 --warmup 2

(``benchmarks/reference_runner.py`` does exactly that from the mspec environment.) The
venv holds CPU ``torch==2.13.0``, ``numpy``, ``torchmd-net==3.1.0`` (installed with
``--no-deps``) and its import-time needs ``warp-lang ase pyyaml lightning-utilities``.

What is timed (one "step"), following ``docs/spec/benchmark-protocol.md`` §1:

* training (default): Coord denoising, i.e. add Gaussian noise of ``--sigma`` (0.04 A) to
  the positions, predict a per-atom vector with the upstream ET representation model
  followed by its ``EquivariantVectorOutput`` head (per-atom, before the reduction over
  atoms), take the MSE against ``noise / sigma``, backpropagate and apply one AdamW step
  (lr ``--lr`` = 4e-4, torch defaults otherwise). Noise sampling, ``zero_grad``, forward,
  backward and the optimiser step are all inside the timed region.
* ``--inference``: the forward pass only, under ``torch.inference_mode()``, on the clean
  positions.

The model is built with the upstream factory ``torchmdnet.models.model.create_model`` using
the argument names of ``torchmd-train`` (``model='equivariant-transformer'``,
``output_model='VectorOutput'``, ``neighbor_embedding=True``, ``trainable_rbf=False``, ...);
at H=256, 8 layers, 8 heads, 64 RBF this has 6,864,898 parameters.

Batches come from an ``.npz`` written by ``benchmarks/qm9_molecules.save_batches_npz``
(keys ``z_b``, ``pos_b``, ``batch_b``, ``num_batches``, ``batch_size``); steps cycle through
the batches in order. The first ``--warmup`` steps (warp JIT of the neighbour kernel,
allocator warm-up) are excluded from the statistics and reported separately.

Output: exactly one JSON line on stdout, e.g. ::

    {"impl": "torchmd-net 3.1.0", "torch": "2.13.0+cpu", "threads": 2,
     "mol_per_s_median": ..., "mol_per_s_min": ..., "mol_per_s_max": ...,
     "step_s_median": ..., "peak_rss_gb": ..., "n_params": 6864898, "batch_size": 128, ...}

Everything else (including warp's start-up banner, which warp writes to stdout at the C and
Python level) is sent to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time


def _redirect_stdout_to_stderr():
    """Send fd 1 (and ``sys.stdout``) to stderr; return a writer for the real stdout.

    Keeps stdout clean for the single JSON result line even when libraries (warp) print
    banners while initialising.
    """
    sys.stdout.flush()
    saved_fd = os.dup(1)
    os.dup2(2, 1)
    real_stdout = os.fdopen(saved_fd, "w", buffering=1)
    sys.stdout = sys.stderr
    return real_stdout


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", required=True, help=".npz from qm9_molecules.save_batches_npz")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads(N)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--inference", action="store_true", help="time the forward pass only")
    p.add_argument("--hidden", type=int, default=256, help="embedding dimension H")
    p.add_argument("--layers", type=int, default=8, help="attention layers")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--rbf", type=int, default=64, help="radial basis functions")
    p.add_argument("--cutoff", type=float, default=5.0, help="upper cutoff (Angstrom)")
    p.add_argument("--max-neighbors", type=int, default=32, help="max neighbours per atom")
    p.add_argument(
        "--no-neighbor-embedding",
        action="store_true",
        help="disable the ET neighbour embedding (enabled by default, as in the papers)",
    )
    p.add_argument("--sigma", type=float, default=0.04, help="Coord noise std (Angstrom)")
    p.add_argument("--lr", type=float, default=4e-4, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="torch seed (weights and noise)")
    p.add_argument(
        "--autocast-bf16",
        action="store_true",
        help="run the forward pass under torch.autocast('cpu', dtype=torch.bfloat16) (Linear "
        "layers in bfloat16; the loss in float32), to compare with mspec's "
        "model.matmul_dtype=bfloat16",
    )
    return p.parse_args(argv)


def build_model(args: argparse.Namespace):
    """Build the upstream torchmd-net ET with a vector output head via ``create_model``."""
    from torchmdnet.models.model import create_model

    model_args = dict(
        model="equivariant-transformer",
        embedding_dimension=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_rbf=args.rbf,
        rbf_type="expnorm",
        trainable_rbf=False,
        activation="silu",
        attn_activation="silu",
        neighbor_embedding=not args.no_neighbor_embedding,
        distance_influence="both",
        cutoff_lower=0.0,
        cutoff_upper=args.cutoff,
        max_z=100,
        max_num_neighbors=args.max_neighbors,
        output_model="VectorOutput",
        reduce_op="add",
        precision=32,
        derivative=False,
        atom_filter=-1,
        prior_model=None,
    )
    return create_model(model_args)


def per_atom_vectors(model, z, pos, batch):
    """Per-atom vector prediction [A, 3]: ET representation + EquivariantVectorOutput head.

    ``TorchMD_Net.forward`` would sum the vectors over each molecule; the denoising
    objective needs them per atom, so we stop at the head's ``pre_reduce``.
    """
    x, v, z, pos, batch = model.representation_model(z, pos, batch)
    return model.output_model.pre_reduce(x, v, z, pos, batch).reshape(-1, 3)


def main(argv=None) -> int:
    """Run the benchmark and print one JSON line to the real stdout."""
    real_stdout = _redirect_stdout_to_stderr()
    args = parse_args(argv)

    import numpy as np
    import torch

    try:  # quieten warp before torchmdnet initialises it (banner goes to stderr anyway)
        import warp

        warp.config.quiet = True
    except Exception:  # pragma: no cover - warp missing: torchmdnet import will say so
        pass
    import torchmdnet  # noqa: F401  (fail early with a clear ImportError)

    try:
        from importlib.metadata import version as _pkg_version

        tmd_version = _pkg_version("torchmd-net")
    except Exception:  # pragma: no cover
        tmd_version = "unknown"

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with np.load(args.batches) as data:
        n_batches = int(data["num_batches"])
        batches = [
            (
                torch.from_numpy(data[f"z_{b}"].astype(np.int64)),
                torch.from_numpy(data[f"pos_{b}"].astype(np.float32)),
                torch.from_numpy(data[f"batch_{b}"].astype(np.int64)),
            )
            for b in range(n_batches)
        ]
    if not batches:
        raise SystemExit(f"no batches in {args.batches}")
    n_mols = [int(b[2].max()) + 1 for b in batches]

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())

    # Graph statistics of the data (directed edges within the cutoff, self-loops excluded).
    with torch.no_grad():
        edges = 0
        for z, pos, batch in batches:
            ei, _, _ = model.representation_model.distance(pos, batch)
            edges += int(((ei[0] != ei[1]) & (ei[0] >= 0)).sum())
    total_mols = sum(n_mols)
    atoms_per_mol = sum(int(b[0].numel()) for b in batches) / total_mols
    edges_per_mol = edges / total_mols

    gen = torch.Generator().manual_seed(args.seed + 1)
    precision = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if args.autocast_bf16
        else contextlib.nullcontext
    )
    if args.inference:
        model.eval()

        def step(z, pos, batch):
            with torch.inference_mode(), precision():
                return per_atom_vectors(model, z, pos, batch)

    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        sigma = args.sigma

        def step(z, pos, batch):
            noise = torch.randn(pos.shape, generator=gen, dtype=pos.dtype) * sigma
            opt.zero_grad(set_to_none=True)
            with precision():
                pred = per_atom_vectors(model, z, pos + noise, batch)
            loss = torch.nn.functional.mse_loss(pred.float(), noise / sigma)
            loss.backward()
            opt.step()
            return loss.detach()

    times, mols, losses = [], [], []
    warmup_s = 0.0
    for i in range(args.warmup + args.steps):
        b = i % len(batches)
        t0 = time.perf_counter()
        out = step(*batches[b])
        dt = time.perf_counter() - t0
        if i < args.warmup:
            warmup_s += dt
        else:
            times.append(dt)
            mols.append(n_mols[b])
        if not args.inference:
            losses.append(float(out))

    rates = [m / t for m, t in zip(mols, times)] if times else [float("nan")]
    result = {
        "impl": f"torchmd-net {tmd_version}",
        "torch": torch.__version__,
        "threads": args.threads,
        "mode": "inference" if args.inference else "train",
        "mol_per_s_median": round(statistics.median(rates), 3),
        "mol_per_s_min": round(min(rates), 3),
        "mol_per_s_max": round(max(rates), 3),
        "step_s_median": round(statistics.median(times), 4) if times else None,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "n_params": n_params,
        "batch_size": n_mols[0],
        "steps": len(times),
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 3),
        "atoms_per_mol": round(atoms_per_mol, 2),
        "edges_per_mol": round(edges_per_mol, 1),
        "config": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "rbf": args.rbf,
            "cutoff": args.cutoff,
            "max_neighbors": args.max_neighbors,
            "neighbor_embedding": not args.no_neighbor_embedding,
            "autocast_bf16": bool(args.autocast_bf16),
        },
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    if losses:
        result["loss_first"] = round(losses[0], 5)
        result["loss_last"] = round(losses[-1], 5)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
