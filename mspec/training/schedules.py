"""Learning-rate schedules and the optimiser (AdamW), from ``config.optim``, for every task.

* :func:`frad_cosine_schedule`: the official Frad / MolSpectra pre-training schedule;
  ``warmup_cosine`` and ``constant`` from optax.
* :func:`cosine_restarts`: the official QM9 fine-tuning schedule (MolSpectra's "cosine_warmup"),
  i.e. PyTorch ``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`` stepped per update, with
  the first ``warmup`` steps overridden by a linear warm-up.
* :class:`Plateau`: ``ReduceLROnPlateau`` (MD17 fine-tuning) as a host-side controller of a
  learning-rate multiplier kept in the train state (so it is checkpointed and resumes exactly).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax


# The schedules pre-training runs; fine-tuning also has "cosine_restarts" and "plateau" (whose
# controller, :class:`Plateau`, runs on fine-tuning's validations).
PRETRAINING_SCHEDULES = ("frad_cosine", "warmup_cosine", "constant")
SCHEDULES = (*PRETRAINING_SCHEDULES, "cosine_restarts", "plateau")


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


def cosine_restarts(
    lr: float, warmup_steps: int, period: int, period_mult: int = 2, lr_min: float = 1e-7
) -> optax.Schedule:
    """Linear warm-up, then cosine annealing with warm restarts, measured from step 0.

    For step ``g >= warmup_steps``, in cycle ``k`` (start ``s_k = T0 (m^k - 1)/(m - 1)``, length
    ``T_k = T0 m^k``): ``lr(g) = lr_min + (lr - lr_min) (1 + cos(pi (g - s_k) / T_k)) / 2``. For
    ``g < warmup_steps``: ``lr (g + 1) / warmup_steps`` (the official override). With
    ``T0 = 100k`` and ``m = 2`` the restarts are at 100k and 300k and the third cycle ends at 700k.
    """
    if period <= 0 or period_mult < 1:
        raise ValueError(f"need period > 0 and period_mult >= 1, got {period}, {period_mult}")

    # Cycle starts s_k (enough cycles for any realistic run; float32 is exact for these integers).
    starts, lengths, s, t = [], [], 0, period
    while s < 2**31 and len(starts) < 64:
        starts.append(s)
        lengths.append(t)
        s, t = s + t, t * period_mult
    starts_arr = jnp.asarray(starts, jnp.float32)
    lengths_arr = jnp.asarray(lengths, jnp.float32)

    def schedule(step):
        g = jnp.asarray(step, jnp.float32)
        k = jnp.sum(g >= starts_arr[1:])
        start, length = starts_arr[k], lengths_arr[k]
        cosine = lr_min + (lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * (g - start) / length))
        warm = lr * (g + 1.0) / max(warmup_steps, 1)
        return jnp.where(g < warmup_steps, warm, cosine)

    return schedule


def warmup_constant(lr: float, warmup_steps: int) -> optax.Schedule:
    """``lr (g + 1) / W`` for ``g < W``, then ``lr`` (the base for :class:`Plateau`)."""

    def schedule(step):
        g = jnp.asarray(step, jnp.float32)
        return jnp.where(g < warmup_steps, lr * (g + 1.0) / max(warmup_steps, 1), lr)

    return schedule


def make_schedule(optim, total_steps: int) -> optax.Schedule:
    """The schedule ``optim.schedule`` names (one of :data:`SCHEDULES`)."""
    if optim.schedule == "frad_cosine":
        return frad_cosine_schedule(optim.lr, optim.warmup_steps, total_steps)
    if optim.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, optim.lr, optim.warmup_steps, total_steps, end_value=0.0
        )
    if optim.schedule == "constant":
        return optax.constant_schedule(optim.lr)
    if optim.schedule == "cosine_restarts":
        return cosine_restarts(optim.lr, optim.warmup_steps, optim.restart_period,
                               optim.restart_mult, optim.lr_min)
    if optim.schedule == "plateau":
        return warmup_constant(optim.lr, optim.warmup_steps)
    raise ValueError(f"unknown schedule {optim.schedule!r}; use one of {SCHEDULES}")


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (weight decay 0 = Adam in the official recipes; optionally with global-norm
    clipping) and its schedule."""
    schedule = make_schedule(optim, total_steps)
    tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    return tx, schedule


@dataclasses.dataclass(frozen=True)
class Plateau:
    """PyTorch ``ReduceLROnPlateau(mode="min", threshold_mode="rel", cooldown=0)``.

    The state ``(lr_scale, best, bad_evals)`` lives in the train state; :meth:`update` is called on
    the host after each validation with the validation metric. Because Adam's update is linear in
    the learning rate, scaling the update by ``lr_scale`` equals scaling the learning rate.
    """

    factor: float = 0.8
    patience: int = 30  # validations without improvement before a reduction
    threshold: float = 1e-4
    lr_min: float = 1e-7
    base_lr: float = 5e-4

    def update(self, lr_scale: float, best: float, bad: int, value: float) -> tuple[float, float, int]:
        if value < best * (1.0 - self.threshold):
            return lr_scale, value, 0
        bad += 1
        if bad > self.patience:
            lr_scale = max(lr_scale * self.factor, self.lr_min / self.base_lr)
            bad = 0
        return lr_scale, best, bad
