"""Blocks shared by the fine-tuning configs (finetune_qm9.py, finetune_md17.py)."""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def base_config(task: str, dataset: str, size: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 1
    c.data = common.data_config(dataset)
    c.data.manual_dir = ""  # MD17 / rMD17: directory holding the npz files
    c.data.train_split = "train"
    c.data.validation_split = "validation"
    c.data.test_split = "test"
    c.data.eval_max_molecules = 0  # 0 = the whole validation split (model selection)
    del c.data["eval_split"]  # pre-training's; fine-tuning validates on validation_split
    c.model = common.model_config(size)
    c.target = ml_collections.ConfigDict(dict(name="", standardize=True, atomref=False))
    # Noise for Noisy Nodes: "coord" (QM9) or "frad" (MD17 sep-noisy-node).
    c.noise = ml_collections.ConfigDict(dict(type="coord", tau=0.005, sigma_deg=20.0, fractional=True))
    c.loss = ml_collections.ConfigDict(
        dict(
            property_loss="mse",  # "mse" or "smooth_l1" (beta = 1)
            energy_weight=1.0,  # weight of the property (QM9) / energy (MD17) term
            force_weight=0.0,  # MD17 only
            energy_ema_alpha=1.0,  # Frad's EMA of the energy loss (1 = off; Frad MD17: 0.05)
            denoising_weight=0.1,  # Noisy Nodes (0 = off)
            # The noise target is noise / denoising_scale. 0.04 reproduces the official
            # fine-tuning, whose normaliser statistics come from pre-training (σ ≈ τ_pre = 0.04).
            denoising_scale=0.04,
            sep_noisy_nodes=False,  # MD17: a separate noisy pass feeds only the denoising loss
        )
    )
    # Initialisation from a pre-training checkpoint (a workdir, its checkpoints/ or a step dir).
    # zero_scalar_readout: start the fresh scalar head's output at exactly 0 per atom, so the first
    # prediction is the standardiser's mean (+ prior) whatever the seed (the official heads use
    # Xavier init throughout; docs/finetuning.md says when this matters).
    c.init = ml_collections.ConfigDict(
        dict(checkpoint="", step=-1, subtrees=("representation", "noise_head"), prefix="",
             zero_scalar_readout=False)
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=4e-4,
            warmup_steps=10_000,
            # "cosine_restarts" (QM9, official), "plateau" (MD17, official), "frad_cosine",
            # "warmup_cosine", "constant".
            schedule="cosine_restarts",
            restart_period=100_000,
            restart_mult=2,
            lr_min=1e-7,
            plateau_factor=0.8,
            plateau_patience=30,  # validations (official: epochs)
            plateau_threshold=1e-4,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip_norm=0.0,
        )
    )
    # What the end of training evaluates (results.json, parity plots): the last and/or the
    # best-validation checkpoint; the validation MAE over the first `validation_max_molecules`
    # molecules (0 = the whole split). The test split is always evaluated whole.
    c.evaluate = ml_collections.ConfigDict(
        dict(checkpoints=("last", "best"), validation_max_molecules=0)
    )
    c.batch_size = 128
    c.total_steps = 700_000
    c.stop_after_step = 0
    c.log_every = 100
    c.eval_every = 860 * 10  # about 10 epochs of 110k / 128
    c.checkpoint_every = 860 * 10
    c.keep_checkpoints = 2
    return c
