"""Readers for the two raw QM9 releases, giving the same records as :mod:`qm9pack_source`.

* The original figshare tarball ``dsgdb9nsd.xyz.tar.bz2`` (figshare 3195389, 133,885 xyz files)
  plus ``uncharacterized.txt`` (figshare 3195404), ``docs/spec/data-notes.md`` §6.1.
* The PyG / MoleculeNet raw layout ``gdb9.sdf`` + ``gdb9.sdf.csv`` + ``uncharacterized.txt``
  (``<root>/raw/`` of PyG's ``QM9``; also inside ``qm9.zip`` of deepchem), §6.2.

Both drop the 3,054 uncharacterised molecules and yield records in ascending QM9 index, each
``{"index", "smiles", "atomic_numbers" [n] int32, "positions" [n, 3] float64 Å, "targets" [15]}``
with ``targets`` in the order and units of :data:`qm9pack_source.TARGETS` (so the three sources
agree; the SDF has only 4 decimals in its coordinates, so positions agree to 5e-5 Å there).

SMILES: the xyz files carry the GDB-17 SMILES (taken, as in qm9pack) and the relaxed one; the SDF
carries none, so the PyG source uses RDKit's canonical SMILES (no stereo, H removed) of the SDF
molecule.
"""

from __future__ import annotations

import bz2
import csv
import os
import re
import tarfile
from typing import Iterator

import numpy as np
import tqdm

from data_pipelines.qm9pack_source import ELEMENT_TO_Z, QM9SourceError, TARGETS

XYZ_TARBALL = "dsgdb9nsd.xyz.tar.bz2"
UNCHARACTERIZED = "uncharacterized.txt"
PYG_SDF, PYG_CSV = "gdb9.sdf", "gdb9.sdf.csv"
NUM_UNCHARACTERIZED = 3054
NUM_RAW = 133_885

RELEASE_HINT = {
    XYZ_TARBALL: "https://doi.org/10.6084/m9.figshare.c.978904 (file 3195389)",
    UNCHARACTERIZED: "https://doi.org/10.6084/m9.figshare.c.978904 (file 3195404)",
    PYG_SDF: "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/molnet_publish/qm9.zip",
    PYG_CSV: "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/molnet_publish/qm9.zip",
}

# Property order on line 2 of every xyz file (after "gdb <index>"), in the xyz file's units.
XYZ_PROPERTIES = ("A", "B", "C", "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve",
                  "U0", "U", "H", "G", "cv")
# gdb9.sdf.csv column for each target name (same units as the xyz file: Hartree for energies).
PYG_COLUMNS = {"A": "A", "B": "B", "C": "C", "mu": "mu", "alpha": "alpha", "homo": "homo",
               "lumo": "lumo", "gap": "gap", "r2": "r2", "zpve": "zpve", "U0": "u0",
               "U": "u298", "H": "h298", "G": "g298", "cv": "cv"}

_MEMBER = re.compile(r"(?:^|/)dsgdb9nsd_(\d{6})\.xyz$")


def require_file(directory: str, name: str) -> str:
    """Path of ``directory/name``; a clear error naming the public release when it is absent."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        hint = RELEASE_HINT.get(name, "")
        raise QM9SourceError(
            f"missing file {path}" + (f"; the public release is at {hint}" if hint else "")
        )
    return path


def parse_float(token: str) -> float:
    """Parses a Mathematica/Fortran-style number: ``2.77*^-4``, ``0.``, ``-7.E-6``."""
    return float(token.replace("*^", "e"))


def _targets(values: dict[str, float]) -> np.ndarray:
    """[15] targets in qm9pack's order and units from raw values (Hartree energies)."""
    return np.array([values[name] * factor for name, _, factor, _ in TARGETS], np.float64)


def read_uncharacterized(path: str, expect_full: bool = True) -> set[int]:
    """QM9 indices listed in ``uncharacterized.txt`` (9 header lines, rows, 1 footer line).

    Rows are read with PyG's fixed ``[9:-2]`` slice of the ``\\n``-split text; every row must start
    with an integer, and the full release must list exactly 3,054 molecules.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")[9:-2]
    out = set()
    for lineno, line in enumerate(lines, start=10):
        tokens = line.split()
        if not tokens or not tokens[0].isdigit():
            raise QM9SourceError(f"{path}:{lineno}: expected a row starting with a QM9 index, "
                                 f"got {line[:60]!r}")
        out.add(int(tokens[0]))
    if expect_full and len(out) != NUM_UNCHARACTERIZED:
        raise QM9SourceError(f"{path}: lists {len(out)} molecules, expected "
                             f"{NUM_UNCHARACTERIZED} (truncated or wrong file?)")
    return out


def parse_xyz(text: str, where: str) -> dict:
    """One ``dsgdb9nsd_NNNNNN.xyz`` file -> record; errors name ``where`` and the fault."""
    lines = text.splitlines()
    try:
        n = int(lines[0].split()[0])
        head = lines[1].split()
        if head[0] != "gdb" or len(head) != 17:
            raise ValueError(f"line 2 must be 'gdb <index>' and 15 properties, got {len(head)} tokens")
        index = int(head[1])
        props = dict(zip(XYZ_PROPERTIES, (parse_float(t) for t in head[2:])))
        if len(lines) < n + 5:
            raise ValueError(f"atom count {n} disagrees with the file: {n} atoms need {n + 5} "
                             f"lines, the file has {len(lines)}")
        symbols, xyz = [], []
        for k in range(n):
            tok = lines[2 + k].split()
            if len(tok) != 5:
                raise ValueError(f"atom count {n} disagrees with the coordinate lines (line "
                                 f"{k + 3} has {len(tok)} fields, expected 'El x y z q')")
            symbols.append(tok[0])
            xyz.append([parse_float(t) for t in tok[1:4]])
        if lines[2 + n].split() and not _is_number(lines[2 + n].split()[0]):
            raise ValueError(f"atom count {n} disagrees with the coordinate lines (line {n + 3} "
                             f"is {lines[2 + n][:40]!r}, expected frequencies)")
        smiles = lines[3 + n].split()[0]
    except (IndexError, ValueError) as e:
        raise QM9SourceError(f"{where}: cannot parse QM9 xyz record: {e}") from None
    unknown = sorted(set(symbols) - set(ELEMENT_TO_Z))
    if unknown:
        raise QM9SourceError(f"{where}: unsupported element(s) {unknown}")
    pos = np.array(xyz, np.float64)
    if not np.all(np.isfinite(pos)) or not np.all(np.isfinite(list(props.values()))):
        raise QM9SourceError(f"{where}: NaN or inf in coordinates or properties")
    return {"index": index, "smiles": smiles,
            "atomic_numbers": np.array([ELEMENT_TO_Z[s] for s in symbols], np.int32),
            "positions": pos, "targets": _targets(props)}


def _is_number(token: str) -> bool:
    try:
        parse_float(token)
        return True
    except ValueError:
        return False


def read_xyz_tarball(directory: str, expect_full: bool = True) -> list[dict]:
    """Characterised molecules of ``dsgdb9nsd.xyz.tar.bz2`` in ascending QM9 index.

    Raises:
      QM9SourceError: a file is missing, the archive is truncated/corrupt, a member is malformed,
        or (``expect_full``) molecules are missing from the archive.
    """
    tar_path = require_file(directory, XYZ_TARBALL)
    skip = read_uncharacterized(require_file(directory, UNCHARACTERIZED), expect_full)
    records, seen = [], 0
    try:
        # bz2.open + a plain tar stream, not tarfile's "r|bz2": tarfile stops at the first short
        # read, so an archive cut after a compressed block (or missing its end-of-stream marker)
        # would read as a smaller, valid one. BZ2File raises EOFError on a missing end of stream.
        with bz2.open(tar_path, "rb") as compressed, \
                tarfile.open(fileobj=compressed, mode="r|") as tar:
            for member in tqdm.tqdm(tar, desc="xyz tarball", unit="file", total=NUM_RAW if expect_full else None):
                m = _MEMBER.search(member.name)
                if not member.isfile() or m is None:
                    continue
                seen += 1
                if int(m.group(1)) in skip:
                    continue
                where = f"{tar_path}:{member.name}"
                text = tar.extractfile(member).read().decode("ascii", errors="replace")
                rec = parse_xyz(text, where)
                if rec["index"] != int(m.group(1)):
                    raise QM9SourceError(f"{where}: file name says index {int(m.group(1))} but "
                                         f"line 2 says gdb {rec['index']}")
                records.append(rec)
            # The tar reader stops at the end-of-archive blocks; read on to the end of the bz2
            # stream so that a cut in the padding or in the stream trailer is seen too.
            while compressed.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, OSError) as e:
        raise QM9SourceError(f"{tar_path}: truncated or corrupt archive ({type(e).__name__}: {e})") from None
    if expect_full and seen != NUM_RAW:
        raise QM9SourceError(f"{tar_path}: holds {seen} xyz files, expected {NUM_RAW}")
    records.sort(key=lambda r: r["index"])
    return records


def read_pyg_raw(directory: str, expect_full: bool = True) -> Iterator[dict]:
    """Characterised molecules of the PyG raw layout (``gdb9.sdf`` + ``.csv``), in file order."""
    from rdkit import Chem, rdBase  # noqa: PLC0415

    sdf_path = require_file(directory, PYG_SDF)
    csv_path = require_file(directory, PYG_CSV)
    skip = read_uncharacterized(require_file(directory, UNCHARACTERIZED), expect_full)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ["mol_id", *PYG_COLUMNS.values()] if rows and c not in rows[0]]
    if missing:
        raise QM9SourceError(f"{csv_path}: missing column(s) {missing}")
    with open(sdf_path, "rb") as f:
        blocks = f.read().split(b"$$$$")
    if blocks and not blocks[-1].strip():
        blocks = blocks[:-1]
    else:
        raise QM9SourceError(f"{sdf_path}: does not end with '$$$$' (truncated file?)")
    if len(blocks) != len(rows):
        raise QM9SourceError(f"{sdf_path} has {len(blocks)} molecules but {csv_path} has "
                             f"{len(rows)} rows (truncated file?)")
    if expect_full and len(rows) != NUM_RAW:
        raise QM9SourceError(f"{csv_path}: {len(rows)} molecules, expected {NUM_RAW}")
    for pos, (block, row) in enumerate(zip(blocks, rows)):
        where = f"{sdf_path}:molecule {pos + 1}"
        text = block.decode("ascii", errors="replace").lstrip("\r\n")
        title = text.split("\n", 1)[0].strip()
        if title != row["mol_id"]:
            raise QM9SourceError(f"{where}: title {title!r} but {csv_path} row {pos + 2} is "
                                 f"{row['mol_id']!r} (files out of step)")
        try:
            index = int(title.removeprefix("gdb_"))
        except ValueError:
            raise QM9SourceError(f"{where}: title {title!r} is not gdb_<index>") from None
        if index in skip:
            continue
        with rdBase.BlockLogs():
            mol = Chem.MolFromMolBlock(text, sanitize=False, removeHs=False)
        if mol is None or mol.GetNumConformers() == 0:
            raise QM9SourceError(f"{where} ({title}): RDKit cannot parse the molblock")
        symbols = [a.GetSymbol() for a in mol.GetAtoms()]
        unknown = sorted(set(symbols) - set(ELEMENT_TO_Z))
        if unknown:
            raise QM9SourceError(f"{where} ({title}): unsupported element(s) {unknown}")
        pos_arr = np.array(mol.GetConformer().GetPositions(), np.float64)
        try:
            values = {name: parse_float(row[col]) for name, col in PYG_COLUMNS.items()}
        except ValueError as e:
            raise QM9SourceError(f"{csv_path} row {pos + 2} ({title}): {e}") from None
        if not np.all(np.isfinite(list(values.values()))) or not np.all(np.isfinite(pos_arr)):
            raise QM9SourceError(f"{where} ({title}): NaN or inf in coordinates or targets")
        yield {"index": index, "smiles": _canonical_smiles(mol),
               "atomic_numbers": np.array([ELEMENT_TO_Z[s] for s in symbols], np.int32),
               "positions": pos_arr, "targets": _targets(values)}


def _canonical_smiles(mol) -> str:
    from rdkit import Chem, rdBase  # noqa: PLC0415

    with rdBase.BlockLogs():
        try:
            m = Chem.Mol(mol)
            Chem.SanitizeMol(m)
            return Chem.MolToSmiles(Chem.RemoveHs(m), isomericSmiles=False)
        except Exception:  # noqa: BLE001  (keep the unsanitised SMILES)
            return Chem.MolToSmiles(mol, isomericSmiles=False)
