"""The pieces every task's jitted update shares: the step's random key, gradients accumulated
over micro-batches, and the optimiser step with its logged norms.

A trainer's ``_update(state, batch)`` is then its loss (what the task computes) between
:func:`step_key` and :func:`apply_gradients`; denoising pre-training, MolSpectra stage 2 and
fine-tuning all update this way, so a change to how parameters move is made once.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The random key of training step ``step`` of a run seeded ``seed``: a function of the two
    only, so a resumed run draws the same noise and masks as an uninterrupted one."""
    return jax.random.fold_in(jax.random.key(seed), step)


def accumulated_value_and_grad(
    loss_fn: Callable[[Any, jax.Array, dict], tuple[jax.Array, Any]],
    params,
    rng: jax.Array,
    batches: dict,
    shares: jax.Array,
) -> tuple[tuple[jax.Array, Any], Any]:
    """``((Σ_k s_k L_k, Σ_k s_k aux_k), Σ_k s_k ∇L_k)`` over ``K`` sub-batches, in a ``lax.scan``.

    Args:
      loss_fn: ``(params, key, sub_batch) -> (loss, aux)``, ``aux`` a pytree of scalars.
      rng: split into one key per sub-batch.
      batches: every leaf ``[K, ...]``.
      shares: ``[K]`` weights (each sub-batch's share of the step's atoms, so the result is the
        loss and gradient of one batch holding all K sub-batches); only one sub-batch's
        activations are alive at a time.
    """
    keys = jax.random.split(rng, shares.shape[0])

    def weighted(p, key, sub, share):
        loss, aux = loss_fn(p, key, sub)
        return share * loss, jax.tree.map(lambda a: share * a, aux)

    def accumulate(carry, xs):
        (loss, aux), grads = jax.value_and_grad(weighted, has_aux=True)(params, *xs)
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    first = jax.tree.map(lambda x: x[0], (keys, batches, shares))
    shapes = jax.eval_shape(lambda: jax.value_and_grad(weighted, has_aux=True)(params, *first))
    (loss_shape, aux_shape), grad_shape = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, aux_shape, grad_shape))
    (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, (keys, batches, shares))
    return (loss, aux), grads


def apply_gradients(
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    state: dict,
    grads,
    lr_scale: jax.Array | None = None,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One optimiser step on ``state["params"]``/``state["opt"]``.

    Args:
      lr_scale: multiplies the update (fine-tuning's ReduceLROnPlateau factor; Adam's update is
        linear in the learning rate), or None.

    Returns:
      ``(params, opt_state, measurements)`` with the learning rate of this step and the global
      norms of the gradients, the new parameters and the update.
    """
    updates, opt = tx.update(grads, state["opt"], state["params"])
    lr = schedule(state["step"])
    if lr_scale is not None:
        updates = jax.tree.map(lambda u: u * lr_scale, updates)
        lr = lr * lr_scale
    params = optax.apply_updates(state["params"], updates)
    return params, opt, {
        "lr": lr,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates),
    }


def update(trainer, state: dict, batch: dict) -> tuple[dict, dict]:
    """The training step, the same for every trainer: the step's key, the trainer's loss and
    gradients, the optimiser step, the next state. ``trainer.update_fn`` is this, jitted.

    What the trainer provides: ``config.seed``, ``tx``, ``schedule``, a ``traces`` counter and
    ``objective_and_grads(state, rng, batch) -> ((loss, (measurements, carried)), grads)``, where
    ``measurements`` are logged and ``carried`` holds the state entries other than parameters
    that the step moves on (running target statistics, BatchNorm statistics, the energy EMA).
    A ``state["lr_scale"]`` (fine-tuning's ReduceLROnPlateau factor) scales the update; every
    other state entry is carried over unchanged.

    Returns:
      ``(new_state, measurements)``: ``loss``, the trainer's measurements, ``lr`` and the norms.
    """
    trainer.traces += 1  # runs at trace time only: counts compilations of the step
    rng = step_key(trainer.config.seed, state["step"])
    (loss, (measurements, carried)), grads = trainer.objective_and_grads(state, rng, batch)
    params, opt, norms = apply_gradients(trainer.tx, trainer.schedule, state, grads,
                                         lr_scale=state.get("lr_scale"))
    new_state = {**state, **carried, "params": params, "opt": opt, "step": state["step"] + 1}
    return new_state, {"loss": loss, **measurements, **norms}
