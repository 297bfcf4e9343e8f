"""What a fine-tuning task predicts and how it is scored: one object per kind of downstream task.

``config.task`` names the kind: ``"qm9"``, a molecular property of equilibrium geometries (one
number per molecule), or ``"md17"``, a potential energy surface (an energy per conformation and
forces ``F = -∂E/∂x`` per atom). Everything that differs between the two (whether batches carry
forces, the headline metric, units, the trivial baseline, the published numbers) is an attribute
of :class:`Downstream`, and :data:`KINDS` is the only place the task names are compared. A new
downstream kind is a new entry here (plus its dataset builder and config).
"""

from __future__ import annotations

import dataclasses

from mspec.training import targets


@dataclasses.dataclass(frozen=True)
class Downstream:
    """One kind of fine-tuning task.

    Attributes:
      task: its ``config.task`` name.
      forces: labels carry per-atom forces and the model's forces ``-∂E/∂x`` are trained and
        evaluated (an energy surface: an ASE calculator can drive it).
      headline: the key of the split metrics compared with the papers (``mae``/``forces_mae``).
      baseline: the key of the trivial predictor's MAE in the split metrics.
      baseline_name: what that predictor is, for tables.
      units: ``{name: (training unit, report unit, factor)}`` of its quantities.
    """

    task: str
    forces: bool
    headline: str
    baseline: str
    baseline_name: str
    units: dict

    def report_factor(self, name: str) -> float:
        """Multiplier from the training unit of ``name`` to the papers' unit."""
        return self.units[name][2]

    def report_unit(self, name: str) -> str:
        return self.units[name][1]

    def training_unit(self, name: str) -> str:
        return self.units[name][0]

    def headline_unit(self, target: str) -> str:
        """The report unit of the headline number of ``target`` (a QM9 property or an MD17
        molecule, whose headline is its forces)."""
        return self.report_unit("forces" if self.forces else target)

    def headline_factor(self, target: str) -> float:
        return self.report_factor("forces" if self.forces else target)

    def properties(self, target: str) -> tuple[str, ...]:
        """What a fine-tuned model predicts per molecule."""
        return ("energy", "forces") if self.forces else (target,)

    def published(self, target: str, train_frames: int | None = None) -> dict[str, float]:
        """``{method: test MAE}`` of the headline quantity, in report units, from the papers
        (MD17: for ``train_frames`` training frames)."""
        table = (targets.PUBLISHED_MD17_FORCES.get(train_frames, {}) if self.forces
                 else targets.PUBLISHED_QM9)
        return {m: v[target] for m, v in table.items() if target in v}


QM9 = Downstream(task="qm9", forces=False, headline="mae", baseline="train_mean_mae",
                 baseline_name="train-mean predictor", units=targets.QM9_UNITS)
MD17 = Downstream(task="md17", forces=True, headline="forces_mae", baseline="zero_forces_mae",
                  baseline_name="zero-force predictor", units=targets.MD17_UNITS)
KINDS = {d.task: d for d in (QM9, MD17)}


def of(task: str) -> Downstream:
    """The kind of fine-tuning task ``task`` (a ``config.task``).

    Raises:
      ValueError: ``task`` is not a fine-tuning task.
    """
    if task not in KINDS:
        raise ValueError(f"{task!r} is not a fine-tuning task; expected one of {sorted(KINDS)}")
    return KINDS[task]


def get(task: str) -> Downstream | None:
    """:func:`of`, or None for a task that is not fine-tuning (pre-training, a converted encoder)."""
    return KINDS.get(task)
