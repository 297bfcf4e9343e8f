"""TorchMD-Net Equivariant Transformer (ET) encoder, as used by Frad and MolSpectra.

Written from ``docs/spec/et.md`` (both variants, §1).

Notation: N atoms, E directed edges, F hidden width, H heads, D = F / H head width, K radial basis
functions. Edges are directed ``j -> i`` with ``j = senders[e]`` (source) and ``i = receivers[e]``
(target); messages are summed at the target with ``jax.ops.segment_sum``.

Scalar features are ``x [N, F]``; vector features are ``vec [N, 3, F]`` (spatial axis before the
channel axis, as in torchmd-net), so every Linear acts on the last (channel) axis and commutes with
rotations of the spatial axis.

Padding and masking contract (see :mod:`mspec.types`):

* An edge is *active* iff ``edge_mask`` is True **and** its length is below the cutoff. The pipeline
  builds edges with a skin beyond the cutoff, so the model applies the cutoff itself.
* Inactive edges contribute exactly 0 to every message: the messages are multiplied by the mask,
  because neither the cosine cutoff (which does not touch the vector messages) nor the RBF (whose
  ``SiLU(bias)`` terms are non-zero even for a zero basis) would zero them.
* Self-loops (and any zero-length edge, e.g. padding self-loops at the origin) get ``r = 0`` and a
  zero unit vector through a "double where", so no NaN reaches any gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mspec import graph
from mspec.kernels import eqln as kernel_eqln
from mspec.kernels import message as kernel_message
from mspec.models import precision
from mspec.models.precision import gather_rows, in_dtype, sum_dtype

Array = jax.Array

# PyTorch semantics for every Linear of the ET, the neighbour embedding and the heads
# (docs/spec/et.md §10): Xavier-uniform weights (gain 1) and zero biases. Flax's default
# LeCun-normal differs, so the initialisers are always passed explicitly.
xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
# nn.Embedding in torch is N(0, 1).
normal_embedding = nn.initializers.normal(stddev=1.0)

INTERLAYER_NORMS = ("none", "affine", "shared_noaffine")
VECTOR_NORMS = ("whitened", "none")


def dense(
    features: int, *, use_bias: bool = True, dtype: Any = None, name: str | None = None
) -> nn.Dense:
    """A torch-initialised ``nn.Linear``: Xavier-uniform kernel, zero bias.

    ``dtype`` is Flax's compute dtype (None: the inputs' and parameters' own), see
    :class:`mspec.models.precision.Dense`.
    """
    return precision.Dense(
        features,
        use_bias=use_bias,
        kernel_init=xavier_uniform,
        bias_init=zeros,
        dtype=dtype,
        name=name,
    )


def embed(num: int, features: int, name: str) -> nn.Embed:
    """``torch.nn.Embedding(num, features)``: N(0, 1) rows. Looked up in float32 whatever the
    compute dtype (the callers cast): the table's gradient sums over every atom of an element."""
    return nn.Embed(num, features, embedding_init=normal_embedding, name=name)


def layer_norm(*, affine: bool = True, name: str | None = None) -> nn.LayerNorm:
    """``torch.nn.LayerNorm(F, eps=1e-5)``; weight 1, bias 0.

    ``use_fast_variance=False`` computes ``E[(x - mean)^2]`` like torch, rather than
    ``E[x^2] - mean^2``, which loses precision in float32.
    """
    return nn.LayerNorm(
        epsilon=1e-5,
        use_scale=affine,
        use_bias=affine,
        use_fast_variance=False,
        name=name,
    )


# -------------------------------------------------------------------------------------------------
# Radial features
# -------------------------------------------------------------------------------------------------


def cosine_cutoff(r: Array, cutoff: float) -> Array:
    """Cosine cutoff ``C(r) = 0.5 (cos(pi r / r_c) + 1)`` for ``r < r_c``, else 0.

    Args:
        r: distances, any shape ``[...]``.
        cutoff: the upper cutoff ``r_c`` in Å (the lower cutoff is 0).

    Returns:
        ``[...]`` values in [0, 1]; ``C(0) = 1``.
    """
    c = 0.5 * (jnp.cos(r * (math.pi / cutoff)) + 1.0)
    return jnp.where(r < cutoff, c, 0.0)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, bitwise.

    ATen's CPU kernel (``linspace_kernel`` in ``aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp``)
    rounds ``start`` and ``end`` to float32, takes ``step = (end - start) / (steps - 1)`` in float32
    and fills the first half from the start and the second half from the end::

        out[i] = start + step * i                    for i <  steps // 2
        out[i] = end - step * (steps - 1 - i)        for i >= steps // 2

    ``jnp.linspace`` (and ``np.linspace``) interpolate from the start only and land 1-2 ulp lower
    on most values, which moves float64 outputs of the ET by ~1e-6 relative. The product and the
    sum are computed in float64, where they are exact for the magnitudes of the RBF means (both
    terms have 24 significant bits and span under 53 bits together), so the one rounding to
    float32 equals a fused multiply-add; this matches torch's stored buffers bitwise
    (``tests/test_golden_et.py``).

    Args:
        start: first value (rounded to float32 first, as the Scalar is).
        end: last value.
        steps: number of values (>= 1).

    Returns:
        ``[steps]`` float32.
    """
    st, en = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([st], np.float32)
    step = np.float64((en - st) / np.float32(steps - 1))  # float32 arithmetic, as ATen
    i = np.arange(steps, dtype=np.float64)
    forward = np.float64(st) + step * i
    backward = np.float64(en) - step * (steps - 1 - i)
    return np.where(i < steps // 2, forward, backward).astype(np.float32)


def expnorm_rbf_params(num_rbf: int, cutoff: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The fixed (non-trainable) constants of the ExpNormal RBF, as torchmd-net stores them.

    torchmd-net's ``ExpNormalSmearing`` takes ``start = exp(-(cutoff_upper - cutoff_lower))`` as a
    float32 scalar, ``means = torch.linspace(start, 1, K)`` and
    ``betas = (2 / K (1 - start))^-2`` (in float32); ``alpha = 5 / (cutoff_upper - cutoff_lower)``. With the
    lower cutoff 0 and ``cutoff = 5`` Å, ``start = e^-5`` and ``alpha = 1``; for other cutoffs the
    basis does not start at ``exp(-alpha cutoff)`` (a torchmd-net quirk kept for parity).

    Args:
        num_rbf: number K of basis functions.
        cutoff: upper cutoff in Å (lower cutoff 0).

    Returns:
        ``(means [K] float32, betas [K] float32, alpha)``: ``betas`` is 1037.94 for K = 64 and
        259.485 for K = 32 (cutoff 5 Å); ``means`` equal ``torch.linspace`` bitwise
        (:func:`torch_linspace_f32`).
    """
    alpha = 5.0 / cutoff
    start = np.float32(math.exp(-cutoff))  # torch.exp(torch.scalar_tensor(-cutoff)), float32
    means = torch_linspace_f32(start, 1.0, num_rbf)
    # float32 tensor arithmetic, and ATen's pow(x, -2) is 1 / (x * x).
    width = np.float32(2.0 / num_rbf) * (np.float32(1.0) - start)
    betas = np.full((num_rbf,), np.float32(1.0) / (width * width), dtype=np.float32)
    return means, betas, alpha


def expnorm_rbf(r: Array, num_rbf: int, cutoff: float) -> Array:
    """ExpNormal radial basis ``f_k(r) = C(r) exp(-beta_k (exp(-alpha r) - mu_k)^2)``.

    The cutoff is built into the basis (and the neighbour embedding applies it once more, as in
    torchmd-net). A self-loop (``r = 0``) peaks in the last basis function.

    Args:
        r: distances ``[E]`` in Å.
        num_rbf: number K of basis functions.
        cutoff: upper cutoff in Å.

    Returns:
        ``[E, K]`` basis values.
    """
    means, betas, alpha = expnorm_rbf_params(num_rbf, cutoff)
    r = r[..., None]
    return cosine_cutoff(r, cutoff) * jnp.exp(-betas * (jnp.exp(-alpha * r) - means) ** 2)


def edge_geometry(positions: Array, senders: Array, receivers: Array) -> tuple[Array, Array, Array]:
    """Edge lengths and unit vectors with NaN-free gradients at zero length.

    Args:
        positions: ``[N, 3]`` coordinates.
        senders: ``[E]`` source atoms j.
        receivers: ``[E]`` target atoms i.

    Returns:
        ``(r [E], unit [E, 3], nonzero [E] bool)``. The edge vector is ``pos[j] - pos[i]`` (source
        minus target). Zero-length edges (self-loops, padding self-loops) get ``r = 0`` and
        ``unit = 0``; the "double where" feeds a safe value into ``sqrt`` so that the gradient of
        the discarded branch is finite and multiplied by 0 instead of producing ``0 * inf``.
    """
    rel = positions[senders] - positions[receivers]  # [E, 3]
    r2 = jnp.sum(rel * rel, axis=-1)  # [E]
    nonzero = (senders != receivers) & (r2 > 0.0)
    safe_r2 = jnp.where(nonzero, r2, 1.0)
    safe_r = jnp.sqrt(safe_r2)
    r = jnp.where(nonzero, safe_r, 0.0)
    unit = jnp.where(nonzero[:, None], rel / safe_r[:, None], 0.0)
    return r, unit, nonzero


# -------------------------------------------------------------------------------------------------
# Equivariant (whitened) vector layer norm
# -------------------------------------------------------------------------------------------------

# Added to the singular values inside the inverse square root (docs/spec/et.md §6, EqLN step 4).
_EQLN_ROOT_EPS = 1e-5
# Regulariser of the 3x3 covariance: 1e-5 * diag(1, 2, 3) (docs/spec/et.md §6, EqLN step 3).
_EQLN_COV_EPS = 1e-5


@jax.custom_jvp
def _inv_sqrt_psd(cov: Array) -> Array:
    """``Q diag(1 / sqrt(s + 1e-5)) Q^T`` for symmetric PSD ``cov [..., 3, 3]`` via ``eigh``.

    The eigenvalues are clamped at 0 because torch uses an SVD, whose singular values of a PSD
    matrix are the (non-negative) eigenvalues; the clamp only matters for round-off.
    """
    w, q = jnp.linalg.eigh(cov)
    f = jax.lax.rsqrt(jnp.maximum(w, 0.0) + _EQLN_ROOT_EPS)
    return jnp.einsum("...ik,...k,...jk->...ij", q, f, q)


@_inv_sqrt_psd.defjvp
def _inv_sqrt_psd_jvp(primals, tangents):
    """Daleckii-Krein derivative of the matrix function ``g(C) = (C + eps)^-1/2``.

    ``dg = Q (L o (Q^T dC Q)) Q^T`` with the divided differences
    ``L_ab = (f_a - f_b) / (w_a - w_b) = -f_a f_b / (sqrt(w_a + eps) + sqrt(w_b + eps))``,
    whose closed form is also the correct limit ``f'(w)`` on the diagonal. Unlike the gradient
    through the eigenvectors of ``eigh`` (and torch's SVD), this has no ``1 / (w_a - w_b)`` term, so
    it stays finite when eigenvalues are (near-)degenerate; elsewhere it is the same derivative.
    """
    (cov,), (dcov,) = primals, tangents
    w, q = jnp.linalg.eigh(cov)
    a = jnp.maximum(w, 0.0) + _EQLN_ROOT_EPS  # [..., 3]
    sqrt_a = jnp.sqrt(a)
    f = 1.0 / sqrt_a
    out = jnp.einsum("...ik,...k,...jk->...ij", q, f, q)
    divided = -(f[..., :, None] * f[..., None, :]) / (sqrt_a[..., :, None] + sqrt_a[..., None, :])
    dcov = 0.5 * (dcov + jnp.swapaxes(dcov, -1, -2))  # eigh assumes a symmetric input
    dcov_eig = jnp.einsum("...ki,...kl,...lj->...ij", q, dcov, q)  # Q^T dC Q
    dout = jnp.einsum("...ik,...kl,...jl->...ij", q, divided * dcov_eig, q)
    return out, dout


def _eqln_compute_dtype() -> jnp.dtype:
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


class EquivariantLayerNorm(nn.Module):
    """Whitened equivariant layer norm of vector features (``layernorm_on_vec = "whitened"``).

    For each atom, with ``V [3, F]``:

    1. centre over channels: ``V <- V - mean_F(V)`` (removes the mean 3-vector);
    2. covariance ``C = (1/F) V V^T + 1e-5 diag(1, 2, 3)``;
    3. ``C^-1/2 = Q diag(1 / sqrt(s + 1e-5)) Q^T`` from ``jnp.linalg.eigh`` (torch uses an SVD,
       identical for this symmetric positive-definite matrix; its rank filter never triggers);
    4. output ``w * (C^-1/2 V)`` with a per-channel weight ``w [F]`` (init 1) and no bias.

    Deviations from the torch code:

    * **Precision.** Torch casts to float64. Here the computation runs in float64 only when
      ``jax_enable_x64`` is on and in float32 otherwise (JAX would silently downcast anyway). In
      float32 the whitening of a direction with a tiny eigenvalue amplifies round-off by about
      ``1 / sqrt(1e-5) ~ 300``.
    * **Gradient.** The inverse square root has a custom JVP (Daleckii-Krein), which equals the
      eigendecomposition gradient wherever that is finite but stays finite for degenerate
      eigenvalues, where torch's SVD gradient blows up. The forward pass is unchanged.

    Note that the ``diag(1, 2, 3)`` regulariser is fixed in the lab frame, so the layer (like the
    torch original) is equivariant only up to ``O(1e-5 / lambda)`` for covariance eigenvalues
    ``lambda``; for planar or rank-deficient ``V`` the error is ``O(sqrt(1e-5))``. At
    initialisation the ET's vector features are small (eigenvalues 1e-5 .. 1e-2), so a freshly
    initialised model with EqLN is rotation-equivariant only to ~1e-3 (scalars) .. ~1e-2
    (vectors), relative. With the regulariser set to 0 the error is float32 round-off (~1e-6).

    All-zero ``V`` (padding atoms, first-layer vectors) gives ``C = 1e-5 diag(1, 2, 3)``, a
    well-conditioned matrix, so the output is 0 and every gradient is finite.
    """

    @nn.compact
    def __call__(self, vec: Array, implementation: str = "xla") -> Array:
        """Whiten vector features.

        Args:
            vec: ``[N, 3, F]`` vector features.
            implementation: ``"xla"`` (the definition), or ``"fused"``: the ``[N, 3, F]`` steps
                (covariance, whitening and weight) as the CPU kernels of
                :mod:`mspec.kernels.eqln` when the computation is in float32; the same values to
                float rounding.

        Returns:
            ``[N, 3, F]`` whitened features, in the input dtype.
        """
        features = vec.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (features,), jnp.float32)
        use_kernels = implementation == "fused" and _eqln_compute_dtype() == jnp.float32 and vec.dtype == jnp.float32
        if use_kernels:
            cov = kernel_eqln.eqln_covariance(vec)
        else:
            v = vec.astype(_eqln_compute_dtype())
            v = v - jnp.mean(v, axis=-1, keepdims=True)
            cov = jnp.einsum("nif,njf->nij", v, v) / features  # [N, 3, 3]
        cov = cov + _EQLN_COV_EPS * jnp.diag(jnp.array([1.0, 2.0, 3.0], dtype=cov.dtype))
        whiten = _inv_sqrt_psd(cov)
        if use_kernels:
            return kernel_eqln.eqln_apply(vec, whiten, weight)
        out = jnp.einsum("nij,njf->nif", whiten, v)
        return out.astype(vec.dtype) * weight.astype(vec.dtype)


# -------------------------------------------------------------------------------------------------
# Embedding and attention
# -------------------------------------------------------------------------------------------------


def message_passing_xla(q, k, u, vec, dk, dv, unit, cut, mask, senders, receivers, heads: int):
    """One attention layer's message passing with XLA gathers and segment sums: the definition
    (:mod:`mspec.kernels.message` computes the same on CPU as a fused kernel).

    Per edge ``e = j -> i``, head ``h`` (width ``D``, channel ``c = h D + d``):
    ``a_e,h = SiLU(sum_d q_i k_j dk_e) * cut_e * mask_e`` (no softmax, no 1/sqrt(D));
    ``[s | g | t]_e = u_j * dv_e``; ``x_agg_i = sum_e s_e a_e``;
    ``vec_agg_i = sum_e (vec_j g_e + t_e unit_e) mask_e``.

    Args:
        q, k: ``[N, F]``; u: ``[N, 3F]`` (per head ``[s | g | t]``); vec: ``[N, 3, F]``;
        dk: ``[E, F]``; dv: ``[E, 3F]`` (per head ``[s | g | t]``); unit: ``[E, 3]``;
        cut, mask: ``[E]`` float; senders, receivers: ``[E]`` int; heads: H.

    Returns:
        ``(x_agg [N, F], vec_agg [N, 3, F])``, summed in float32 (or float64) whatever the
        inputs' dtype, as are the backward pass's sums over the gathered rows.
    """
    n, f = q.shape
    e = senders.shape[0]
    h = heads
    d = f // h
    q_i, k_j = gather_rows(q.reshape(n, h, d), receivers), gather_rows(k.reshape(n, h, d), senders)
    attn = jnp.sum(q_i * k_j * dk.reshape(e, h, d), axis=-1)
    attn = jax.nn.silu(attn) * (cut * mask)[:, None]  # [E, H]
    s, g, t = jnp.split(gather_rows(u.reshape(n, h, 3 * d), senders) * dv.reshape(e, h, 3 * d), 3, axis=-1)
    x_msg = s * attn[:, :, None]  # [E, H, D]
    vec_j = gather_rows(vec, senders).reshape(e, 3, h, d)
    vec_msg = (vec_j * g[:, None] + t[:, None] * unit[:, :, None, None]) * mask[:, None, None, None]
    acc = sum_dtype(x_msg.dtype)  # bfloat16 messages sum in float32
    x_agg = jax.ops.segment_sum(x_msg.astype(acc), receivers, num_segments=n).reshape(n, f)
    vec_agg = jax.ops.segment_sum(vec_msg.astype(acc), receivers, num_segments=n).reshape(n, 3, f)
    return x_agg, vec_agg



class NeighborEmbedding(nn.Module):
    """Neighbour embedding of torchmd-net.

    ``x_i = W_c [x0_i || m_i] + b_c`` with
    ``m_i = sum_{j != i} Emb2(z_j) * (W_d f(r_ij) + b_d) C(r_ij)``. Self-loops are excluded.
    There is no nonlinearity. ``Emb2`` is a separate table from the atom embedding.

    Attributes:
        hidden: width F.
        cutoff: cutoff r_c in Å (the RBF already contains ``C(r)``; it is applied a second time
            here, as in torchmd-net).
        max_z: size of the embedding table.
        dtype: compute dtype of the embedding, filter and messages (None: float32); the sum
            over the neighbours accumulates in float32 (:func:`sum_dtype`).
    """

    hidden: int
    cutoff: float
    max_z: int = 100
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        atomic_numbers: Array,
        x: Array,
        r: Array,
        rbf: Array,
        senders: Array,
        receivers: Array,
        mask: Array,
        num_pairs: int | None = None,
    ) -> Array:
        """Mix the embeddings of the neighbours into ``x``.

        Args:
            atomic_numbers: ``[N]`` int.
            x: ``[N, F]`` atom embeddings ``x0``.
            r: ``[R]`` lengths of the filter rows: ``R = E`` per edge, or ``R = P + 1`` (one per
                atom pair and one for self-loops) when ``num_pairs = P`` is given.
            rbf: ``[R, K]`` radial basis of the same rows.
            senders: ``[E]`` sources j.
            receivers: ``[E]`` targets i.
            mask: ``[E]`` bool, active non-self-loop edges.
            num_pairs: P when the edges are in the pair layout of :func:`mspec.graph.pack`.

        Returns:
            ``[N, F]`` features.
        """
        n = x.shape[0]
        (emb,) = in_dtype(self.dtype, embed(self.max_z, self.hidden, "embedding")(atomic_numbers))
        w = dense(self.hidden, dtype=self.dtype, name="distance_proj")(rbf)
        w = w * cosine_cutoff(r, self.cutoff)[:, None].astype(w.dtype)
        if num_pairs is not None:
            w = graph.expand_pair_rows(w, senders.shape[0])
        msg = gather_rows(emb, senders) * w * mask[:, None]  # [E, F]
        agg = jax.ops.segment_sum(msg.astype(sum_dtype(msg.dtype)), receivers, num_segments=n)
        return dense(self.hidden, dtype=self.dtype, name="combine")(
            jnp.concatenate([x, agg], axis=-1)
        )


class EquivariantMultiHeadAttention(nn.Module):
    """One ET attention layer (distance influence "both", SiLU attention, no softmax).

    Layouts (they matter for loading torch weights):

    * ``v_proj`` (F -> 3F) and ``dv_proj`` (K -> 3F) are reshaped to ``[.., H, 3D]``: inside each
      head the 3D block is ``[s | g | t]``.
    * ``vec_proj`` (F -> 3F, no bias) and ``o_proj`` (F -> 3F) are split into three contiguous
      F-blocks (not per head).
    * The aggregated scalar message is reshaped to ``[N, F]`` with channel ``h * D + d``.

    Attributes:
        hidden: width F.
        num_heads: number of heads H (must divide F).
        cutoff: cutoff r_c in Å.
        activation: activation of ``dk`` and ``dv`` (SiLU).
        attn_activation: activation of the attention logits (SiLU).
        zero_vec_input: the input ``vec`` is exactly zero (the first layer). ``vec_proj`` and the
            ``o1`` / ``o2`` thirds of ``o_proj`` then only ever meet zeros (``vec3 * o1``,
            ``vec_dot * o2``), so they are skipped: the same outputs and gradients (zero for
            those weights) for less work. The parameters are created all the same.
        dtype: compute dtype of the Linears, filters and messages (None: float32). The
            LayerNorm runs in its input's dtype (the encoder keeps that float32) and the
            message sums accumulate in float32.
    """

    hidden: int
    num_heads: int
    cutoff: float
    activation: Callable[[Array], Array] = nn.silu
    attn_activation: Callable[[Array], Array] = nn.silu
    zero_vec_input: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        vec: Array,
        r: Array,
        rbf: Array,
        unit: Array,
        senders: Array,
        receivers: Array,
        mask: Array,
        num_pairs: int | None = None,
        *,
        implementation: str = "xla",
    ) -> tuple[Array, Array]:
        """Compute the residual updates of one layer.

        Args:
            x: ``[N, F]`` scalar features.
            vec: ``[N, 3, F]`` vector features.
            r: ``[E]`` edge lengths.
            rbf: ``[R, K]`` radial basis of the filter rows: ``R = E`` (one per edge), or
                ``R = P + 1`` when ``num_pairs = P`` (see :func:`mspec.graph.pair_filter_rows`).
            unit: ``[E, 3]`` unit vectors ``(pos_j - pos_i) / r`` (0 for self-loops).
            senders: ``[E]`` sources j.
            receivers: ``[E]`` targets i.
            mask: ``[E]`` bool, active edges (self-loops included).
            num_pairs: P when the edges are in the pair layout of :func:`mspec.graph.pack`.
            implementation: ``"xla"``: the message passing as :func:`message_passing_xla` (the
                definition); ``"fused"``: as the CPU kernel
                (:func:`mspec.kernels.message.message_fused`).

        Returns:
            ``(dx [N, F], dvec [N, 3, F])``.
        """
        n, f = x.shape
        e = senders.shape[0]
        h = self.num_heads
        if f != self.hidden or f % h:
            raise ValueError(f"hidden={f} must equal {self.hidden} and be divisible by {h} heads")
        d = f // h
        assert vec.shape == (n, 3, f), vec.shape

        x = layer_norm(name="layernorm")(x)
        q = dense(f, dtype=self.dtype, name="q_proj")(x).reshape(n, h, d)
        k = dense(f, dtype=self.dtype, name="k_proj")(x).reshape(n, h, d)
        u = dense(3 * f, dtype=self.dtype, name="v_proj")(x).reshape(n, h, 3 * d)  # [s | g | t]

        # Contiguous F-blocks, applied on the channel axis of each spatial component.
        vec_proj = dense(3 * f, use_bias=False, dtype=self.dtype, name="vec_proj")
        if self.zero_vec_input:
            vec_proj(vec[:0])  # creates the parameters; zero rows, no work
        else:
            vec1, vec2, vec3 = jnp.split(vec_proj(vec), 3, axis=-1)
            vec_dot = jnp.sum(vec1 * vec2, axis=1)  # [N, F]

        # One filter per row: both directions of an atom pair have the same length.
        dk_proj = dense(f, dtype=self.dtype, name="dk_proj")
        dv_proj = dense(3 * f, dtype=self.dtype, name="dv_proj")

        # Attention: SiLU(sum_d q_i k_j dk_ij) * C(r_ij); no softmax and no 1/sqrt(D). The
        # messages are multiplied by the mask, which zeroes inactive edges exactly, including the
        # SiLU(bias) contributions of dk / dv that the cutoff does not reach in the vector
        # message. The vector message is not weighted by attention or cutoff (it only fades
        # through dv). Formulas: message_passing_xla.
        # With a compute dtype the geometry (float32) and vectors meet the messages in it.
        m, cut, unit, vec_in = in_dtype(
            self.dtype, mask.astype(x.dtype), cosine_cutoff(r, self.cutoff), unit, vec
        )
        if self.attn_activation is not nn.silu:
            raise ValueError("only the SiLU attention activation is implemented")
        nodes = (q.reshape(n, f), k.reshape(n, f), u.reshape(n, 3 * f), vec_in)
        edges = (unit, cut, m, senders, receivers)
        if implementation == "fused":
            if self.activation is not nn.silu:
                raise ValueError("the fused kernel implements the SiLU filter activation only")
            # Both filters in one GEMM, [R, 4F] = [pk | pv] (a GEMM of K = 64 runs faster wide);
            # the kernel adds the biases and applies the SiLU itself. The zero-row calls create
            # the parameters, exactly those of the two Linears.
            dk_proj(rbf[:0]), dv_proj(rbf[:0])
            wk, wv = dk_proj.variables["params"], dv_proj.variables["params"]
            filters = rbf @ jnp.concatenate([wk["kernel"], wv["kernel"]], axis=1).astype(rbf.dtype)
            bias = jnp.concatenate([wk["bias"], wv["bias"]]).astype(rbf.dtype)
            x_agg, vec_agg = kernel_message.message_fused(
                *nodes, filters, bias, *edges, h, pairs=num_pairs
            )
        else:
            dk, dv = self.activation(dk_proj(rbf)), self.activation(dv_proj(rbf))  # [R, F], [R, 3F]
            if num_pairs is not None:
                dk, dv = graph.expand_pair_rows(dk, e), graph.expand_pair_rows(dv, e)
            x_agg, vec_agg = message_passing_xla(*nodes, dk, dv, *edges, h)

        o_proj = dense(3 * f, dtype=self.dtype, name="o_proj")
        if self.zero_vec_input:  # vec1 = vec2 = vec3 = 0: only o3 reaches the outputs
            o_proj(x_agg[:0])  # creates the parameters; zero rows, no work
            w = o_proj.variables["params"]
            x_agg, kernel, bias = nn.dtypes.promote_dtype(
                x_agg, w["kernel"][:, 2 * f :], w["bias"][2 * f :], dtype=self.dtype
            )  # as the Dense itself
            return x_agg @ kernel + bias, vec_agg
        o1, o2, o3 = jnp.split(o_proj(x_agg), 3, axis=-1)  # each [N, F]
        dx = vec_dot * o2 + o3
        dvec = vec3 * o1[:, None, :] + vec_agg
        return dx, dvec


class EquivariantTransformer(nn.Module):
    """TorchMD-Net Equivariant Transformer representation model.

    Per layer: ``x <- x + dx``, ``vec <- vec + dvec``, then the optional inter-layer norms; after
    the last layer an affine LayerNorm on ``x`` and (unless ``vector_norm="none"``) a whitened
    :class:`EquivariantLayerNorm` on ``vec``.

    Attributes:
        hidden: width F.
        num_layers: number of attention layers L.
        num_heads: number of heads H.
        num_rbf: number K of ExpNormal basis functions.
        cutoff: cutoff r_c in Å.
        max_z: size of the atom embedding tables.
        interlayer_norm: norms applied after each layer's residual:
            ``"none"`` (original ET, the MD17 track);
            ``"affine"`` (MolSpectra: per-layer affine LayerNorm on x + per-layer EqLN on vec);
            ``"shared_noaffine"`` (Frad fork: one shared non-affine LayerNorm on x + per-layer EqLN
            on vec).
        vector_norm: final norm on ``vec``: ``"whitened"`` (EqLN) or ``"none"``.
        separate_noise_vectors: Frad's MD17 recipe (its ``seperate_noise``): return the final
            vectors both before and after the whitened norm (``vector_norm`` must be
            ``"whitened"``; the parameters are the same as without it), so the energy head can
            read the un-normalised stream and the noise head the normalised one.
        message_passing: ``"xla"`` (XLA ops, any backend, any order of differentiation),
            ``"fused"`` (C++ kernels for XLA:CPU, float32, first and second derivatives; faster
            on CPU: the message passing, and the ``[N, 3, F]`` steps of the whitened vector norms)
            or ``"auto"`` (fused on CPU when the kernels build, else XLA). See
            :mod:`mspec.kernels.message` and :mod:`mspec.kernels.eqln`.
        dtype: compute dtype (Flax's ``dtype``; the parameters stay float32). None: float32 (or
            float64 under ``jax_enable_x64`` with float64 inputs and parameters, the parity
            runs). ``jnp.bfloat16``: the Linears, embeddings, filters, attention and messages
            compute in bfloat16; the geometry and RBF, the residual stream ``x``/``vec``, every
            LayerNorm and whitened vector norm (its 3x3 covariance and ``eigh``) stay float32
            and the message sums accumulate in float32. The fused kernels are float32 only:
            ``message_passing="auto"`` then runs XLA ops (and logs so), ``"fused"`` is an error.
    """

    hidden: int = 256
    num_layers: int = 8
    num_heads: int = 8
    num_rbf: int = 64
    cutoff: float = 5.0
    max_z: int = 100
    interlayer_norm: str = "affine"
    vector_norm: str = "whitened"
    separate_noise_vectors: bool = False
    message_passing: str = "xla"
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        atomic_numbers: Array,
        positions: Array,
        senders: Array,
        receivers: Array,
        edge_mask: Array,
        num_pairs: int | None = None,
    ) -> tuple[Array, ...]:
        """Encode a (padded) batch of molecules.

        Args:
            atomic_numbers: ``[N] int32`` (0 for padding).
            positions: ``[N, 3]`` coordinates in Å.
            senders: ``[E] int32`` sources j (messages flow j -> i).
            receivers: ``[E] int32`` targets i.
            edge_mask: ``[E] bool``, True for real edges (self-loops included). Edges with
                ``r >= cutoff`` are additionally treated as inactive.
            num_pairs: None for edges in any order; ``P`` when they are in the pair layout of
                :func:`mspec.graph.pack` (``P = mspec.graph.num_pairs(E, N)``): the distance
                filters are then computed once per atom pair instead of once per edge, the same
                result for about half the filter work.

        Returns:
            ``(x [N, F], vec [N, 3, F])``; with ``separate_noise_vectors``
            ``(x, vec [N, 3, F] before the final vector norm, vec after it)``. Rows of padding
            atoms are not zeroed here.
        """
        if self.interlayer_norm not in INTERLAYER_NORMS:
            raise ValueError(
                f"Unknown interlayer_norm {self.interlayer_norm!r}; expected one of "
                f"{INTERLAYER_NORMS} ('none': original ET / MD17, 'affine': MolSpectra, "
                "'shared_noaffine': Frad fork)."
            )
        if self.vector_norm not in VECTOR_NORMS:
            raise ValueError(
                f"Unknown vector_norm {self.vector_norm!r}; expected one of {VECTOR_NORMS}."
            )
        if self.separate_noise_vectors and self.vector_norm != "whitened":
            raise ValueError(
                "separate_noise_vectors needs vector_norm='whitened' (the noise stream is the "
                f"normalised one), got vector_norm={self.vector_norm!r}"
            )
        n = atomic_numbers.shape[0]
        f = self.hidden

        r, unit, _ = edge_geometry(positions, senders, receivers)
        # The pipeline's edge lists carry a skin beyond the cutoff: drop those edges here.
        mask = edge_mask & (r < self.cutoff)  # [E]
        r_rows = r if num_pairs is None else graph.pair_rows(r, n)  # [R]
        if num_pairs is not None and num_pairs != graph.num_pairs(r.shape[0], n):
            raise ValueError(f"num_pairs={num_pairs} does not match {r.shape[0]} edges, {n} nodes")
        rbf = expnorm_rbf(r_rows, self.num_rbf, self.cutoff)  # [R, K]

        (x,) = in_dtype(self.dtype, embed(self.max_z, f, "embedding")(atomic_numbers))  # [N, F]
        x = NeighborEmbedding(
            f, self.cutoff, self.max_z, dtype=self.dtype, name="neighbor_embedding"
        )(
            atomic_numbers, x, r_rows, rbf, senders, receivers, mask & (senders != receivers),
            num_pairs,
        )
        # The residual stream sums the layers' updates: kept in float32 under bfloat16 compute.
        (x,) = in_dtype(None if self.dtype is None else sum_dtype(self.dtype), x)
        vec = jnp.zeros((n, 3, f), x.dtype)
        implementation = "fused" if kernel_message.use_fused(
            self.message_passing, x.dtype if self.dtype is None else self.dtype
        ) else "xla"

        if self.interlayer_norm == "shared_noaffine":
            shared_norm = layer_norm(affine=False, name="shared_layernorm")
        for layer in range(self.num_layers):
            dx, dvec = EquivariantMultiHeadAttention(
                f, self.num_heads, self.cutoff, zero_vec_input=layer == 0, dtype=self.dtype,
                name=f"attention_layers_{layer}",
            )(x, vec, r, rbf, unit, senders, receivers, mask, num_pairs, implementation=implementation)
            x = x + dx
            vec = vec + dvec
            if self.interlayer_norm == "affine":
                x = layer_norm(name=f"layer_norms_{layer}")(x)
            elif self.interlayer_norm == "shared_noaffine":
                x = shared_norm(x)
            if self.interlayer_norm != "none":
                vec = EquivariantLayerNorm(name=f"vec_layer_norms_{layer}")(vec, implementation)

        x = layer_norm(name="out_norm")(x)
        if self.separate_noise_vectors:
            return x, vec, EquivariantLayerNorm(name="out_norm_vec")(vec, implementation)
        if self.vector_norm == "whitened":
            vec = EquivariantLayerNorm(name="out_norm_vec")(vec, implementation)
        assert x.shape == (n, f) and vec.shape == (n, 3, f)
        return x, vec
