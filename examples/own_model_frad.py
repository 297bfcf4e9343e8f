"""Pre-train your own Flax model with mspec's Frad noise and denoising loss.

mspec's noise and losses are pure JAX functions of plain arrays, so any JAX model can be
pre-trained with them. This script writes a small rotation-equivariant network of its own (nothing
from ``mspec.models``) and pre-trains it by fractional denoising (Frad, Feng et al., ICML 2023):
every rotatable torsion is turned by N(0, 2 deg), then every atom is moved by N(0, (0.04 A)^2), and
the network predicts only the Cartesian part from the noisy coordinates.

The mspec names it uses (the public API it relies on):

* ``mspec.noise.frad_noise``: torsion noise, then Cartesian noise; returns the noisy positions and
  the Cartesian displacement, the regression target.
* ``mspec.losses.denoising_target``: scales the target to unit variance (mode ``"tau"``).
* ``mspec.losses.denoising_mse``: mean squared error over the real (unpadded) atoms.
* ``mspec.data.datasets.get_builder`` and ``open_split``: the 2,000-molecule ``qm9/sample``
  dataset (QM9 from the ``qm9pack`` pip package; built on first use, in seconds, into
  ``--data_dir``, default ``$MSPEC_DATA_DIR`` or ``~/tensorflow_datasets``). Its records carry
  Frad's precomputed rotatable torsions and the atoms each one moves.

Run (about a minute on a laptop CPU)::

    python examples/own_model_frad.py
    python examples/own_model_frad.py --steps 3000 --batch_size 64 --lr 1e-3
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mspec import losses, noise
from mspec.data import datasets

SIGMA_DEG, TAU = 2.0, 0.04  # Frad's pre-training noise: torsion std (degrees), Cartesian std (A)


def load_qm9_sample(data_dir, split="train"):
    """The split as dense arrays, one row per molecule, padded to the largest molecule."""
    source = datasets.open_split(datasets.get_builder("qm9/sample", data_dir), split)
    mols = [source[i] for i in range(len(source))]
    m = len(mols)
    a = max(len(mol["atomic_numbers"]) for mol in mols)  # atom slots per molecule (29 in QM9)
    t = max(1, max(len(mol["torsions"]) for mol in mols))  # torsion slots per molecule
    data = {"z": np.zeros((m, a), np.int32), "pos": np.zeros((m, a, 3), np.float32),
            "mask": np.zeros((m, a), bool), "torsions": np.zeros((m, t, 4), np.int32),
            "torsion_mask": np.zeros((m, t), bool), "moving": np.zeros((m, a, t), bool)}
    for i, mol in enumerate(mols):
        n, k = len(mol["atomic_numbers"]), len(mol["torsions"])
        data["z"][i, :n] = mol["atomic_numbers"]
        data["pos"][i, :n] = mol["positions"]  # padding rows stay 0, as frad_noise expects
        data["mask"][i, :n] = True
        data["torsions"][i, :k] = mol["torsions"]  # atom indices local to the molecule
        data["torsion_mask"][i, :k] = True
        # Stored flat, row-major [t, n]: does atom n move when torsion t is set?
        data["moving"][i, :n, :k] = np.asarray(mol["torsion_moving"]).reshape(k, n).T
    return {key: jnp.asarray(value) for key, value in data.items()}


def frad(key, batch):
    """Frad noise for a [B, A] batch of padded molecules; returns (noisy, target), both [B, A, 3].

    frad_noise works on one flat batch (mspec.types): N = B * A atom slots, G = B molecule slots,
    node_graph says which molecule each atom belongs to, and torsions index the flat atom slots.
    Padding atoms may stay in their molecule's slot: node_mask and node_moving keep them still.
    """
    b, a = batch["mask"].shape
    offsets = (jnp.arange(b) * a)[:, None, None]
    noisy, target = noise.frad_noise(
        key, batch["pos"].reshape(b * a, 3), batch["mask"].reshape(b * a),
        jnp.repeat(jnp.arange(b), a), batch["torsions"] + offsets, batch["torsion_mask"],
        batch["moving"].reshape(b * a, -1), sigma_deg=SIGMA_DEG, tau=TAU)
    return noisy.reshape(b, a, 3), target.reshape(b, a, 3)


class PairVectorNet(nn.Module):
    """``pred_i = sum_j w_ij (r_i - r_j) / |r_i - r_j|`` for one molecule ([A] slots).

    The weights ``w_ij`` see only invariants (distances, atom types), and the unit vectors turn
    with the molecule, so the output is rotation-equivariant and translation-invariant by
    construction: a learned pair "force", which is what denoising asks for.
    """

    hidden: int = 32
    num_rbf: int = 32
    cutoff: float = 5.0

    @nn.compact
    def __call__(self, z, pos, mask):
        diff = pos[:, None, :] - pos[None, :, :]  # [A, A, 3]: r_i - r_j
        d2 = jnp.sum(diff * diff, axis=-1)
        pair = mask[:, None] & mask[None, :] & ~jnp.eye(len(z), dtype=bool) & (d2 < self.cutoff**2)
        d = jnp.sqrt(jnp.where(pair, d2, 1.0))  # no sqrt(0) on the diagonal: NaN-free gradients
        envelope = jnp.where(pair, 0.5 * (jnp.cos(jnp.pi * d / self.cutoff) + 1.0), 0.0)
        # Gaussians 0.16 A apart and as wide: noise stretches bonds by only hundredths of an A.
        centers = jnp.linspace(0.0, self.cutoff, self.num_rbf)
        rbf = jnp.exp(-jnp.square((d[..., None] - centers) / (centers[1] - centers[0])))
        h = nn.Embed(10, self.hidden)(z)  # atom types (Z <= 9 in QM9)
        # One invariant message-passing step, so each atom knows its neighbourhood.
        filt = nn.Dense(self.hidden)(rbf) * envelope[..., None]
        h = h + nn.Dense(self.hidden)(nn.silu(jnp.einsum("ijf,jf->if", filt, h)))
        edge = nn.Dense(self.hidden)(rbf) * (nn.Dense(self.hidden)(h)[:, None] + h[None, :])
        w = nn.Dense(1)(nn.silu(nn.Dense(self.hidden)(nn.silu(edge))))[..., 0] * envelope
        return jnp.einsum("ij,ijc->ic", w, diff / d[..., None])  # [A, 3]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=32, help="molecules per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log_every", type=int, default=100)
    p.add_argument("--data_dir", default=None, help="TFDS data directory (default: mspec's)")
    args = p.parse_args()

    data = load_qm9_sample(args.data_dir)
    num_molecules = data["mask"].shape[0]
    model = PairVectorNet()
    predict = jax.vmap(model.apply, in_axes=(None, 0, 0, 0))  # the model sees one molecule
    init_key, noise_key = jax.random.split(jax.random.key(args.seed))
    params = model.init(init_key, data["z"][0], data["pos"][0], data["mask"][0])

    # Equivariance by construction, checked once: rotating the input rotates the output.
    rot = jnp.asarray(np.linalg.qr(np.random.default_rng(args.seed).normal(size=(3, 3)))[0])
    first = {k: v[:4] for k, v in data.items()}
    out = predict(params, first["z"], first["pos"], first["mask"])
    out_rot = predict(params, first["z"], first["pos"] @ rot.T, first["mask"])
    assert jnp.allclose(out_rot, out @ rot.T, atol=1e-4), "the model is not equivariant"

    tx = optax.adam(args.lr)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, key, data, idx):
        batch = {k: v[idx] for k, v in data.items()}  # the whole split lives on the device
        noisy, cartesian = frad(key, batch)
        target = losses.denoising_target(cartesian, "tau", tau=TAU)  # ~N(0, 1) per axis

        def loss_fn(params):
            return losses.denoising_mse(predict(params, batch["z"], noisy, batch["mask"]),
                                        target, batch["mask"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    print(f"{num_molecules} molecules, {sum(x.size for x in jax.tree.leaves(params)):,} "
          f"parameters; predicting zero scores a loss of 1.0")
    rng = np.random.default_rng(args.seed)
    history, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = rng.choice(num_molecules, args.batch_size, replace=False)
        params, opt_state, loss = train_step(
            params, opt_state, jax.random.fold_in(noise_key, step), data, idx)
        history.append(float(loss))
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {history[-1]:.4f}  ({time.perf_counter() - start:.1f} s)")

    window = max(1, min(100, args.steps // 5))
    head, tail = np.mean(history[:window]), np.mean(history[-window:])
    print(f"mean loss: first {window} steps {head:.4f}, last {window} steps {tail:.4f} "
          f"({100 * (tail - head) / head:+.1f}%)")


if __name__ == "__main__":
    main()
