"""Real QM9 molecules for benchmarks, taken from the ``qm9pack`` CSV files.

This module depends only on numpy and the standard library (plus the data files of the
``qm9pack`` package), so it can be used both from the mspec environment and from the
separate PyTorch reference environment.

The benchmark protocol (``docs/spec/benchmark-protocol.md`` §5) requires that mspec and the
PyTorch reference (torchmd-net) train on *identical* molecules in *identical* batches.
The two helpers here serve that purpose:

* :func:`load_qm9_sample` draws a deterministic random subset of the 130,831 QM9
  molecules (B3LYP geometries in Angstrom) and returns atomic numbers and positions;
* :func:`save_batches_npz` writes consecutive batches of those molecules to one ``.npz``
  file as flat (concatenated) arrays, the layout both implementations consume;
  :func:`load_batches_npz` reads it back.

CSV layout (see ``docs/spec/data-notes.md`` §1): one molecule per line,
columns ``XYZ_file, Index, SMILES, InChi, N_atoms, Stoichiometry, Elements, XYZ_Ang, ...``.
``Elements`` is a Python-style list of element symbols (``['C','H',...]``) and ``XYZ_Ang``
a nested list of coordinates written in Fortran/Mathematica style (``0.``, ``-7.E-6``),
which ``json`` cannot always parse; we strip brackets and commas and call ``float`` on
each token instead.
"""

from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "QM9_NUM_MOLECULES",
    "qm9_csv_paths",
    "load_qm9_sample",
    "load_qm9_labeled_sample",
    "save_batches_npz",
    "load_batches_npz",
]

#: Number of characterised QM9 molecules shipped by qm9pack 1.0.3.
QM9_NUM_MOLECULES = 130_831

_CSV_NAMES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
_SYMBOL_TO_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
_ELEMENTS_COL = 6
_XYZ_COL = 7
_NATOMS_COL = 4

# (path, size, mtime) -> number of data rows; avoids recounting within one process.
_ROW_COUNT_CACHE: Dict[Tuple[str, int, float], int] = {}

Molecule = Tuple[np.ndarray, np.ndarray]


def qm9_csv_paths(data_dir: Optional[str] = None) -> List[str]:
    """Return the paths of the three qm9pack geometry CSV files, in order.

    Args:
        data_dir: Directory holding ``qm9_part{1,2,3}.csv``. Defaults to the ``data``
            folder of the installed ``qm9pack`` package (located without importing it,
            falling back to an import).

    Raises:
        FileNotFoundError: If the directory or one of the files is missing.
    """
    if data_dir is None:
        data_dir = _find_qm9pack_data_dir()
    paths = [os.path.join(data_dir, name) for name in _CSV_NAMES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"qm9pack CSV files not found: {missing}")
    return paths


def _find_qm9pack_data_dir() -> str:
    """Locate ``qm9pack/data`` of the installed qm9pack package."""
    import importlib.util

    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "qm9pack is not installed (pip install qm9pack==1.0.3), "
            "or pass data_dir= pointing at its data folder"
        )
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "data")
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(f"no data folder in qm9pack at {list(spec.submodule_search_locations)}")


def _count_rows(path: str) -> int:
    """Count the data rows (lines minus the header) of one CSV file, quickly.

    qm9pack's CSV files hold exactly one record per line (no quoted newlines), so a
    byte-level newline count is exact.
    """
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime)
    if key not in _ROW_COUNT_CACHE:
        lines = 0
        last = b"\n"
        with open(path, "rb") as fh:
            while True:
                chunk = fh.read(1 << 24)
                if not chunk:
                    break
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        if last != b"\n":  # final line without a trailing newline
            lines += 1
        _ROW_COUNT_CACHE[key] = lines - 1  # header
    return _ROW_COUNT_CACHE[key]


def _parse_floats(text: str) -> List[float]:
    """Parse a (nested) list of numbers written as text, tolerant of ``0.``/``-7.E-6``."""
    cleaned = text.replace("[", " ").replace("]", " ").replace(",", " ")
    return [float(tok) for tok in cleaned.split()]


def _parse_row(line: str) -> Molecule:
    """Parse one CSV line into (atomic numbers int32 [n], positions float32 [n, 3])."""
    row = next(csv.reader([line]))
    symbols = [s.strip().strip("'\"") for s in row[_ELEMENTS_COL].strip("[] ").split(",")]
    try:
        z = np.array([_SYMBOL_TO_Z[s] for s in symbols], dtype=np.int32)
    except KeyError as exc:  # pragma: no cover - QM9 only has H, C, N, O, F
        raise ValueError(f"unknown element {exc} in row {row[0]}") from None
    coords = _parse_floats(row[_XYZ_COL])
    n_atoms = int(row[_NATOMS_COL])
    if len(z) != n_atoms or len(coords) != 3 * n_atoms:
        raise ValueError(
            f"inconsistent row {row[0]}: N_atoms={n_atoms}, {len(z)} elements, "
            f"{len(coords)} coordinates"
        )
    pos = np.asarray(coords, dtype=np.float32).reshape(n_atoms, 3)
    return z, pos


def _select_rows(n: int, seed: int, data_dir: Optional[str]) -> Tuple[List[str], List[str]]:
    """The CSV lines of the ``n`` molecules drawn by :func:`load_qm9_sample`, in draw order, and
    the header's column names."""
    paths = qm9_csv_paths(data_dir)
    counts = [_count_rows(p) for p in paths]
    total = int(sum(counts))
    if not 1 <= n <= total:
        raise ValueError(f"n must be in [1, {total}], got {n}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(total, size=n, replace=False)

    # Map each global row index to its position(s) in the output list.
    wanted: Dict[int, int] = {int(g): k for k, g in enumerate(chosen)}
    out: List[Optional[str]] = [None] * n
    header: List[str] = []
    offset = 0
    for path, count in zip(paths, counts):
        lo, hi = offset, offset + count
        local = sorted(g - lo for g in wanted if lo <= g < hi)
        offset = hi
        if not local:
            continue
        targets = iter(local)
        target = next(targets)
        with open(path, "r", encoding="utf-8", newline="") as fh:
            header = next(csv.reader([fh.readline()]))
            for i, line in enumerate(fh):
                if i != target:
                    continue
                out[wanted[lo + i]] = line
                target = next(targets, None)
                if target is None:
                    break
    if any(m is None for m in out):  # pragma: no cover - would mean a malformed file
        raise RuntimeError("failed to read some selected QM9 rows")
    return out, header  # type: ignore[return-value]


def load_qm9_sample(
    n: int, seed: int = 0, data_dir: Optional[str] = None
) -> List[Molecule]:
    """Draw ``n`` distinct QM9 molecules deterministically at random.

    The selection is ``numpy.random.default_rng(seed).choice(N, n, replace=False)`` over
    the global row index ``0 .. N-1`` of the concatenated ``qm9_part{1,2,3}.csv`` files
    (N = 130,831 for qm9pack 1.0.3), so it is reproducible across processes, machines and
    environments. Molecules are returned in that (random) draw order. Only the selected
    lines are CSV-parsed; the rest of each file is merely scanned.

    Args:
        n: Number of molecules (1 <= n <= N).
        seed: Seed of the numpy ``Generator`` used for the selection.
        data_dir: Optional directory with the qm9pack CSV files (see
            :func:`qm9_csv_paths`).

    Returns:
        List of ``(atomic_numbers, positions)`` with ``atomic_numbers`` int32 ``[n_i]``
        and ``positions`` float32 ``[n_i, 3]`` in Angstrom.
    """
    lines, _ = _select_rows(n, seed, data_dir)
    return [_parse_row(line) for line in lines]


def load_qm9_labeled_sample(
    n: int, column: str, seed: int = 0, data_dir: Optional[str] = None
) -> Tuple[List[Molecule], np.ndarray]:
    """The molecules of :func:`load_qm9_sample` (same selection) and one label column.

    Args:
        n, seed, data_dir: as in :func:`load_qm9_sample`.
        column: a qm9pack CSV column holding one number per molecule, e.g. ``"HOMO_au"``
            (Hartree; multiply by 27.211386246 for eV).

    Returns:
        ``(molecules, labels float64 [n])`` in the draw order.
    """
    lines, header = _select_rows(n, seed, data_dir)
    if column not in header:
        raise ValueError(f"no column {column!r} in the qm9pack CSV; columns: {header}")
    col = header.index(column)
    labels = np.array([float(next(csv.reader([line]))[col]) for line in lines], np.float64)
    return [_parse_row(line) for line in lines], labels


def save_batches_npz(
    path: str,
    molecules: Sequence[Molecule],
    batch_size: int,
    drop_remainder: bool = True,
    *,
    targets: Optional[Sequence[float]] = None,
    forces: Optional[Sequence[np.ndarray]] = None,
    scalars: Optional[Dict[str, float]] = None,
    per_molecule: Optional[Dict[str, Sequence[np.ndarray]]] = None,
) -> int:
    """Write consecutive batches of ``batch_size`` molecules to one ``.npz`` file.

    Batch ``b`` holds ``molecules[b * batch_size:(b + 1) * batch_size]`` as flat arrays:

    * ``z_{b}``     int32   ``[A_b]``     atomic numbers of all its atoms, concatenated;
    * ``pos_{b}``   float32 ``[A_b, 3]``  positions in Angstrom;
    * ``batch_{b}`` int32   ``[A_b]``     molecule index within the batch (0 .. size-1);

    * ``y_{b}``      float64 ``[size]``   one label per molecule (with ``targets``);
    * ``forces_{b}`` float32 ``[A_b, 3]`` per-atom forces (with ``forces``);
    * ``<name>_{b}`` float32 ``[size, L]`` one fixed-length vector per molecule for every
      ``name`` of ``per_molecule`` (e.g. the spectra ``uv``, ``ir``, ``raman``);

    plus the scalars ``num_batches``, ``batch_size`` and any of ``scalars`` (float64, e.g. the
    label standardiser's ``target_mean`` / ``target_std``). This is the layout
    ``benchmarks/torchmd_reference.py`` reads, and :func:`load_batches_npz` returns.

    Args:
        path: Output file (``.npz`` is appended by numpy if missing).
        molecules: ``(atomic_numbers, positions)`` pairs, e.g. from
            :func:`load_qm9_sample`.
        batch_size: Molecules per batch (>= 1).
        targets: Optional per-molecule labels, aligned with ``molecules``.
        forces: Optional per-molecule ``[n_i, 3]`` force arrays, aligned with ``molecules``.
        scalars: Optional named scalars stored as 0-d float64 arrays.
        per_molecule: Optional ``{name: [L] arrays aligned with molecules}``; the names must not
            clash with the keys above.
        drop_remainder: If True (default) a trailing incomplete batch is not written, so
            every batch has exactly ``batch_size`` molecules; if False it is kept.

    Returns:
        The number of batches written.

    Raises:
        ValueError: If no batch can be formed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(molecules)
    n_batches = n // batch_size if drop_remainder else -(-n // batch_size)
    if n_batches == 0:
        raise ValueError(
            f"{n} molecules are fewer than one batch of {batch_size} (drop_remainder=True)"
        )
    for name, labels in (("targets", targets), ("forces", forces), *(per_molecule or {}).items()):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} {name} for {n} molecules")
    arrays: Dict[str, np.ndarray] = {
        "num_batches": np.asarray(n_batches, dtype=np.int64),
        "batch_size": np.asarray(batch_size, dtype=np.int64),
    }
    for name, value in (scalars or {}).items():
        arrays[name] = np.asarray(value, dtype=np.float64)
    for b in range(n_batches):
        chunk = molecules[b * batch_size:(b + 1) * batch_size]
        arrays[f"z_{b}"] = np.concatenate([np.asarray(z, np.int32) for z, _ in chunk])
        arrays[f"pos_{b}"] = np.concatenate(
            [np.asarray(p, np.float32).reshape(-1, 3) for _, p in chunk]
        )
        arrays[f"batch_{b}"] = np.concatenate(
            [np.full(len(z), k, dtype=np.int32) for k, (z, _) in enumerate(chunk)]
        )
        lo, hi = b * batch_size, b * batch_size + len(chunk)
        if targets is not None:
            arrays[f"y_{b}"] = np.asarray(targets[lo:hi], dtype=np.float64)
        if forces is not None:
            arrays[f"forces_{b}"] = np.concatenate(
                [np.asarray(f, np.float32).reshape(-1, 3) for f in forces[lo:hi]]
            )
        for name, values in (per_molecule or {}).items():
            arrays[f"{name}_{b}"] = np.stack([np.asarray(v, np.float32) for v in values[lo:hi]])
    np.savez(path, **arrays)
    return n_batches


def load_batches_npz(path: str) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Read a file written by :func:`save_batches_npz`.

    Returns:
        List of ``(z int32 [A], pos float32 [A, 3], batch int32 [A])`` per batch.
    """
    with np.load(path) as data:
        n_batches = int(data["num_batches"])
        return [
            (data[f"z_{b}"], data[f"pos_{b}"], data[f"batch_{b}"]) for b in range(n_batches)
        ]


if __name__ == "__main__":  # small manual check / CLI
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Write QM9 benchmark batches to .npz")
    parser.add_argument("output", help="output .npz path")
    parser.add_argument("--molecules", type=int, default=1280)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    t0 = time.perf_counter()
    mols = load_qm9_sample(cli.molecules, seed=cli.seed)
    nb = save_batches_npz(cli.output, mols, cli.batch_size)
    atoms = sum(len(z) for z, _ in mols)
    print(
        f"wrote {nb} batches of {cli.batch_size} ({atoms / len(mols):.2f} atoms/molecule) "
        f"to {cli.output} in {time.perf_counter() - t0:.2f} s"
    )
