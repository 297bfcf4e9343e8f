"""Loss functions: pure, jit-able, documented, and independent of the rest of mspec.

This module imports only ``jax`` and ``jax.numpy`` so that other projects can copy or import it.
Every function takes arrays and masks and returns a scalar (or, for the running normaliser, a new
state); padding never contributes. Written over whole global batches (any leading axes, e.g. a
device axis ``[D, N, 3]``), the sums and counts are global, so under data parallelism with uneven
padding the result equals the single-device one (it is *not* a mean of per-device means).

Denoising target normalisation (see ``denoising_target``): the official Frad/MolSpectra code
normalises the noise target with running statistics accumulated over every training atom
("AccumulatedNormalization"); in pre-training that is about ``noise / tau``. Three modes:

* ``"tau"``     : target = noise / tau (deterministic; the default here),
* ``"running"`` : target = (noise - mean) / std from a running (sum, sum of squares, count)
                  state, updated with the batch *before* normalising, as the official code does,
* ``"none"``    : target = noise in Å.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _node_weights(node_mask: jax.Array) -> jax.Array:
    return node_mask.astype(jnp.float32)[..., None]


def denoising_mse(pred: jax.Array, target: jax.Array, node_mask: jax.Array) -> jax.Array:
    """Mean squared error over real atoms and the 3 axes.

    ``L = sum_{a real, c} (pred[a, c] - target[a, c])^2 / (3 * n_real)``, i.e. the mean over all
    real atoms of the batch (every atom weighs the same, as in the official code).

    Args:
      pred: ``[..., N, 3]`` predicted (normalised) noise.
      target: ``[..., N, 3]`` (normalised) noise target.
      node_mask: ``[..., N]`` True for real atoms.

    Returns:
      Scalar loss; 0 if the batch holds no real atom.
    """
    w = _node_weights(node_mask)
    sq = jnp.sum(w * jnp.square(pred - target))
    count = 3.0 * jnp.sum(w)
    return sq / jnp.maximum(count, 1.0)


class RunningStats(NamedTuple):
    """Running per-axis statistics of the denoising target (float32 ``[3]``, ``[3]``, ``[]``)."""

    total: jax.Array
    total_sq: jax.Array
    count: jax.Array


def running_stats_init() -> RunningStats:
    return RunningStats(jnp.zeros(3, jnp.float32), jnp.zeros(3, jnp.float32), jnp.zeros((), jnp.float32))


def running_stats_update(stats: RunningStats, target: jax.Array, node_mask: jax.Array) -> RunningStats:
    """Adds the real atoms of ``target [..., N, 3]`` to the running sums."""
    w = _node_weights(node_mask)
    flat_w = w.reshape(-1, 1)
    flat_t = target.reshape(-1, 3)
    return RunningStats(
        stats.total + jnp.sum(flat_w * flat_t, axis=0),
        stats.total_sq + jnp.sum(flat_w * jnp.square(flat_t), axis=0),
        stats.count + jnp.sum(flat_w),
    )


def running_stats_mean_std(stats: RunningStats) -> tuple[jax.Array, jax.Array]:
    """``mean = S/n``, ``std = sqrt(max(S2/n - mean^2, 0))`` clamped at 1e-8 (official code)."""
    n = jnp.maximum(stats.count, 1.0)
    mean = stats.total / n
    var = jnp.maximum(stats.total_sq / n - jnp.square(mean), 0.0)
    return mean, jnp.maximum(jnp.sqrt(var), 1e-8)


def denoising_target(
    noise: jax.Array,
    mode: str,
    tau: float | None = None,
    stats: RunningStats | None = None,
) -> jax.Array:
    """Normalises a noise target ``[..., 3]`` in Å (see the module docstring for the modes).

    Args:
      noise: the regression target in Å.
      mode: ``"tau"``, ``"running"`` or ``"none"``.
      tau: the Cartesian noise scale (mode ``"tau"``).
      stats: running statistics that already include this batch (mode ``"running"``).
    """
    if mode == "tau":
        if tau is None or tau <= 0:
            raise ValueError("mode 'tau' needs a positive tau")
        return noise / tau
    if mode == "running":
        if stats is None:
            raise ValueError("mode 'running' needs running statistics")
        mean, std = running_stats_mean_std(stats)
        return (noise - mean) / std
    if mode == "none":
        return noise
    raise ValueError(f"unknown denoising target normalisation {mode!r}; use 'tau', 'running' or 'none'")
