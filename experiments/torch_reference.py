"""Writes torch's outputs of YOUR ET checkpoint as a reference .npz for ``experiments.convert --check``.

Run it in a separate virtual environment that has torch and the codebase that trained the model
(NOT in mspec's environment; mspec never needs torch):

    python -m venv ~/venv-torch && ~/venv-torch/bin/pip install torchmd-net==3.1.0   # upstream
    # or: the Frad / MolSpectra fork's requirements, with the fork's directory on PYTHONPATH
    ~/venv-torch/bin/python experiments/torch_reference.py --ckpt my.ckpt \
        --molecules tests/data/golden_et/frad.npz --out my_reference.npz
    python -m experiments.convert --from frad --ckpt my.ckpt --out runs/mine --check my_reference.npz

``--molecules`` is any npz with ``z [A]``, ``pos [A, 3]`` (Å), ``batch [A]`` (molecule index,
sorted), e.g. one of the golden files. The output has the keys of
``tests/data/golden_et/README.md`` ("Reference data"): torch's edge list, float64 outputs and
gradients of every parameter (a float64 copy of the model) and float32 outputs.

This script is standalone on purpose (it imports nothing from mspec). It has NOT been run in the
mspec development environment, which has no torch; the golden files themselves were made by a
separate generator (README, "Generator command").
"""

import argparse
import re

import numpy as np
import torch


def load_model(path: str):
    """The TorchMD_Net of a Lightning checkpoint, strictly (every tensor used)."""
    from torchmdnet.models.model import create_model

    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # forks: class-keyed callbacks
    args = dict(ckpt["hyper_parameters"])
    model = create_model(args)
    state = {re.sub(r"^model\.", "", k): v for k, v in ckpt["state_dict"].items()}
    noise = {k: v for k, v in state.items() if k.startswith("output_model_noise.")}
    if noise and getattr(model, "output_model_noise", None) is None:
        # torchmd-net has no denoising head; attach its own EquivariantVectorOutput.
        from torchmdnet.models.output_modules import EquivariantVectorOutput

        model.output_model_noise = EquivariantVectorOutput(args["embedding_dimension"], args["activation"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def run(model, z, pos, batch, c, r):
    """Outputs and the gradients of ``L = sum c E + sum r . noise`` (in the model's dtype)."""
    pos = pos.clone().requires_grad_(True)
    model.zero_grad()
    rep = model.representation_model(z, pos, batch=batch)
    x, vec = rep[0], rep[1]
    scalar = model.output_model.pre_reduce(x, vec, z, pos, batch)
    per_atom = scalar * model.std
    prior = getattr(model, "prior_model", None)
    if prior is not None:
        raise SystemExit("models with a prior are not handled by this script")
    n_mol = int(batch.max()) + 1
    energy = torch.zeros(n_mol, 1, dtype=per_atom.dtype).index_add_(0, batch, per_atom) + model.mean
    energy = energy[:, 0]
    head = getattr(model, "output_model_noise", None)
    noise = head.pre_reduce(x, vec, z, pos, batch) if head is not None else torch.zeros_like(pos)
    loss = (c * energy).sum() + (r * noise).sum()
    (forces,) = torch.autograd.grad(-energy.sum(), pos, retain_graph=True)
    loss.backward()
    out = dict(x=x, vec=vec, scalar=scalar[:, 0], energy=energy, noise=noise, loss=loss,
               forces=forces, grad_pos=pos.grad)
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters()}
    return {k: v.detach().numpy() for k, v in out.items()}, {k: v.numpy() for k, v in grads.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--molecules", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    mols = np.load(args.molecules)
    z = torch.as_tensor(mols["z"], dtype=torch.long)
    batch = torch.as_tensor(mols["batch"], dtype=torch.long)
    n_mol = int(batch.max()) + 1
    rng = np.random.default_rng(12345)
    c, r = rng.standard_normal(n_mol), rng.standard_normal((len(z), 3))

    model = load_model(args.ckpt)
    out32, _ = run(model, z, torch.as_tensor(mols["pos"], dtype=torch.float32), batch,
                   torch.as_tensor(c, dtype=torch.float32), torch.as_tensor(r, dtype=torch.float32))
    model64 = load_model(args.ckpt).double()
    pos64 = torch.as_tensor(mols["pos"], dtype=torch.float64)
    out64, grads = run(model64, z, pos64, batch, torch.as_tensor(c), torch.as_tensor(r))
    with torch.no_grad():
        edge_index = model64.representation_model.distance(pos64, batch)[0].numpy()
    n_atoms = np.bincount(mols["batch"], minlength=n_mol)
    np.savez_compressed(
        args.out, z=mols["z"], pos=mols["pos"], batch=mols["batch"], n_atoms=n_atoms,
        loss_c=c, loss_r=r, edge_index=edge_index.astype(np.int32), **out64,
        **{f"f32/{k}": v for k, v in out32.items()}, **{f"grad/{k}": v for k, v in grads.items()},
    )
    print(f"wrote {args.out}: {len(z)} atoms, {n_mol} molecules, {edge_index.shape[1]} edges")


if __name__ == "__main__":
    main()
