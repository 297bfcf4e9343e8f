"""Learning-rate schedules and the optimiser, from ``config.optim``."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def frad_cosine_schedule(lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """The official Frad/MolSpectra pre-training schedule (docs/spec/frad.md §2.9, quirk 21 of §7).

    ``lr (s+1)/W`` for ``s < W``; afterwards ``lr (1 + cos(pi s/T)) / (1 + cos(pi (W-1)/T))``,
    i.e. a cosine measured from step 0 (not from the end of warm-up), rescaled to be continuous
    at the switch, with no floor.
    """
    # Written out rather than with optax.linear_schedule, whose (init - end) * (1 - s/n) + end
    # form loses the tiny early learning rates to float32 cancellation.
    scale = 1.0 + jnp.cos(jnp.pi * (warmup_steps - 1) / total_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = lr * (step + 1.0) / warmup_steps
        cosine = lr * (1.0 + jnp.cos(jnp.pi * jnp.minimum(step, total_steps) / total_steps)) / scale
        return jnp.where(step < warmup_steps, warmup, cosine)

    return schedule


def make_schedule(optim, total_steps: int) -> optax.Schedule:
    if optim.schedule == "frad_cosine":
        return frad_cosine_schedule(optim.lr, optim.warmup_steps, total_steps)
    if optim.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, optim.lr, optim.warmup_steps, total_steps, end_value=0.0
        )
    if optim.schedule == "constant":
        return optax.constant_schedule(optim.lr)
    raise ValueError(
        f"unknown schedule {optim.schedule!r}; use 'frad_cosine', 'warmup_cosine' or 'constant'"
    )


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (optionally with global-norm clipping) and its schedule."""
    schedule = make_schedule(optim, total_steps)
    tx = optax.adamw(
        schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
    )
    if optim.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    return tx, schedule
