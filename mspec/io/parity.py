"""Comparing a converted model with torch's own outputs (a reference ``.npz``, no torch needed).

The reference layout is that of ``tests/data/golden_et/README.md`` (written by
``experiments/torch_reference.py`` for your own models): inputs ``z [A]``, ``pos [A, 3]``,
``batch [A]``, ``n_atoms [B]``, torch's ``edge_index [2, E]`` (row 0 source j, row 1 target i),
loss weights ``loss_c [B]``, ``loss_r [A, 3]``; float64 outputs ``x, vec, scalar, energy, noise,
forces, grad_pos, loss`` and ``grad/<torch parameter name>``; float32 outputs ``f32/<key>``.
The loss is ``L = sum_b loss_c[b] E_b + sum_i loss_r[i] . noise_i``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mspec.models import Model, molecule_property

OUTPUTS = ("x", "vec", "scalar", "energy", "noise", "forces", "grad_pos")


def rel_err(ours, ref) -> float:
    """``max |ours - ref| / max |ref|`` (shapes must agree)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape {ours.shape} vs reference {ref.shape}")
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def run_model(model_cfg: dict, params, ref, dtype, message_passing: str = "xla",
              standardization: dict | None = None) -> dict:
    """mspec's outputs, forces and gradients of the reference loss, on torch's own edge list.

    Returns ``x [A, F], vec [A, 3, F], scalar [A], noise [A, 3], energy [B], loss [],
    grad_pos [A, 3], forces [A, 3], grad_params`` (the mspec tree). Call under
    ``jax.enable_x64(True)`` for float64. ``energy = std sum_i h_i + sum_i atomref[z_i] + mean``
    (:func:`mspec.models.molecule_property`; a converted Atomref table is the model's prior).
    """
    std = standardization or {"mean": 0.0, "std": 1.0}
    if "scalar" not in model_cfg["heads"]:
        raise ValueError(f"parity runs compare the scalar head's energy; this model has heads "
                         f"{tuple(model_cfg['heads'])}")
    model = Model(**model_cfg, message_passing=message_passing)
    n_mol = len(ref["n_atoms"])
    mol = jnp.asarray(ref["batch"], jnp.int32)
    z = jnp.asarray(ref["z"], jnp.int32)
    batch = dict(
        atomic_numbers=z,
        senders=jnp.asarray(ref["edge_index"][0], jnp.int32),
        receivers=jnp.asarray(ref["edge_index"][1], jnp.int32),
        edge_mask=jnp.ones(ref["edge_index"].shape[1], bool),
        node_mask=jnp.ones(len(ref["z"]), bool),
        node_graph=mol,
        graph_mask=jnp.ones(n_mol, bool),
    )
    c, r = jnp.asarray(ref["loss_c"], dtype), jnp.asarray(ref["loss_r"], dtype)

    def forward(p, pos):
        out = model.apply({"params": p}, {**batch, "positions": pos})
        readout = {k: out[k] for k in ("scalar", "prior") if k in out}
        return out, molecule_property(readout, mol, n_mol, std["std"]) + std["mean"]

    def loss(p, pos):
        out, energy = forward(p, pos)
        return jnp.sum(c * energy) + jnp.sum(r * out["noise"]), (out, energy)

    @jax.jit
    def everything(p, pos):
        (value, (out, energy)), (g_params, g_pos) = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True)(p, pos)
        forces = -jax.grad(lambda q: jnp.sum(forward(p, q)[1]))(pos)
        return dict(x=out["node_features"], vec=out["vectors"], scalar=out["scalar"],
                    noise=out["noise"], energy=energy, loss=value, grad_pos=g_pos,
                    forces=forces, grad_params=g_params)

    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    return jax.device_get(everything(params, jnp.asarray(ref["pos"], dtype)))


def compare(converted, ref, *, grads_tree=None) -> dict[str, float]:
    """Relative errors of a converted model against a reference: ``{"float64 <key>": err,
    "float32 <key>": err, "float64 grad<path>": err}`` (float32 only where ``f32/<key>`` exists;
    gradients where ``grads_tree``, the reference's ``grad/*`` mapped to the mspec tree, is given;
    an all-zero reference gradient must be exactly zero, else its error is ``inf``).
    """
    keys = [k for k in OUTPUTS + ("loss",) if k in ref]
    with jax.enable_x64(True):
        ours = run_model(converted.model, converted.params, ref, jnp.float64, "xla",
                         converted.standardization)
    errors = {f"float64 {k}": rel_err(ours[k], ref[k]) for k in keys}
    if grads_tree is not None:
        mine = dict(jax.tree_util.tree_flatten_with_path(ours["grad_params"])[0])
        for path, g in jax.tree_util.tree_flatten_with_path(grads_tree)[0]:
            name = "float64 grad" + jax.tree_util.keystr(path)
            if not np.any(g):
                errors[name] = 0.0 if not np.any(mine[path]) else float("inf")
            else:
                errors[name] = rel_err(mine[path], g)
    f32 = [k for k in OUTPUTS if f"f32/{k}" in ref]
    if f32:
        ours32 = run_model(converted.model, converted.params, ref, jnp.float32, "xla",
                           converted.standardization)
        errors.update({f"float32 {k}": rel_err(ours32[k], ref[f"f32/{k}"]) for k in f32})
    return errors
