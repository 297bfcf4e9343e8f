"""QM9 fine-tuning, one variant per target (MolSpectra's recipe, ``docs/spec/molspectra.md`` §6–§7).

    python -m experiments.finetune --config experiments/configs/finetune_qm9.py:homo --workdir runs/ft_homo \
        --config.init.checkpoint=runs/frad
    python -m experiments.finetune --config experiments/configs/finetune_qm9.py:tiny --workdir runs/ft_tiny

Variants: ``mu, alpha, homo, lumo, gap, r2, zpve, U0, U, H, G, cv`` and ``tiny`` (2,000-molecule
QM9 sample, small ET, 150 steps on CPU; pick its target with ``:tiny,target=homo``, default
``zpve``, which a sum of atom contributions learns within a few steps).

Every target: the ET (H=256, 8 layers; message passing ``"auto"``: the fused CPU kernels on CPU,
XLA ops elsewhere, printed at start-up) with the scalar head and sum readout, training-set
standardisation, Noisy Nodes (Coord noise 0.005 Å on training inputs, weight 0.1), batch 128,
AdamW lr 4e-4 (weight decay 0), 10k-step linear warm-up then cosine annealing with warm restarts
(T0 = 100k, ×2, floor 1e-7) for 700k steps, split 110,000 / 10,000 / 10,831 (seed 1).
Frad's per-target heads (``docs/spec/frad.md`` §3.5, ``docs/spec/et.md`` §8–§9), selected by the variant:

* ``U0, U, H, G``: QM9's atom references subtracted from the labels, no standardisation, and a
  learnable per-element offset (``model.prior = "atomref"``, zero-initialised: Frad's "nt"
  variants). ``:U0,prior=none`` drops the learnable offset; MolSpectra regressed total energies
  with standardisation: ``--config.target.atomref=False --config.target.standardize=True
  --config.model.prior=none``.
* ``mu``: the dipole head (``model.heads = ("dipole", "noise")``: per-atom charges and vectors,
  μ = |Σ qᵢ (rᵢ − c) + vᵢ|), no standardisation.
* ``r2``: the electronic-spatial-extent head (``("spatial_extent", "noise")``: an MLP on the
  scalars times |rᵢ − c|², summed), no standardisation.
* ``head=scalar`` (e.g. ``:mu,head=scalar``) uses the plain scalar head with standardisation
  instead, as MolSpectra did for μ and ⟨R²⟩.
"""

import ml_collections

from experiments.configs import common, finetune_common
from mspec.models import PROPERTY_HEADS
from mspec.training.targets import QM9_ATOMREF_EV, QM9_TARGETS

# Frad's heads for μ and ⟨R²⟩; every other target uses the scalar head.
_DEFAULT_HEADS = {"mu": "dipole", "r2": "spatial_extent"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, variant="homo", target="zpve", head="", prior="")
    target = arg.target if arg.variant == "tiny" else arg.variant
    if target not in QM9_TARGETS:
        raise ValueError(f"unknown QM9 variant {arg.variant!r}; use one of {QM9_TARGETS} or 'tiny'")
    c = finetune_common.base_config("qm9", "qm9/full", "qm9")
    # The fused CPU kernels where they run (2-3.5x the XLA ops' step on 2 cores, BENCHMARKS.md
    # finetune_step), XLA ops elsewhere.
    c.model.message_passing = "auto"
    c.target.name = target
    head = arg.head or _DEFAULT_HEADS.get(target, "scalar")
    if head not in PROPERTY_HEADS:
        raise ValueError(f"head must be one of {PROPERTY_HEADS}, got {head!r}")
    c.model.heads = (head, "noise")
    if head != "scalar":
        c.target.standardize = False
    if target in QM9_ATOMREF_EV:
        c.target.atomref = True
        c.target.standardize = False
        c.model.prior = arg.prior or "atomref"
    elif arg.prior not in ("", "none"):
        raise ValueError(f"prior={arg.prior!r}: only U0, U, H and G have atom references")
    if arg.variant == "tiny":
        c.data.dataset = "qm9/sample"
        c.model = common.model_config("tiny")
        c.model.message_passing = "auto"
        c.model.heads = (head, "noise")
        if target in QM9_ATOMREF_EV:
            c.model.prior = arg.prior or "atomref"
        c.batch_size = 32
        c.total_steps = 150
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 10
        c.optim.restart_period = 150
        c.log_every = 25
        c.eval_every = 50
        c.checkpoint_every = 50
    return c
