"""SpecFormer: the PatchTST-style spectrum encoder of MolSpectra (Flax linen).

Written from ``docs/spec/molspectra.md`` §4. For each spectrum type t (in the order of
``specs``; officially UV, IR, Raman):

1. normalise (``log10(1 + s)`` by default) and cut into overlapping patches ``[B, n_t, P_t]``;
2. zero the masked patches (no mask token; masked tokens still go through the encoder, Q3);
3. embed: ``W_t patch + b_t + Pos_t`` with a learnable table ``Pos_t [n_t, d]`` (U(-0.02, 0.02));
4. concatenate the types to ``[B, sum_t n_t, d]`` and run ``num_layers`` post-norm encoder layers
   with BatchNorm and RealFormer residual attention scores;
5. reconstruct each type's patches with a per-type Linear ``d -> P_t``;
6. molecule embedding: flatten ``[B, sum_t n_t * d]`` (token-major) -> Linear -> LayerNorm.

BatchNorm statistics are masked with ``graph_mask``: padding molecule slots of a packed batch
never enter the batch mean/variance (nor, therefore, the running statistics). In training mode the
statistics are over all real molecules of the batch passed in; called on a global batch under
``jax.jit`` with a sharded batch axis, that is the whole global batch, as on the original's single
GPU.

Initialisation follows the PyTorch code (§4.6): Xavier-uniform weights and zero biases everywhere
except the attention output projection, which keeps PyTorch's default ``nn.Linear`` init.
With d = 128, 3 layers, 16 heads, d_ff 256 and the official patching this has 11,844,344
parameters for an embedding size of 256 (6,158,712 for 128); the attention scale ``1/sqrt(d_k)``
is a constant, as the official frozen parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mspec import spectra
from mspec.models.et import dense, layer_norm

Array = jax.Array


def _torch_default_dense(features: int, fan_in: int, name: str) -> nn.Dense:
    """``torch.nn.Linear``'s default init: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.Dense(
        features,
        # kaiming_uniform(a=sqrt(5)) has bound sqrt(6 / ((1 + 5) fan_in)) = 1 / sqrt(fan_in).
        kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
        bias_init=bias_init,
        name=name,
    )


def _uniform_pm(bound: float):
    """Initialiser U(-bound, bound) (PatchTST's learnable positional table: bound 0.02)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class MaskedBatchNorm(nn.Module):
    """``torch.nn.BatchNorm1d`` over the channel axis, with padding rows excluded from the stats.

    Attributes:
      momentum: Flax momentum (``1 - torch momentum``; 0.9 = torch's 0.1).
      epsilon: added to the variance.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array, row_mask: Array, train: bool) -> Array:
        """Normalise ``x [B, T, C]``; ``row_mask [B]`` marks the rows that count in the stats."""
        mask = jnp.broadcast_to(row_mask[:, None, None], x.shape)
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=self.momentum,
            epsilon=self.epsilon,
            use_fast_variance=False,
            name="bn",
        )(x, mask=mask)


@jax.custom_vjp
def _attend(scores: Array, v: Array) -> Array:
    """``softmax(scores) @ v`` per head: ``scores [B, H, T, T]``, ``v [B, H, T, c]`` ->
    ``[B, H, T, c]``, the same values as ``jax.nn.softmax`` and an einsum.

    Its gradient is written out (as FlashAttention's backward): with ``P`` the probabilities and
    ``O`` the output, ``dS = P * (dO V^T - rowsum(dO * O))`` and ``dV = P^T dO``. The row sum
    comes from ``[B, H, T, c]`` tensors, where autodiff through softmax's exp / sum / divide
    reduces over ``[B, H, T, T]`` ones and keeps more of them for the backward; the scores are
    the biggest tensors of stage 2 (BENCHMARKS.md, stage2_step).
    """
    return jnp.einsum("bhqk,bhkc->bhqc", jax.nn.softmax(scores, axis=-1), v)


def _attend_fwd(scores, v):
    p = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bhqk,bhkc->bhqc", p, v)
    return o, (p, v, o)


def _attend_bwd(res, do):
    p, v, o = res
    row = jnp.sum(do * o, axis=-1, keepdims=True)  # = rowsum(P * dP)
    dscores = p * (jnp.einsum("bhqc,bhkc->bhqk", do, v) - row)
    return dscores, jnp.einsum("bhqk,bhqc->bhkc", p, do)


_attend.defvjp(_attend_fwd, _attend_bwd)


class EncoderLayer(nn.Module):
    """Post-norm Transformer layer with BatchNorm and residual attention scores (spec §4.4).

    ``A_l = Q K^T / sqrt(d_k) + A_{l-1}`` (pre-softmax, carried to the next layer);
    ``Z <- BN1(Z + W_out softmax(A_l) V)``; ``Z <- BN2(Z + W_2 GELU(W_1 Z + c_1) + c_2)``.
    """

    d_model: int
    num_heads: int
    d_ff: int
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(
        self, z: Array, prev_scores: Array | None, row_mask: Array, train: bool
    ) -> tuple[Array, Array]:
        """One layer.

        Args:
          z: ``[B, T, d]`` tokens.
          prev_scores: ``[B, H, T, T]`` pre-softmax scores of the previous layer, or None.
          row_mask: ``[B]`` bool, molecules that count in the BatchNorm statistics.
          train: batch statistics (and update the running ones) if True, running ones if False.

        Returns:
          ``(z [B, T, d], scores [B, H, T, T])``.
        """
        b, t, d = z.shape
        h = self.num_heads
        if d % h:
            raise ValueError(f"d_model {d} is not divisible by {h} heads")
        dk = d // h

        def heads(x):  # [B, T, d] -> [B, H, T, dk]; channel c -> (head c // dk, dim c % dk)
            return x.reshape(b, t, h, dk).transpose(0, 2, 1, 3)

        q = heads(dense(d, name="q_proj")(z))
        k = heads(dense(d, name="k_proj")(z))
        v = heads(dense(d, name="v_proj")(z))
        scores = jnp.einsum("bhqc,bhkc->bhqk", q, k) * (dk**-0.5)
        if prev_scores is not None:
            scores = scores + prev_scores
        o = _attend(scores, v).transpose(0, 2, 1, 3).reshape(b, t, d)
        o = _torch_default_dense(d, d, name="out_proj")(o)
        z = MaskedBatchNorm(self.bn_momentum, name="norm_attn")(z + o, row_mask, train)
        ff = dense(d, name="ff_out")(nn.gelu(dense(self.d_ff, name="ff_in")(z), approximate=False))
        z = MaskedBatchNorm(self.bn_momentum, name="norm_ff")(z + ff, row_mask, train)
        return z, scores


class SpecFormer(nn.Module):
    """Spectrum encoder with masked-patch reconstruction and a molecule embedding.

    Attributes:
      specs: the spectrum types, in token order (lengths, patching, mask ratios).
      normalization: input normalisation, see :func:`mspec.spectra.normalize`.
      embed_dim: size D of the molecule embedding (must match the 3D encoder's width when the
        contrastive loss compares them directly, as in the paper).
      d_model, num_layers, num_heads, d_ff: encoder sizes (official: 128, 3, 16, 256).
      bn_momentum: Flax BatchNorm momentum (0.9 = PyTorch 0.1).
    """

    specs: tuple[spectra.SpectrumSpec, ...]
    normalization: str = "log10"
    embed_dim: int = 256
    d_model: int = 128
    num_layers: int = 3
    num_heads: int = 16
    d_ff: int = 256
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(
        self,
        spectra_in: Mapping[str, Array],
        graph_mask: Array,
        *,
        mask_rng: Array | None,
        train: bool,
    ) -> dict[str, Array | dict[str, Array]]:
        """Encode a batch of spectra.

        Args:
          spectra_in: ``{name: [B, L_t]}`` raw (unnormalised) spectra for every type in ``specs``.
          graph_mask: ``[B]`` bool, True for real molecules (padding slots are excluded from the
            BatchNorm statistics).
          mask_rng: PRNG key for the random patch masks; None = no masking (e.g. to embed
            spectra for retrieval).
          train: BatchNorm uses (and updates) batch statistics if True, running ones if False.
            Call with ``mutable=["batch_stats"]`` when True.

        Returns:
          ``{"embedding": [B, D], "patches": {t: [B, n_t, P_t]}, "reconstruction":
          {t: [B, n_t, P_t]}, "mask": {t: [B, n_t] bool}}``; ``patches`` are the normalised,
          unmasked targets, ``mask`` is True for masked patches (all False without ``mask_rng``).
        """
        missing = [s.name for s in self.specs if s.name not in spectra_in]
        if missing:
            raise ValueError(f"SpecFormer needs spectra {missing}; got {sorted(spectra_in)}")
        b = graph_mask.shape[0]
        keys = (
            jax.random.split(mask_rng, len(self.specs))
            if mask_rng is not None
            else [None] * len(self.specs)
        )
        patches, masks, tokens = {}, {}, []
        for spec, key in zip(self.specs, keys):
            x = spectra.normalize(
                spectra_in[spec.name].astype(jnp.float32), self.normalization, spec.minmax
            )
            p = spectra.patchify(x, spec)  # [B, n, P]
            if key is None:
                m = jnp.zeros((b, spec.num_patches), bool)
            else:
                m = spectra.random_patch_mask(key, (b,), spec)
            patches[spec.name], masks[spec.name] = p, m
            p_in = jnp.where(m[..., None], 0.0, p)  # masked patches are zero-filled (Q3)
            pos = self.param(
                f"pos_{spec.name}", _uniform_pm(0.02), (spec.num_patches, self.d_model)
            )
            tokens.append(dense(self.d_model, name=f"patch_proj_{spec.name}")(p_in) + pos)
        z = jnp.concatenate(tokens, axis=1)  # [B, T, d]

        scores = None
        for i in range(self.num_layers):
            z, scores = EncoderLayer(
                self.d_model, self.num_heads, self.d_ff, self.bn_momentum, name=f"layers_{i}"
            )(z, scores, graph_mask, train)

        recon, start = {}, 0
        for spec in self.specs:
            seg = z[:, start : start + spec.num_patches]
            recon[spec.name] = dense(spec.patch_len, name=f"recon_{spec.name}")(seg)
            start += spec.num_patches

        flat = z.reshape(b, -1)  # token-major: index n * d + c
        emb = layer_norm(name="embed_norm")(dense(self.embed_dim, name="embed_proj")(flat))
        return {"embedding": emb, "patches": patches, "reconstruction": recon, "mask": masks}


def make_specs(
    names: Sequence[str],
    lengths: Mapping[str, int],
    patch_len: Mapping[str, int],
    stride: Mapping[str, int],
    mask_ratio: Mapping[str, float],
    minmax: Mapping[str, Sequence[float]] | None = None,
) -> tuple[spectra.SpectrumSpec, ...]:
    """Builds the :class:`SpectrumSpec` tuple for ``names`` from per-type config mappings.

    Raises:
      ValueError: a declared type lacks a length, patch length, stride or mask ratio.
    """
    out = []
    for name in names:
        for what, table in (
            ("length", lengths),
            ("patch_len", patch_len),
            ("stride", stride),
            ("mask_ratio", mask_ratio),
        ):
            if name not in table:
                raise ValueError(f"spectrum type {name!r} has no {what} (known: {sorted(table)})")
        mm = tuple(float(v) for v in (minmax or {}).get(name, (0.0, 1.0)))
        out.append(
            spectra.SpectrumSpec(
                name=name,
                length=int(lengths[name]),
                patch_len=int(patch_len[name]),
                stride=int(stride[name]),
                mask_ratio=float(mask_ratio[name]),
                minmax=mm,
            )
        )
    return tuple(out)
