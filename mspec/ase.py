"""An ASE calculator for mspec energy + force models (the MD17 track).

    from ase.io import read
    from mspec.ase import Calculator

    atoms = read("ethanol.xyz")
    atoms.calc = Calculator("runs/ft_ethanol")          # a workdir of experiments.finetune (md17)
    atoms.get_potential_energy(), atoms.get_forces()     # eV, eV/Å

The energy is the fine-tuned model's ``E = std Σ_i h_i + mean`` and the forces are
``F = -∂E/∂x``, both from one jitted function (the training step's
``FinetuneTrainer.energy_and_forces``, via :class:`mspec.inference.Predictor`), converted from
the datasets' kcal/mol and kcal/mol/Å to ASE's eV and eV/Å with ASE's own constants.

Every atom pair goes into the edge list (the model applies its cutoff and neighbour cap itself),
so a molecule's batch shapes never change as it moves: one compilation per atom count. That
costs ``n²`` edges, which is what molecules of up to a few hundred atoms afford.

Needs ``ase`` (``pip install -e ".[ase]"``).
"""

from __future__ import annotations

import numpy as np

try:
    from ase import units
    from ase.calculators.calculator import Calculator as _AseCalculator
    from ase.calculators.calculator import all_changes
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        'mspec.ase needs the Atomic Simulation Environment: pip install -e ".[ase]" (or pip install ase)'
    ) from e

from mspec import graph, inference
from mspec.training import downstream

KCAL_PER_MOL = units.kcal / units.mol  # in eV (ASE's CODATA constants)


def refusal(config) -> str | None:
    """Why a model with this config cannot be an energy + force calculator (None if it can)."""
    task = inference.task_of(config)
    kind = downstream.get(task)
    if kind is None:
        return f"it has no energy head (config.task {task!r}: a pre-training run or converted encoder)"
    if kind.forces:
        return None
    return (f"its scalar head predicts the QM9 property {config.target.name!r} of equilibrium "
            "geometries, not a potential energy surface")


class Calculator(_AseCalculator):
    """Energy (eV) and forces (eV/Å) of a fine-tuned MD17 model for isolated molecules.

    Args:
      workdir: a fine-tuning workdir whose config has ``task = "md17"``
        (``experiments/configs/finetune_md17.py``), or such an ``experiments.convert`` output.
      which: ``"best"`` or ``"last"`` checkpoint (default: best when there is one).
      **kwargs: passed to ASE's ``Calculator``.

    Raises:
      inference.ModelError: the workdir's model has no energy head (QM9 property models,
        pre-training runs); the message says which it is.

    ``calculate`` raises ``ValueError`` for periodic systems and for molecules the model cannot
    take (an element it was not trained on, a net charge in ``initial_charges``, overlapping
    atoms; :func:`mspec.inference.check_molecule`).
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, workdir: str, which: str | None = None, **kwargs):
        super().__init__(**kwargs)
        why = refusal(inference.read_config(workdir))  # before reading any parameters
        if why:
            raise inference.ModelError(f"{workdir} cannot be an energy + force calculator: {why}. "
                                       "Use an MD17 model (experiments/configs/finetune_md17.py)")
        self.model = inference.load(workdir, which)
        self.predictor = inference.Predictor(self.model)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        if np.any(a.pbc):
            raise ValueError("mspec.ase.Calculator: periodic boundary conditions are not supported "
                             "(the models are for isolated molecules); set atoms.pbc = False")
        charge = int(round(float(np.sum(a.get_initial_charges()))))
        problem = inference.check_molecule(self.model, a.numbers, a.positions, charge)
        if problem:
            raise ValueError(f"mspec.ase.Calculator: {problem}")
        n = len(a)
        mol = inference.featurize(self.model, a.numbers, a.positions, all_pairs=True)
        budget = graph.Budget(n_node=n + 1, n_edge=n + 1 + n * (n - 1), n_graph=2, max_torsions=1)
        out = self.predictor(graph.pack([mol], budget))
        energy = inference.to_training_units(self.model, out["pred"][:1], np.zeros(1))[0]  # kcal/mol
        self.results["energy"] = float(energy) * KCAL_PER_MOL
        self.results["free_energy"] = self.results["energy"]  # no electronic entropy
        self.results["forces"] = np.asarray(out["forces"][:n], np.float64) * KCAL_PER_MOL
