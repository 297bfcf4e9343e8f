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


PROPERTY_LOSSES = ("mse", "smooth_l1")


def _elementwise(kind: str, err: jax.Array) -> jax.Array:
    """``err**2`` (``"mse"``) or smooth L1 with beta = 1 (``"smooth_l1"``: torch's
    ``smooth_l1_loss``, the Huber loss with delta = 1), elementwise."""
    if kind == "mse":
        return jnp.square(err)
    if kind == "smooth_l1":
        abs_err = jnp.abs(err)
        quadratic = jnp.minimum(abs_err, 1.0)
        return 0.5 * quadratic**2 + (abs_err - quadratic)
    raise ValueError(f"unknown loss kind {kind!r}; use one of {PROPERTY_LOSSES}")


def property_loss(pred: jax.Array, target: jax.Array, graph_mask: jax.Array, kind: str = "mse") -> jax.Array:
    """Molecule-level regression loss, averaged over real molecules.

    Args:
        pred, target: ``[..., G]`` per-molecule predictions and labels (e.g. ``[D, G]``).
        graph_mask: ``[..., G]`` bool, True for real molecules.
        kind: ``"mse"`` or ``"smooth_l1"`` (beta = 1).

    Returns:
        Scalar: sum over real molecules / their global count (0 if there are none).
    """
    w = graph_mask.astype(jnp.float32)
    return jnp.sum(w * _elementwise(kind, pred - target)) / jnp.maximum(jnp.sum(w), 1.0)


def force_loss(pred: jax.Array, target: jax.Array, node_mask: jax.Array, kind: str = "mse") -> jax.Array:
    """Per-component force loss, averaged over the 3 components of every real atom.

    Args:
        pred, target: ``[..., N, 3]`` forces.
        node_mask: ``[..., N]`` bool, True for real atoms.
        kind: ``"mse"`` or ``"smooth_l1"`` (beta = 1).

    Returns:
        Scalar: sum over real atoms and components / (3 x their global count).
    """
    w = node_mask.astype(jnp.float32)
    return jnp.sum(w[..., None] * _elementwise(kind, pred - target)) / jnp.maximum(3.0 * jnp.sum(w), 1.0)


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
      tau: the Cartesian noise scale (mode ``"tau"``): a number, or a traced scalar (e.g. a
        scheduled scale inside ``jit``; then its sign is the caller's to guarantee).
      stats: running statistics that already include this batch (mode ``"running"``).
    """
    if mode == "tau":
        if tau is None or (not isinstance(tau, jax.core.Tracer) and not float(tau) > 0):
            raise ValueError(f"mode 'tau' needs a positive tau, got {tau!r}")
        return noise / tau
    if mode == "running":
        if stats is None:
            raise ValueError("mode 'running' needs running statistics")
        mean, std = running_stats_mean_std(stats)
        return (noise - mean) / std
    if mode == "none":
        return noise
    raise ValueError(f"unknown denoising target normalisation {mode!r}; use 'tau', 'running' or 'none'")


# --------------------------------------------------------------------------------------------------
# MolSpectra: masked-patch reconstruction and 3D -> spectrum InfoNCE
# --------------------------------------------------------------------------------------------------


def masked_patch_mse(
    pred: jax.Array, target: jax.Array, patch_mask: jax.Array, graph_mask: jax.Array
) -> jax.Array:
    """Per-patch MSE averaged over the masked patches of real molecules (one spectrum type).

    ``l = sum_{b,n} m_bn g_b mean_p (pred_bnp - target_bnp)^2 / sum_{b,n} m_bn g_b`` (spec §5.2),
    with ``m`` the patch mask (True = masked) and ``g`` the molecule mask. Unmasked patches and
    padding slots do not contribute. MolSpectra's L_MPR is the *sum* of this over the types.

    Args:
      pred: ``[..., G, n, P]`` reconstructed patches.
      target: ``[..., G, n, P]`` normalised, unmasked patches.
      patch_mask: ``[..., G, n]`` bool, True for masked patches.
      graph_mask: ``[..., G]`` bool, True for real molecules.

    Returns:
      Scalar loss; 0 if no patch is masked.
    """
    w = (patch_mask & graph_mask[..., None]).astype(jnp.float32)  # [..., G, n]
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)  # [..., G, n]
    return jnp.sum(w * per_patch) / jnp.maximum(jnp.sum(w), 1.0)


def cosine_similarity_matrix(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``c_ij = a_i . b_j / (max(|a_i|, eps) max(|b_j|, eps))`` for ``a [B, D]``, ``b [B', D]``.

    The per-vector clamp at ``eps`` matches ``torch.nn.functional.cosine_similarity`` (recent
    versions); a zero vector (e.g. a padding slot) gives similarity 0, and a zero gradient rather
    than NaN (``jnp.linalg.norm`` has a NaN gradient at 0).
    """

    def safe_norm(x):
        sq = jnp.sum(x * x, axis=-1, keepdims=True)
        pos = sq > 0
        return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)

    an = a / jnp.maximum(safe_norm(a), eps)
    bn = b / jnp.maximum(safe_norm(b), eps)
    return an @ bn.T


def info_nce(
    mol: jax.Array,
    spec: jax.Array,
    graph_mask: jax.Array,
    temperature: float | jax.Array = 0.07,
    symmetric: bool = False,
) -> jax.Array:
    """InfoNCE between 3D molecule features and spectrum embeddings, padding slots excluded.

    With ``c_ij`` the cosine similarity of ``mol_i`` and ``spec_j`` over the ``B`` real molecules,
    the paper's one-directional (3D -> spectrum) loss is (spec §5.3)::

        L = (1/B) sum_i [ -c_ii / tau + log sum_j exp(c_ij / tau) ]

    (molecule rows against spectrum columns; the negatives of row i are the other real spectra).
    ``symmetric=True`` averages it with the spectrum -> 3D direction (columns against rows), as in
    CLIP. Padding slots are removed from both rows and columns, so the result does not depend on
    how many padding slots there are or what they hold.

    Args:
      mol: ``[..., G, D]`` molecule features (any leading axes, e.g. devices; flattened).
      spec: ``[..., G, D]`` spectrum embeddings of the same slots.
      graph_mask: ``[..., G]`` bool, True for real molecules.
      temperature: ``tau`` (a float, or a traced scalar when it is learned).
      symmetric: average both directions.

    Returns:
      Scalar loss; 0 if the batch holds no real molecule.
    """
    d = mol.shape[-1]
    mol = mol.reshape(-1, d)
    spec = spec.reshape(-1, d)
    valid = graph_mask.reshape(-1)
    logits = cosine_similarity_matrix(mol, spec) / temperature  # [B, B]
    pair = valid[:, None] & valid[None, :]
    masked = jnp.where(pair, logits, -jnp.inf)
    diag = jnp.diagonal(logits)
    count = jnp.maximum(jnp.sum(valid), 1)

    def direction(lg):
        # Rows of padding slots are all -inf: replace by 0 before the logsumexp, then drop them.
        lse = jax.nn.logsumexp(jnp.where(valid[:, None], lg, 0.0), axis=-1)
        return jnp.sum(jnp.where(valid, lse - diag, 0.0)) / count

    loss = direction(masked)
    if symmetric:
        loss = 0.5 * (loss + direction(masked.T))
    return loss


def retrieval_hits(
    mol: jax.Array, spec: jax.Array, graph_mask: jax.Array, ks: tuple[int, ...] = (1, 5)
) -> dict[int, jax.Array]:
    """3D -> spectrum retrieval: for each real molecule, is its own spectrum among the top k?

    The candidates are the spectra of the real molecules of the same batch, ranked by cosine
    similarity to the molecule's 3D feature. A tie with the correct spectrum counts as a miss.

    Args:
      mol: ``[..., G, D]`` molecule features.
      spec: ``[..., G, D]`` spectrum embeddings.
      graph_mask: ``[..., G]`` bool.
      ks: the k of each top-k.

    Returns:
      ``{k: [B_slots] bool}`` (False for padding slots), flattened over the leading axes.
    """
    d = mol.shape[-1]
    valid = graph_mask.reshape(-1)
    sim = cosine_similarity_matrix(mol.reshape(-1, d), spec.reshape(-1, d))
    sim = jnp.where(valid[None, :], sim, -jnp.inf)
    own = jnp.diagonal(sim)
    # Rank of the correct spectrum = number of candidates at least as similar, excluding itself.
    better = jnp.sum((sim >= own[:, None]) & valid[None, :], axis=-1) - 1
    return {k: valid & (better < k) for k in ks}
