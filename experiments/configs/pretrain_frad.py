"""Frad pre-training (fractional denoising) of the ET on real QM9 DFT geometries.

Torsion noise (σ = 2° per rotatable torsion) then Cartesian noise (τ = 0.04 Å); the ET predicts
only the Cartesian part. Hyper-parameters follow docs/spec/frad.md §2.9 (AdamW,
lr 4e-4, 10k linear warm-up, then the official cosine measured from step 0).

    python -m experiments.pretrain --config experiments/configs/pretrain_frad.py --workdir runs/frad
    python -m experiments.pretrain --config experiments/configs/pretrain_frad.py:tiny --workdir runs/tiny

Variants (``:variant``): ``base`` (default; QM9 track model, batch 70, 400k steps) and ``tiny``
(2,000-molecule QM9 sample, a small ET, 60 steps: about a minute on 2 CPU cores).

The ``base`` model is Frad's own architecture (the Frad fork's ET, docs/spec/et.md §6): after each
layer one *shared non-affine* LayerNorm on x and a per-layer EqLN on the vectors
(``model.interlayer_norm = "shared_noaffine"``, 7,212,292 parameters). MolSpectra's variant, with
a per-layer *affine* LayerNorm (``"affine"``, 7,216,388 parameters), is the shared default of the
other configs (``common.model_config``); fine-tuning a Frad checkpoint therefore needs
``--config.model.interlayer_norm=shared_noaffine``. ``tiny`` keeps the common tiny model so that
the smoke runs of all methods share one architecture.
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, variant="base")
    c = ml_collections.ConfigDict()
    c.seed = 1
    c.data = common.data_config("qm9/full")
    c.model = common.model_config("qm9")
    c.model.interlayer_norm = "shared_noaffine"  # Frad's architecture (see above)
    # "auto": the fused C++ message-passing kernel on CPU (built on first use; ~1.4x faster
    # steps there, BENCHMARKS.md), XLA ops elsewhere; "xla" / "fused" force one.
    c.model.message_passing = "auto"
    # Noise: "frad" (torsion then Cartesian) or "coord" (Cartesian only).
    c.noise = ml_collections.ConfigDict(dict(type="frad", tau=0.04, sigma_deg=2.0, fractional=True))
    # Denoising target normalisation: "tau" (noise / tau), "running" (official accumulated
    # mean/std, carried in the train state and checkpoint) or "none" (Å). See mspec.losses.
    c.loss = ml_collections.ConfigDict(dict(denoising_weight=1.0, target_normalization="tau"))
    c.batch_size = 70  # molecules per step, over all devices (approximate under packing)
    c.total_steps = 400_000  # sets the schedule length
    # Each step accumulates gradients over this many packed sub-batches of
    # batch_size / microbatches molecules: same loss and gradients, peak memory roughly divided
    # by it (batch 128 on 2 CPU cores: 1, 2, 4, 8 sub-batches peak at 2.5, 1.85, 1.45, 1.3 GB,
    # and sub-batches ran faster than one batch; BENCHMARKS.md). 0 = automatic: on CPU, sub-batches of at
    # most 32 molecules per device; on GPU/TPU, 1. Values > 1 need loss.target_normalization
    # "tau" or "none" (automatic picks 1 with "running"); denoising pre-training only.
    c.microbatches = 0
    c.stop_after_step = 0  # > 0: stop (and checkpoint) at this step; resume later with the same workdir
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=4e-4,
            warmup_steps=10_000,
            # "frad_cosine": the official warm-up + cosine measured from step 0 (spec §2.9);
            # "warmup_cosine": optax.warmup_cosine_decay_schedule; "constant".
            schedule="frad_cosine",
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip_norm=0.0,  # 0 = no clipping (as the official code)
        )
    )
    c.log_every = 50
    c.eval_every = 2000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3

    if arg.variant == "tiny":
        c.data.dataset = "qm9/sample"
        c.data.eval_max_molecules = 200
        c.model = common.model_config("tiny")
        c.model.message_passing = "auto"
        c.batch_size = 16
        c.total_steps = 60
        c.optim.warmup_steps = 10
        c.optim.lr = 5e-4
        c.log_every = 10
        c.eval_every = 30
        c.checkpoint_every = 20
    elif arg.variant != "base":
        raise ValueError(f"unknown variant {arg.variant!r}; use 'base' or 'tiny'")
    return c
