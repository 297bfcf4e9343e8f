"""Time torchmd-net 3.1.0's fine-tuning steps (QM9 property + Noisy Nodes; MD17 energy + forces).

Run with the *reference* interpreter (``~/torchref-venv``, docs/spec/benchmark-protocol.md §2);
``benchmarks/finetune_step.py`` drives it through ``reference_runner.run_reference``::

    ~/torchref-venv/bin/python benchmarks/torchmd_finetune_reference.py --task md17 \
        --batches /tmp/md17_b8.npz --hidden 128 --layers 6 --rbf 32 --threads 2

The model is upstream's, built by ``torchmdnet.models.model.create_model`` (Equivariant
Transformer, ``output_model="Scalar"``, which is ``EquivariantScalar`` on the ET, sum readout,
``mean`` / ``std`` from the batches file). One step, all of it timed: ``zero_grad``, noise
sampling, forward, loss, backward, AdamW step (lr ``--lr``, weight decay 0 as mspec's configs).

* ``--task qm9``: what ``torchmd-train`` would do with Noisy Nodes, written out as in the Frad /
  pre-training forks (upstream 3.1.0 has no noise head): Gaussian noise of ``--tau`` (0.005 Å)
  on the positions, one pass of the representation model, the property from the scalar head
  (``y = std Σ_i h_i + mean``) against the label with MSE, and an ``EquivariantVectorOutput``
  noise head on the same features against ``noise / --denoising-scale`` with MSE, weighted
  ``--denoising-weight`` (0.1).
* ``--task qm9 --inference``: the forward pass only, as a prediction run does: ``model.eval()``,
  ``torch.inference_mode()``, ``y = model(z, pos, batch)`` on the clean positions (upstream
  ``TorchMD_Net.forward``: neighbour search, ET, scalar head, sum, ``std`` / ``mean``); no noise
  head, no loss, no optimiser.
* ``--task md17``: upstream LNNP's training step with ``derivative=True``: ``y, -dy = model(z,
  pos, batch)`` (forces by autograd with ``create_graph=True``), loss ``--energy-weight`` ×
  EMA(``--ema-alpha``) of the energy loss + ``--force-weight`` × the force loss, both
  ``huber_loss`` with δ = 1 (= smooth-L1 with β = 1, as Frad's MD17 recipe) or MSE (``--loss``).

Batches: an ``.npz`` from ``benchmarks/qm9_molecules.save_batches_npz`` with labels (``y_b``,
``forces_b`` for MD17) and the scalars ``target_mean`` / ``target_std``. Output: one JSON line on
stdout (as ``torchmd_reference.py``), everything else on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from torchmd_reference import _redirect_stdout_to_stderr


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("qm9", "md17"), required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--rbf", type=int, default=64)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--max-neighbors", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--tau", type=float, default=0.005, help="Noisy Nodes noise std (Å)")
    p.add_argument("--denoising-weight", type=float, default=0.1)
    p.add_argument("--denoising-scale", type=float, default=0.04)
    p.add_argument("--loss", choices=("mse", "smooth_l1"), default="mse")
    p.add_argument("--energy-weight", type=float, default=1.0)
    p.add_argument("--force-weight", type=float, default=0.0)
    p.add_argument("--ema-alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inference", action="store_true",
                   help="time the forward pass only (qm9: property prediction)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    real_stdout = _redirect_stdout_to_stderr()
    args = parse_args(argv)
    if args.inference and args.task != "qm9":
        raise SystemExit("--inference is supported for --task qm9 only")

    import numpy as np
    import torch

    try:
        import warp

        warp.config.quiet = True
    except Exception:  # pragma: no cover
        pass
    from importlib.metadata import version as _pkg_version

    from torchmdnet.models.model import create_model
    from torchmdnet.models.output_modules import EquivariantVectorOutput

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    md17 = args.task == "md17"

    with np.load(args.batches) as data:
        n_batches = int(data["num_batches"])
        mean = float(data["target_mean"])
        std = float(data["target_std"])
        batches = []
        for b in range(n_batches):
            item = {
                "z": torch.from_numpy(data[f"z_{b}"].astype(np.int64)),
                "pos": torch.from_numpy(data[f"pos_{b}"].astype(np.float32)),
                "batch": torch.from_numpy(data[f"batch_{b}"].astype(np.int64)),
                "y": torch.from_numpy(data[f"y_{b}"].astype(np.float32)),
            }
            if md17:
                item["forces"] = torch.from_numpy(data[f"forces_{b}"].astype(np.float32))
            batches.append(item)
    n_mols = [int(b["batch"].max()) + 1 for b in batches]

    model = create_model(
        dict(
            model="equivariant-transformer",
            embedding_dimension=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            num_rbf=args.rbf,
            rbf_type="expnorm",
            trainable_rbf=False,
            activation="silu",
            attn_activation="silu",
            neighbor_embedding=True,
            distance_influence="both",
            cutoff_lower=0.0,
            cutoff_upper=args.cutoff,
            max_z=100,
            max_num_neighbors=args.max_neighbors,
            output_model="Scalar",
            reduce_op="add",
            precision=32,
            derivative=md17,
            atom_filter=-1,
            prior_model=None,
        ),
        mean=torch.tensor(mean),
        std=torch.tensor(std),
    )
    params = list(model.parameters())
    noise_head = None
    if not md17 and args.denoising_weight > 0 and not args.inference:
        noise_head = EquivariantVectorOutput(args.hidden, activation="silu")
        params += list(noise_head.parameters())
        noise_head.train()
    n_params = sum(p.numel() for p in params)
    model.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    loss_fn = (
        torch.nn.functional.mse_loss if args.loss == "mse"
        else lambda a, b: torch.nn.functional.huber_loss(a, b, delta=1.0)
    )
    ema = {"energy": None}

    def qm9_step(z, pos, batch, y, **_):
        opt.zero_grad(set_to_none=True)
        noise = torch.randn(pos.shape, generator=gen, dtype=pos.dtype) * args.tau
        noisy = pos + noise
        # TorchMD_Net.forward without the derivative, split so a noise head reads the features.
        x, v, z, noisy, batch = model.representation_model(z, noisy, batch)
        atom = model.output_model.pre_reduce(x, v, z, noisy, batch) * model.std
        pred = model.output_model.reduce(atom, batch, num_systems=len(y)).reshape(-1) + model.mean
        loss = loss_fn(pred, y)
        if noise_head is not None:
            noise_pred = noise_head.pre_reduce(x, v, z, noisy, batch)
            loss = loss + args.denoising_weight * torch.nn.functional.mse_loss(
                noise_pred, noise / args.denoising_scale)
        loss.backward()
        opt.step()
        return loss.detach()

    def md17_step(z, pos, batch, y, forces):
        opt.zero_grad(set_to_none=True)
        pos = pos.clone()  # the model sets requires_grad on it
        energy, neg_dy = model(z, pos, batch)
        l_e = loss_fn(energy.reshape(-1), y)
        # LNNP._update_loss_with_ema: the first step uses the loss itself.
        if args.ema_alpha < 1.0 and ema["energy"] is not None:
            l_e = args.ema_alpha * l_e + (1 - args.ema_alpha) * ema["energy"]
        ema["energy"] = l_e.detach()
        loss = args.energy_weight * l_e + args.force_weight * loss_fn(neg_dy, forces)
        loss.backward()
        opt.step()
        return loss.detach()

    def qm9_predict(z, pos, batch, **_):
        with torch.inference_mode():
            y, _ = model(z, pos, batch)
        return y.sum()

    if args.inference:
        model.eval()
    step = qm9_predict if args.inference else md17_step if md17 else qm9_step
    times, mols, losses = [], [], []
    warmup_s = 0.0
    for i in range(args.warmup + args.steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        out = step(**b)
        dt = time.perf_counter() - t0
        if i < args.warmup:
            warmup_s += dt
        else:
            times.append(dt)
            mols.append(n_mols[i % len(batches)])
        losses.append(float(out))

    rates = [m / t for m, t in zip(mols, times)]
    result = {
        "impl": f"torchmd-net {_pkg_version('torchmd-net')}",
        "torch": torch.__version__,
        "threads": args.threads,
        "mode": f"{'inference' if args.inference else 'finetune'}-{args.task}",
        "mol_per_s_median": round(statistics.median(rates), 3),
        "mol_per_s_min": round(min(rates), 3),
        "mol_per_s_max": round(max(rates), 3),
        "step_s_median": round(statistics.median(times), 5),
        "step_s_min": round(min(times), 5),
        "step_s_max": round(max(times), 5),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "n_params": n_params,
        "batch_size": n_mols[0],
        "steps": len(times),
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 3),
        "loss_first": round(losses[0], 5),
        "loss_last": round(losses[-1], 5),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
