"""Fine-tuning targets: units, unit conversions, QM9 atom references, standardisation, published numbers.

Training units are those of the datasets (PyG's QM9 units; MD17's kcal/mol); reporting units are
the papers' (``docs/spec/published-results.md`` §0):

============  ===============  ============  =========
target        training unit    report unit   factor
============  ===============  ============  =========
mu            D                D             1
alpha         a0^3             a0^3          1
homo, lumo,   eV               meV           1000
gap, zpve,
U0, U, H, G
r2            a0^2             a0^2          1
cv            cal/mol/K        cal/mol/K     1
MD17 energy   kcal/mol         kcal/mol      1
MD17 forces   kcal/mol/Å       kcal/mol/Å    1
============  ===============  ============  =========
"""

from __future__ import annotations

import dataclasses

import numpy as np

HARTREE_TO_EV = 27.211386246  # CODATA 2018, as data_pipelines.qm9pack_source
EV_TO_MEV = 1000.0
HARTREE_TO_KCAL_PER_MOL = 627.509474063
BOHR_TO_ANGSTROM = 0.529177210903

# The order of the 15 labels in a qm9 record's ``targets`` vector: PyG's first 12 columns of
# ``y`` (energies in eV), then the rotational constants A, B, C (GHz). The builders write this
# order (``data_pipelines/qm9pack_source.py``; a test checks that the two agree).
QM9_LABEL_COLUMNS = (
    "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "cv", "A", "B", "C",
)
QM9_TARGETS = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "cv")
_EV_TARGETS = ("homo", "lumo", "gap", "zpve", "U0", "U", "H", "G")
# target -> (training unit, report unit, factor training -> report)
QM9_UNITS = {
    name: (("eV", "meV", EV_TO_MEV) if name in _EV_TARGETS else (unit, unit, 1.0))
    for name, unit in (
        ("mu", "D"), ("alpha", "a0^3"), ("r2", "a0^2"), ("cv", "cal/mol/K"),
        *((t, "eV") for t in _EV_TARGETS),
    )
}
MD17_UNITS = {"energy": ("kcal/mol", "kcal/mol", 1.0), "forces": ("kcal/mol/Å", "kcal/mol/Å", 1.0)}

# QM9 single-atom reference energies (B3LYP/6-31G(2df,p), QM9's atomref table as PyG uses it),
# in eV, for H, C, N, O, F. Subtracting them turns total energies into atomisation energies.
QM9_ATOMREF_EV = {
    "U0": (-13.61312172, -1029.86312267, -1485.30251237, -2042.61123593, -2713.48485589),
    "U": (-13.5745904, -1029.82456413, -1485.26398105, -2042.5727046, -2713.44632457),
    "H": (-13.54887564, -1029.79887659, -1485.2382935, -2042.54701705, -2713.42063702),
    "G": (-13.90303183, -1030.25891228, -1485.71166277, -2043.01812778, -2713.88796536),
}
_ATOMREF_Z = (1, 6, 7, 8, 9)


def atomref_sum(target: str, atomic_numbers: np.ndarray) -> float:
    """Sum of the QM9 atom reference energies (eV) of a molecule's atoms.

    Raises:
      ValueError: no atomref for ``target`` or an element outside H, C, N, O, F.
    """
    if target not in QM9_ATOMREF_EV:
        raise ValueError(f"QM9 has atom references only for {sorted(QM9_ATOMREF_EV)}, not {target!r}")
    table = dict(zip(_ATOMREF_Z, QM9_ATOMREF_EV[target]))
    try:
        return float(sum(table[int(z)] for z in atomic_numbers))
    except KeyError as e:
        raise ValueError(f"no QM9 atom reference for element Z={e.args[0]}") from None


@dataclasses.dataclass(frozen=True)
class Standardizer:
    """``y = std * z + mean`` per molecule; the model predicts ``z`` as a sum of atom terms.

    Following torchmd-net, ``mean`` is added once per molecule and ``std`` scales every atom's
    output, so the molecule prediction is ``std * sum_i h_i + mean``.
    """

    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, values: np.ndarray) -> "Standardizer":
        """Mean and **unbiased** std (``ddof = 1``, as torch.std) of training targets ``[n]``."""
        values = np.asarray(values, np.float64)
        if values.size < 2:
            raise ValueError(f"need at least 2 training targets to standardise, got {values.size}")
        std = float(np.std(values, ddof=1))
        if not np.isfinite(std) or std <= 0:
            raise ValueError(f"training targets have std {std}; cannot standardise")
        return cls(float(np.mean(values)), std)

    def normalize(self, y):
        return (y - self.mean) / self.std

    def denormalize(self, z):
        return z * self.std + self.mean


# Published test MAEs in the papers' units (docs/spec/published-results.md §1, §3); read through
# mspec.training.downstream (Downstream.published).
PUBLISHED_QM9 = {
    "Frad": dict(mu=0.010, alpha=0.0374, homo=15.3, lumo=13.7, gap=27.8, r2=0.3419, zpve=1.418,
                 U0=5.33, U=5.62, H=5.55, G=6.19, cv=0.020),
    "Coord (Frad table)": dict(mu=0.012, alpha=0.0517, homo=17.7, lumo=14.3, gap=31.8, r2=0.4496,
                               zpve=1.71, U0=6.57, U=6.11, H=6.45, G=6.91, cv=0.020),
    "MolSpectra": dict(mu=0.011, homo=15.5, lumo=13.1, gap=26.8, U0=5.67, U=5.45, H=5.87, G=6.18),
    "Coord (MolSpectra table)": dict(mu=0.016, homo=17.7, lumo=14.7, gap=31.8, U0=6.57, U=6.11,
                                     H=6.45, G=6.91),
    "TorchMD-Net": dict(mu=0.011, homo=20.3, lumo=17.5, gap=36.1, U0=6.15, U=6.38, H=6.16, G=7.62),
}
# Force MAE (kcal/mol/Å) on original MD17, by number of training frames.
PUBLISHED_MD17_FORCES = {
    9500: {
        "Frad": dict(aspirin=0.0680, benzene=0.1606, ethanol=0.0332, malonaldehyde=0.0427,
                     naphthalene=0.0277, salicylic=0.0410, toluene=0.0305, uracil=0.0323),
        "TorchMD-Net": dict(aspirin=0.1216, benzene=0.1479, ethanol=0.0492, malonaldehyde=0.0695,
                            naphthalene=0.0390, salicylic=0.0655, toluene=0.0393, uracil=0.0484),
        "Coord": dict(aspirin=0.0920, benzene=0.1397, ethanol=0.0402, malonaldehyde=0.0661,
                      naphthalene=0.0544, salicylic=0.0790, toluene=0.0495, uracil=0.0507),
    },
    950: {
        "Frad": dict(aspirin=0.2087, benzene=0.1994, ethanol=0.0910, malonaldehyde=0.1415,
                     naphthalene=0.0530, salicylic=0.1081, toluene=0.0540, uracil=0.0760),
        "TorchMD-Net": dict(aspirin=0.2450, benzene=0.2187, ethanol=0.1067, malonaldehyde=0.1667,
                            naphthalene=0.0593, salicylic=0.1284, toluene=0.0644, uracil=0.0887),
    },
}
