"""MD17 fine-tuning (energies and forces), one variant per molecule.

Frad's recipe, ``docs/spec/frad.md`` §3.2–§3.3.

    python -m experiments.finetune --config experiments/configs/finetune_md17.py:aspirin --workdir runs/ft_aspirin
    python -m experiments.finetune --config experiments/configs/finetune_md17.py:aspirin,real,train=9500 \
        --config.data.manual_dir=/data/md17 --workdir runs/ft_aspirin_dft

Variants: ``aspirin, benzene, ethanol, malonaldehyde, naphthalene, salicylic, toluene, uracil``
and ``tiny`` (ethanol, small ET, a few steps on CPU). Options (comma-separated after the variant):

* ``real``: the DFT MD17 files (``md17/<molecule>``, needs ``config.data.manual_dir``); the
  default is the shipped GFN2-xTB stand-in (``md17/gfn2_<molecule>``, NOT DFT, 1,200 frames,
  so only the 950 split exists); ``rmd17=k``: the rMD17 official split ``k`` (1–5);
* ``train=950`` (default; batch 8) or ``train=9500`` (batch 80);
* ``noisy``: Frad's separate noisy-node pass (torsion σ = 20° + 0.005 Å, weight 0.1);
* ``separate_noise`` (with ``noisy``): Frad's two vector streams (its ``seperate_noise``): the
  energy head reads the ET's vectors before the final whitened norm, the noise head the
  normalised ones (``model.separate_noise_vectors``); without it both heads read the normalised
  vectors. Frad's full MD17 recipe is ``:aspirin,noisy,separate_noise``.

Every molecule: the MD17-track ET (H=128, 6 layers, 32 RBF, no per-layer norms), E = std Σ h_i +
mean from the training energies, F = -∂E/∂x, loss 0.2 L_E^ema + 0.8 L_F with smooth-L1 and
Frad's energy EMA (α = 0.05), AdamW lr 5e-4 (weight decay 0), 1k-step linear warm-up then
ReduceLROnPlateau on the validation metric (factor 0.8, patience 30 validations, floor 1e-7),
validation every epoch, split by ``default_rng(1)``.
"""

import ml_collections

from experiments.configs import common, finetune_common
from data_pipelines.md17 import MOLECULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, variant="aspirin", real=False, rmd17=0, train=950, noisy=False,
                           separate_noise=False)
    molecule = "ethanol" if arg.variant == "tiny" else arg.variant
    if molecule not in MOLECULES:
        raise ValueError(f"unknown MD17 variant {arg.variant!r}; use one of {MOLECULES} or 'tiny'")
    if arg.train not in (950, 9500):
        raise ValueError(f"train must be 950 or 9500, got {arg.train}")
    if arg.separate_noise and not arg.noisy:
        raise ValueError("separate_noise needs noisy (it routes the normalised vectors to the noise head)")
    if arg.rmd17:
        dataset = f"md17/rmd17_{molecule}"
    elif arg.real:
        dataset = f"md17/{molecule}"
    else:
        dataset = f"md17/gfn2_{molecule}"
    c = finetune_common.base_config("md17", dataset, "md17")
    c.target.name = molecule
    if arg.rmd17:
        k = f"rmd17_0{arg.rmd17}"
        c.data.train_split, c.data.validation_split, c.data.test_split = (
            f"train_{k}", f"validation_{k}", f"test_{k}")
    else:
        val = {950: 50, 9500: 500}[arg.train]
        c.data.train_split = f"train_{arg.train}"
        c.data.validation_split = f"validation_{val}"
        c.data.test_split = f"test_{arg.train}"
    c.model.heads = ("scalar", "noise") if arg.noisy else ("scalar",)
    c.model.separate_noise_vectors = arg.separate_noise
    # The fused CPU kernels where they run (differentiable twice, as the force loss needs:
    # 2-3x the XLA ops' speed on 2 cores, BENCHMARKS.md finetune_step), XLA ops elsewhere.
    c.model.message_passing = "auto"
    c.init.subtrees = ("representation", "noise_head") if arg.noisy else ("representation",)
    c.noise = ml_collections.ConfigDict(dict(type="frad", tau=0.005, sigma_deg=20.0, fractional=True))
    c.loss.property_loss = "smooth_l1"
    c.loss.energy_weight = 0.2
    c.loss.force_weight = 0.8
    c.loss.energy_ema_alpha = 0.05
    c.loss.denoising_weight = 0.1 if arg.noisy else 0.0
    c.loss.sep_noisy_nodes = arg.noisy
    c.batch_size = 8 if arg.train == 950 else 80
    steps_per_epoch = -(-arg.train // c.batch_size)
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 1000
    c.optim.schedule = "plateau"
    c.optim.plateau_patience = 30
    c.total_steps = 140_000 if arg.train == 950 else 3000 * steps_per_epoch
    c.log_every = 100
    c.eval_every = steps_per_epoch
    c.checkpoint_every = 10 * steps_per_epoch
    if arg.variant == "tiny":
        c.model = common.model_config("tiny")
        c.model.heads = ("scalar", "noise") if arg.noisy else ("scalar",)
        c.model.separate_noise_vectors = arg.separate_noise
        c.model.message_passing = "auto"
        c.data.eval_max_molecules = 20
        c.batch_size = 8
        c.total_steps = 40
        c.optim.warmup_steps = 5
        c.optim.lr = 1e-3
        c.log_every = 10
        c.eval_every = 20
        c.checkpoint_every = 20
    return c
