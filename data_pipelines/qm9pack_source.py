"""Reads the QM9 molecules that the `qm9pack` package ships (CSV files, no download).

qm9pack 1.0.3 holds the 130,831 characterised QM9 molecules (the set PyG and torchmd-net use) with
B3LYP/6-31G(2df,p) geometries and all scalar labels, in ``qm9pack/data/qm9_part{1,2,3}.csv``.
Array columns are text in Fortran/Mathematica style (``0.``, ``-7.E-6``), so they are parsed by
stripping brackets and commas rather than with ``json``.
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Iterator

import numpy as np

HARTREE_TO_EV = 27.211386246

ELEMENT_TO_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}

# (name, qm9pack column, factor to the stored unit, stored unit). The order and units follow the
# first 12 columns of PyG's QM9 `y` (energies in eV), followed by the rotational constants.
TARGETS = (
    ("mu", "Dipole_debye", 1.0, "D"),
    ("alpha", "Polarizability_bohr3", 1.0, "a0^3"),
    ("homo", "HOMO_au", HARTREE_TO_EV, "eV"),
    ("lumo", "LUMO_au", HARTREE_TO_EV, "eV"),
    ("gap", "HOMO_LUMO_gap_au", HARTREE_TO_EV, "eV"),
    ("r2", "R2_bohr2", 1.0, "a0^2"),
    ("zpve", "ZPVE_au", HARTREE_TO_EV, "eV"),
    ("U0", "InternalEnergy_0K_au", HARTREE_TO_EV, "eV"),
    ("U", "InternalEnergy_298K_au", HARTREE_TO_EV, "eV"),
    ("H", "Enthalphy_298K_au", HARTREE_TO_EV, "eV"),  # sic: the qm9pack column is misspelt
    ("G", "GibbsFreeEnergy_298K_au", HARTREE_TO_EV, "eV"),
    ("cv", "Heatcapacity_Cv_cal_mol_K", 1.0, "cal/mol/K"),
    ("A", "RotA_GHz", 1.0, "GHz"),
    ("B", "RotB_GHz", 1.0, "GHz"),
    ("C", "RotC_GHz", 1.0, "GHz"),
)
TARGET_NAMES = tuple(t[0] for t in TARGETS)
TARGET_UNITS = {t[0]: t[3] for t in TARGETS}

NUM_MOLECULES = 130_831


class QM9SourceError(RuntimeError):
    """A qm9pack file is missing or a record cannot be parsed."""


def qm9pack_files() -> list[str]:
    """Paths of the three qm9pack CSV parts, in molecule order."""
    try:
        import qm9pack  # noqa: PLC0415  (optional at import time of this module)
    except ImportError as e:
        raise QM9SourceError(
            "the `qm9pack` package is not installed; install it with `pip install qm9pack==1.0.3` "
            "(it ships QM9 as CSV files)"
        ) from e
    data = os.path.join(os.path.dirname(qm9pack.__file__), "data")
    files = [os.path.join(data, f"qm9_part{i}.csv") for i in (1, 2, 3)]
    for f in files:
        if not os.path.isfile(f):
            raise QM9SourceError(f"qm9pack data file is missing: {f} (reinstall qm9pack)")
    return files


def parse_numbers(text: str) -> np.ndarray:
    """Parses a bracketed Fortran-style number list such as ``[[0.,1.E-3],[2.5,-7.E-6]]``."""
    tokens = text.replace("[", " ").replace("]", " ").replace(",", " ").split()
    return np.array([float(t) for t in tokens], dtype=np.float64)


def parse_row(row: dict, where: str) -> dict:
    """Turns one qm9pack CSV row into a molecule record; errors name the file and row."""
    try:
        index = int(row["Index"])
        n_atoms = int(row["N_atoms"])
        symbols = [s.strip().strip("'\"") for s in row["Elements"].strip("[]").split(",")]
        unknown = sorted({s for s in symbols if s not in ELEMENT_TO_Z})
        if unknown:
            raise ValueError(f"unsupported element(s) {unknown}")
        z = np.array([ELEMENT_TO_Z[s] for s in symbols], np.int32)
        pos = parse_numbers(row["XYZ_Ang"])
        if len(z) != n_atoms or pos.size != 3 * n_atoms:
            raise ValueError(
                f"N_atoms={n_atoms} disagrees with {len(z)} elements / {pos.size // 3} coordinates"
            )
        if not np.all(np.isfinite(pos)):
            raise ValueError("non-finite coordinate")
        targets = np.array(
            [float(row[col].replace("*^", "e")) * factor for _, col, factor, _ in TARGETS],
            np.float64,
        )
    except (KeyError, ValueError) as e:
        raise QM9SourceError(f"{where}: cannot parse QM9 record: {e}") from e
    return {
        "index": index,
        "smiles": row["SMILES"],
        "atomic_numbers": z,
        "positions": pos.reshape(n_atoms, 3),
        "targets": targets,
    }


def raw_rows() -> Iterator[tuple[dict, str]]:
    """``(csv row dict, "file:line")`` for every qm9pack row, in order, without parsing geometry."""
    csv.field_size_limit(sys.maxsize)
    for path in qm9pack_files():
        with open(path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                yield row, f"{path}:{line}"


def read_qm9pack(limit: int | None = None) -> Iterator[dict]:
    """Yields QM9 records in qm9pack order (ascending QM9 index), optionally only the first ``limit``."""
    for count, (row, where) in enumerate(raw_rows(), start=1):
        yield parse_row(row, where)
        if limit is not None and count >= limit:
            return


def split_indices(n: int = NUM_MOLECULES, seed: int = 1, train: int = 110_000, val: int = 10_000):
    """The torchmd-net / PyG split: ``numpy.random.default_rng(seed).permutation(n)``.

    Returns:
      ``(train, validation, test)`` arrays of positions in the 130,831-molecule ordering.
    """
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:train], perm[train : train + val], perm[train + val :]
