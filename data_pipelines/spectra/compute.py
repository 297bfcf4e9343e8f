"""One molecule in, one stick-spectra record out: GFN2-xTB IR/Raman and B3LYP/def2-SVP + sTDA UV.

`compute_record` raises `MoleculeFailure` with a short `kind` ("bad input", "SCF not converged",
"imaginary frequency left", ...) that the driver writes to the failure report.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.spectra import sticks
from data_pipelines.spectra.inputs import MoleculeInput
from data_pipelines.spectra.stda import EXACT_EXCHANGE, UVError, uv_spectrum
from data_pipelines.spectra.vibrations import (
    BOHR_ANGSTROM,
    MASSES,
    VibrationError,
    vibrational_spectrum,
)
from data_pipelines.spectra.xtb import XTBError

MIN_DISTANCE_ANGSTROM = 0.5
# Decimal places stored per field (Å, cm^-1, km/mol, Å^4/amu, eV, dimensionless).
DECIMALS = {"positions": 5, "vib_freq_cm1": 2, "ir_intensity_km_mol": 4,
            "raman_activity_a4_amu": 4, "uv_energy_ev": 4, "uv_osc_strength": 6}


@dataclasses.dataclass(frozen=True)
class SpectraConfig:
    gtol: float = 1e-4  # Eh/bohr, largest gradient component at convergence
    imaginary_cutoff_cm1: float = -20.0
    xc: str = "b3lyp"
    basis: str = "def2-svp"
    stda_threshold_ev: float = 16.0  # sTDA E_thr (CSF selection)
    uv_max_ev: float = 15.0  # keep excitations up to this energy
    skip_uv: bool = False  # IR/Raman only (UV lists stay empty)


class MoleculeFailure(RuntimeError):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def level_of_theory(config: SpectraConfig) -> dict:
    """The description stored in meta.json; a run refuses to append to a file made otherwise."""
    from importlib.metadata import version

    return {
        "vibrational": "GFN2-xTB (tblite, SCF accuracy 0.01), harmonic; Hessian by central "
                       "differences of analytic gradients (h = 0.005 bohr); Raman from 19 "
                       "uniform-field gradients (F = 1e-3 au, SCF accuracy 0.001); "
                       "translations/rotations projected out; isotope masses",
        "electronic": ("none" if config.skip_uv else
                       f"{config.xc.upper()}/{config.basis} (PySCF, density fitting, grid level 0, "
                       f"conv 1e-6) + sTDA (Grimme 2013, published parameters, "
                       f"E_thr {config.stda_threshold_ev} eV), singlets up to "
                       f"{config.uv_max_ev} eV"),
        "geometry": f"GFN2-xTB minimum (L-BFGS, max gradient {config.gtol} Eh/bohr; "
                    f"re-optimised along a mode below {config.imaginary_cutoff_cm1} cm^-1)",
        "stored_decimals": DECIMALS,
        "units": {"vib_freq_cm1": "cm^-1", "ir_intensity_km_mol": "km/mol",
                  "raman_activity_a4_amu": "Å^4/amu (45 a'^2 + 7 g'^2)",
                  "uv_energy_ev": "eV", "uv_osc_strength": "dimensionless", "positions": "Å"},
        "config": dataclasses.asdict(config),
        "versions": {"tblite": version("tblite"), "pyscf": version("pyscf")},
        "not_qm9s": "NOT the DFT-level QM9S data (B3LYP/def2-TZVP Hessians and TDDFT)",
    }


def check_input(mol: MoleculeInput) -> None:
    """Raises MoleculeFailure("bad input") for unreadable, unsupported or unphysical molecules."""
    if mol.error:
        raise MoleculeFailure("bad input", f"{mol.where}: {mol.error}")
    z = np.asarray(mol.numbers)
    if z.size < 2:
        raise MoleculeFailure("bad input", f"{mol.where}: needs at least 2 atoms, got {z.size}")
    unknown = sorted({int(a) for a in z if int(a) not in MASSES})
    if unknown:
        raise MoleculeFailure("bad input", f"{mol.where}: unsupported atomic number(s) {unknown}")
    pos = np.asarray(mol.positions, np.float64)
    if pos.shape != (z.size, 3) or not np.all(np.isfinite(pos)):
        raise MoleculeFailure("bad input", f"{mol.where}: positions must be finite [{z.size}, 3]")
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(z.size) * 1e9
    if dist.min() < MIN_DISTANCE_ANGSTROM:
        i, j = np.unravel_index(np.argmin(dist), dist.shape)
        raise MoleculeFailure("bad input", f"{mol.where}: atoms {i} and {j} are "
                                           f"{dist.min():.3f} Å apart")
    if (int(z.sum()) - mol.charge) % 2:
        raise MoleculeFailure("bad input", f"{mol.where}: odd number of electrons (open shell is "
                                           "not supported)")


def compute_record(mol: MoleculeInput, config: SpectraConfig = SpectraConfig()
                   ) -> sticks.StickRecord:
    """IR, Raman and UV sticks of one molecule at its GFN2-xTB minimum."""
    check_input(mol)
    if config.xc.lower() not in EXACT_EXCHANGE:
        raise ValueError(f"sTDA needs the exact-exchange fraction of {config.xc!r}")
    try:
        vib = vibrational_spectrum(mol.numbers, mol.positions, charge=mol.charge, gtol=config.gtol,
                                   imaginary_cutoff_cm1=config.imaginary_cutoff_cm1)
    except VibrationError as e:
        raise MoleculeFailure(e.kind, f"{mol.where}: {e}") from e
    except XTBError as e:
        raise MoleculeFailure("GFN2 failed", f"{mol.where}: {e}") from e
    pos_angstrom = vib.positions_bohr * BOHR_ANGSTROM
    if config.skip_uv:
        uv_e, uv_f = np.zeros(0), np.zeros(0)
    else:
        try:
            uv = uv_spectrum(mol.numbers, pos_angstrom, charge=mol.charge, xc=config.xc,
                             basis=config.basis, e_thr_ev=config.stda_threshold_ev,
                             max_energy_ev=config.uv_max_ev)
        except UVError as e:
            raise MoleculeFailure(e.kind, f"{mol.where}: {e}") from e
        uv_e, uv_f = uv.energy_ev, uv.osc_strength
    # Rounded far below the method's accuracy (and the 1 cm^-1 / 0.02 eV grids) to keep the JSON
    # small: about 5 KB per QM9 molecule instead of 12 KB at full float64 repr.
    return sticks.StickRecord(
        qm9_index=int(mol.index), smiles=mol.smiles,
        atomic_numbers=np.asarray(mol.numbers, np.int64),
        positions=np.round(pos_angstrom, DECIMALS["positions"]),
        vib_freq_cm1=np.round(vib.freq_cm1, DECIMALS["vib_freq_cm1"]),
        ir_intensity_km_mol=np.round(vib.ir_km_mol, DECIMALS["ir_intensity_km_mol"]),
        raman_activity_a4_amu=np.round(vib.raman_a4_amu, DECIMALS["raman_activity_a4_amu"]),
        uv_energy_ev=np.round(uv_e, DECIMALS["uv_energy_ev"]),
        uv_osc_strength=np.round(uv_f, DECIMALS["uv_osc_strength"]))
