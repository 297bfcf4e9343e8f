"""QM9 fine-tuning, one variant per target (MolSpectra's recipe, ``docs/spec/molspectra.md`` §6–§7).

    python -m experiments.finetune --config experiments/configs/finetune_qm9.py:homo --workdir runs/ft_homo \
        --config.init.checkpoint=runs/frad
    python -m experiments.finetune --config experiments/configs/finetune_qm9.py:tiny --workdir runs/ft_tiny

Variants: ``mu, alpha, homo, lumo, gap, r2, zpve, U0, U, H, G, cv`` and ``tiny`` (2,000-molecule
QM9 sample, small ET, 150 steps on CPU; pick its target with ``:tiny,target=homo``, default
``zpve``, which a sum of atom contributions learns within a few steps).

Every target: the ET (H=256, 8 layers) with the scalar head and sum readout, training-set
standardisation, Noisy Nodes (Coord noise 0.005 Å on training inputs, weight 0.1), batch 128,
AdamW lr 4e-4 (weight decay 0), 10k-step linear warm-up then cosine annealing with warm restarts
(T0 = 100k, ×2, floor 1e-7) for 700k steps, split 110,000 / 10,000 / 10,831 (seed 1).
``U0, U, H, G``: QM9 atom references subtracted and no standardisation (Frad's "nt" variants;
MolSpectra regressed total energies with standardisation: ``--config.target.atomref=False
--config.target.standardize=True``). ``mu`` and ``r2`` use the scalar head as MolSpectra did
(Frad's dipole / spatial-extent heads are not implemented).
"""

import ml_collections

from experiments.configs import common, finetune_common
from mspec.training.targets import QM9_ATOMREF_EV, QM9_TARGETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, variant="homo", target="zpve")
    target = arg.target if arg.variant == "tiny" else arg.variant
    if target not in QM9_TARGETS:
        raise ValueError(f"unknown QM9 variant {arg.variant!r}; use one of {QM9_TARGETS} or 'tiny'")
    c = finetune_common.base_config("qm9", "qm9/full", "qm9")
    c.target.name = target
    if target in QM9_ATOMREF_EV:
        c.target.atomref = True
        c.target.standardize = False
    if arg.variant == "tiny":
        c.data.dataset = "qm9/sample"
        c.model = common.model_config("tiny")
        c.batch_size = 32
        c.total_steps = 150
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 10
        c.optim.restart_period = 150
        c.log_every = 25
        c.eval_every = 50
        c.checkpoint_every = 50
    return c
