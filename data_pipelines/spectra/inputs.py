"""Molecules to compute spectra for: XYZ or SDF files with 3D coordinates, SMILES (RDKit ETKDG
conformer + MMFF), or QM9 molecules from qm9pack (by index or as a seeded random sample).

Every reader yields `MoleculeInput`s. A record that cannot be read becomes a `MoleculeInput` with
`error` set (so the driver reports it as "bad input" and goes on) rather than stopping the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

from data_pipelines import qm9pack_source

SYMBOL_TO_Z = {"H": 1, "He": 2, "Li": 3, "Be": 4, "B": 5, "C": 6, "N": 7, "O": 8, "F": 9,
               "Ne": 10, "Na": 11, "Mg": 12, "Al": 13, "Si": 14, "P": 15, "S": 16, "Cl": 17,
               "Ar": 18, "Br": 35, "I": 53}


@dataclasses.dataclass
class MoleculeInput:
    index: int  # QM9 index for QM9 inputs, else the 1-based record number in the input
    smiles: str
    numbers: np.ndarray  # [n_atoms] int
    positions: np.ndarray  # [n_atoms, 3] Å
    charge: int = 0
    where: str = ""  # "file:record" for error messages
    error: str | None = None  # set when the record could not be read


def _bad(index: int, where: str, message: str, text: str = "") -> MoleculeInput:
    """An unreadable record; ``text`` keeps the input as written (e.g. the bad SMILES), so the
    failure report shows it."""
    return MoleculeInput(index, text, np.zeros(0, np.int64), np.zeros((0, 3)), where=where,
                         error=message)


def record_location(source: str, record: int, line: int | None = None) -> str:
    """``"<source>:record <k> (line <n>)"``: the record number (the ``index`` of file inputs)
    and the line it starts on, which differ once a file has comments, blank lines or
    multi-line records."""
    return f"{source}:record {record}" + (f" (line {line})" if line is not None else "")


def read_xyz(path: str) -> Iterator[MoleculeInput]:
    """Multi-molecule XYZ: `n_atoms`, a comment line (used as the name/SMILES), n atom lines."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    pos, record = 0, 0
    while pos < len(lines):
        if not lines[pos].strip():
            pos += 1
            continue
        record += 1
        where = record_location(path, record, pos + 1)
        try:
            n = int(lines[pos].split()[0])
        except ValueError:
            yield _bad(record, where, f"expected an atom count, got {lines[pos]!r}")
            return  # the frame structure is lost; nothing after this can be trusted
        block = lines[pos + 2: pos + 2 + n]
        comment = lines[pos + 1].strip() if pos + 1 < len(lines) else ""
        pos += 2 + n
        if len(block) != n:
            yield _bad(record, where, f"file ends after {len(block)} of {n} atom lines")
            return
        try:
            numbers, coords = [], []
            for line in block:
                parts = line.split()
                sym = parts[0]
                z = int(sym) if sym.isdigit() else SYMBOL_TO_Z[sym.capitalize()]
                numbers.append(z)
                coords.append([float(v.replace("*^", "e")) for v in parts[1:4]])
            arr = np.array(coords, np.float64)
            if arr.shape != (n, 3):
                raise ValueError("an atom line has fewer than 3 coordinates")
        except (KeyError, ValueError, IndexError) as e:
            yield _bad(record, where, f"cannot parse atom lines: {e!r}")
            continue
        yield MoleculeInput(record, comment.split()[0] if comment else "",
                            np.array(numbers, np.int64), arr, where=where)


def _from_rdkit(mol, index: int, where: str, smiles: str | None = None) -> MoleculeInput:
    from rdkit import Chem

    conf = mol.GetConformer()
    if not conf.Is3D():
        return _bad(index, where, "the record has no 3D coordinates")
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], np.int64)
    pos = np.array(conf.GetPositions(), np.float64)
    return MoleculeInput(index, smiles or Chem.MolToSmiles(Chem.RemoveHs(mol)), numbers, pos,
                         charge=Chem.GetFormalCharge(mol), where=where)


def read_sdf(path: str) -> Iterator[MoleculeInput]:
    """SDF with explicit hydrogens and 3D coordinates (hydrogens are kept as written)."""
    from rdkit import Chem

    supplier = Chem.SDMolSupplier(path, removeHs=False, sanitize=True)
    for i, mol in enumerate(supplier, start=1):
        where = record_location(path, i)
        if mol is None:
            yield _bad(i, where, "RDKit cannot parse this record")
            continue
        yield _from_rdkit(mol, i, where)


def from_smiles(smiles_list: Iterable[str], seed: int = 0, where: str = "smiles",
                lines: list[int] | None = None) -> Iterator[MoleculeInput]:
    """3D molecules from SMILES: add hydrogens, ETKDG embedding (seeded), MMFF optimisation.

    ``lines``: the line each SMILES was read from, for error messages (``read_smiles_file``).
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    for i, smi in enumerate(smiles_list, start=1):
        loc = record_location(where, i, lines[i - 1] if lines else None)
        mol = Chem.MolFromSmiles(smi)
        if mol is None:
            yield _bad(i, loc, f"invalid SMILES {smi!r}", text=smi)
            continue
        mol = Chem.AddHs(mol)
        params = AllChem.ETKDGv3()
        params.randomSeed = seed
        if AllChem.EmbedMolecule(mol, params) != 0:
            yield _bad(i, loc, f"RDKit could not embed {smi!r} in 3D", text=smi)
            continue
        if AllChem.MMFFHasAllMoleculeParams(mol):
            AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
        yield _from_rdkit(mol, i, loc, smiles=smi)


def read_smiles_file(path: str, seed: int = 0) -> Iterator[MoleculeInput]:
    """One SMILES per line (first whitespace-separated token); blank lines and # comments skipped."""
    smiles, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, ln in enumerate(f, start=1):
            if ln.strip() and not ln.lstrip().startswith("#"):
                smiles.append(ln.split()[0])
                lines.append(lineno)
    yield from from_smiles(smiles, seed=seed, where=path, lines=lines)


def qm9_sample_positions(n: int, seed: int) -> np.ndarray:
    """Positions (0-based, qm9pack row order) of a seeded random sample of QM9.

    A prefix of one permutation, so a larger `n` with the same seed extends a smaller sample.
    """
    if not 0 < n <= qm9pack_source.NUM_MOLECULES:
        raise ValueError(f"sample size must be 1..{qm9pack_source.NUM_MOLECULES}, got {n}")
    return np.random.default_rng(seed).permutation(qm9pack_source.NUM_MOLECULES)[:n]


def read_qm9(positions: Iterable[int] | None = None, indices: Iterable[int] | None = None
             ) -> list[MoleculeInput]:
    """QM9 molecules from qm9pack, selected by row position (0-based) or by QM9 index (1-based).

    Returned in the order requested. An index that qm9pack does not have (one of the 3,054
    uncharacterised molecules, or out of range) is an error.
    """
    if (positions is None) == (indices is None):
        raise ValueError("give exactly one of `positions` or `indices`")
    want_pos = None if positions is None else [int(p) for p in positions]
    want_idx = None if indices is None else [int(i) for i in indices]
    pos_set = set(want_pos or ())
    idx_set = set(want_idx or ())
    by_pos, by_idx = {}, {}
    for p, (row, where) in enumerate(qm9pack_source.raw_rows()):
        if want_pos is not None and p in pos_set:
            by_pos[p] = qm9pack_source.parse_row(row, where)
        elif want_idx is not None and int(row["Index"]) in idx_set:
            rec = qm9pack_source.parse_row(row, where)
            by_idx[rec["index"]] = rec
        if len(by_pos) + len(by_idx) == len(pos_set) + len(idx_set):
            break  # everything found: skip the rest of the 130k rows
    if want_pos is not None:
        missing = sorted(pos_set - set(by_pos))
        if missing:
            raise ValueError(f"QM9 row positions out of range: {missing[:10]}")
        recs = [by_pos[p] for p in want_pos]
    else:
        missing = sorted(idx_set - set(by_idx))
        if missing:
            raise ValueError(f"QM9 indices not in qm9pack (uncharacterised or out of range): "
                             f"{missing[:10]}")
        recs = [by_idx[i] for i in want_idx]
    return [MoleculeInput(r["index"], r["smiles"], r["atomic_numbers"].astype(np.int64),
                          r["positions"], where=f"qm9 index {r['index']}") for r in recs]
