"""Readers for QM9S spectra: stick files (broadened here), MolSpectra's processed ``.pt``, and the
figshare ``*_boraden.csv`` release. Each yields one :class:`Spectra` per molecule, keyed by QM9 index.

Grids (``docs/spec/data-notes.md`` §3.4, §6.5): UV 1.0-15.0 eV step 0.02 (701 points); IR and
Raman 500-4000 cm^-1 step 1 (3501 points). Spectra are unnormalised float32.

Every fault raises :class:`QM9SSourceError` naming the file and the record: a spectrum of the wrong
length, NaN/inf, a negative intensity, a truncated/corrupt file, a CSV header that is not the
expected grid, out-of-step CSV rows.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from typing import Iterator

import numpy as np

from data_pipelines import torch_pickle
from data_pipelines.spectra import broadening, sticks

SPECTRUM_LENGTHS = {"uv": 701, "ir": 3501, "raman": 3501}
GRIDS = {"uv": broadening.UV_GRID_EV, "ir": broadening.VIB_GRID_CM1,
         "raman": broadening.VIB_GRID_CM1}
PT_NAME = "data_with_uv_ir_raman.pt"
CSV_NAMES = {"uv": "uv_boraden.csv", "ir": "ir_boraden.csv", "raman": "raman_boraden.csv"}
QM9S_PT = "qm9s.pt"
STICK_NAMES = ("sticks.jsonl", "sticks.jsonl.gz")

RELEASE_HINT = {
    PT_NAME: "MolSpectra's qm9sp.zip (OSF; link in the MolSpectra README), unpacked so that "
             "<dir>/processed/data_with_uv_ir_raman.pt exists",
    "csv": "QM9S on figshare, https://doi.org/10.6084/m9.figshare.24235333",
}


class QM9SSourceError(RuntimeError):
    """A QM9S source file is missing or malformed; the message names the file, record and fault."""


@dataclasses.dataclass
class Spectra:
    qm9_index: int
    uv: np.ndarray  # [701] float32
    ir: np.ndarray  # [3501] float32
    raman: np.ndarray  # [3501] float32
    where: str  # "file:record", for error messages
    atomic_numbers: np.ndarray | None = None  # [n] if the source carries them (to check the join)


def check_spectrum(name: str, values, where: str) -> np.ndarray:
    """[L] float32 after checking length, finiteness and sign; errors name ``where``."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    want = SPECTRUM_LENGTHS[name]
    if arr.size != want:
        raise QM9SSourceError(f"{where}: {name} spectrum has {arr.size} points, expected {want}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise QM9SSourceError(f"{where}: {name} spectrum has NaN/inf at point {bad}")
    if arr.min() < 0:
        bad = int(np.argmin(arr))
        raise QM9SSourceError(f"{where}: {name} spectrum has a negative intensity "
                              f"{arr[bad]:.4g} at point {bad}")
    return arr.astype(np.float32)


def find_stick_file(directory: str) -> str:
    for name in STICK_NAMES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise QM9SSourceError(
        f"no stick-spectra file in {directory} (expected one of {list(STICK_NAMES)} and meta.json). "
        "Compute it with the spectra pipeline (data_pipelines/spectra) or point source_dir to it."
    )


def read_sticks(directory: str, line_shapes: dict | None = None) -> tuple[Iterator[Spectra], dict]:
    """``(spectra iterator, meta.json)`` for a stick-spectra directory, broadened on the QM9S grids.

    ``line_shapes`` maps "uv"/"ir"/"raman" to ``(shape, width)``; default
    :data:`broadening.DEFAULTS`.
    """
    path = find_stick_file(directory)
    try:
        meta = sticks.read_meta(directory)
    except FileNotFoundError as e:
        raise QM9SSourceError(str(e)) from None
    except ValueError as e:
        raise QM9SSourceError(f"{directory}/meta.json: not valid JSON ({e})") from None
    shapes = {k: (v[1], v[2]) for k, v in broadening.DEFAULTS.items()}
    shapes.update(line_shapes or {})

    def generate():
        try:
            for lineno, rec in enumerate(sticks.read(path), 1):
                where = f"{path}:record {lineno} (qm9_index {rec.qm9_index})"
                out = {}
                for name in SPECTRUM_LENGTHS:
                    shape, width = shapes[name]
                    out[name] = check_spectrum(
                        name, broadening.broaden_record(rec, name, shape, width), where)
                yield Spectra(rec.qm9_index, where=where, atomic_numbers=rec.atomic_numbers, **out)
        except sticks.StickFormatError as e:
            raise QM9SSourceError(str(e)) from None

    return generate(), {**meta, "line_shapes": {k: list(v) for k, v in shapes.items()}}


def find_release(directory: str) -> tuple[str, str]:
    """``("pt", path)`` for MolSpectra's processed file, else ``("csv", directory)``."""
    for cand in (os.path.join(directory, "processed", PT_NAME), os.path.join(directory, PT_NAME)):
        if os.path.isfile(cand):
            return "pt", cand
    missing = [n for n in (*CSV_NAMES.values(), QM9S_PT)
               if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise QM9SSourceError(
            f"{directory}: no QM9S release found. Expected either processed/{PT_NAME} "
            f"({RELEASE_HINT[PT_NAME]}) or the figshare files {list(CSV_NAMES.values())} + "
            f"{QM9S_PT} ({RELEASE_HINT['csv']}); missing {missing}"
        )
    return "csv", directory


def _qm9_index_from_name(name, where: str) -> int:
    if isinstance(name, bytes):
        name = name.decode()
    if isinstance(name, (list, tuple)) and len(name) == 1:
        name = name[0]
    text = str(name)
    if not text.startswith("gdb_") or not text[4:].isdigit():
        raise QM9SSourceError(f"{where}: name {text!r} is not gdb_<QM9 index>")
    return int(text[4:])


class PtRelease:
    """MolSpectra's ``data_with_uv_ir_raman.pt`` read without torch; random access by graph.

    ``indices[g]`` is the QM9 index of graph ``g`` (from ``name`` = ``gdb_<index>``); ``self[g]``
    reads and checks that graph's spectra from the memory-mapped storages.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._arrays, self._slices = torch_pickle.pyg_collated(torch_pickle.load(path), path)
        except torch_pickle.TorchFileError as e:
            raise QM9SSourceError(str(e)) from None
        needed = ["uv", "ir", "raman", "name", "z"]
        missing = [k for k in needed if k not in self._arrays or k not in self._slices]
        if missing:
            raise QM9SSourceError(f"{path}: PyG dataset lacks key(s) {missing} "
                                  f"(has {sorted(self._arrays)})")
        count = len(self._slices["name"]) - 1
        for k in needed:
            if len(self._slices[k]) - 1 != count:
                raise QM9SSourceError(f"{path}: key {k!r} has {len(self._slices[k]) - 1} graphs, "
                                      f"'name' has {count}")
        self.indices = [_qm9_index_from_name(self._item("name", g), f"{path}:graph {g}")
                        for g in range(count)]

    def _item(self, key, g):
        return torch_pickle.graph_item(self._arrays, self._slices, key, g)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, g: int) -> Spectra:
        where = f"{self.path}:graph {g} (gdb_{self.indices[g]})"
        try:
            out = {k: check_spectrum(k, self._item(k, g), where) for k in SPECTRUM_LENGTHS}
            z = self._item("z", g).astype(np.int32)
        except QM9SSourceError:
            raise
        except (ValueError, OSError, IndexError) as e:  # e.g. a memory map past a short file
            raise QM9SSourceError(f"{where}: cannot read ({e})") from None
        return Spectra(self.indices[g], where=where, atomic_numbers=z, **out)


def _csv_grid(header: list[str], name: str, where: str) -> None:
    try:
        grid = np.array([float(h) for h in header[1:]])
    except ValueError:
        raise QM9SSourceError(f"{where}: header is not a numeric grid ({header[:3]}...)") from None
    want = GRIDS[name]
    if grid.shape != want.shape or not np.allclose(grid, want, atol=1e-6):
        raise QM9SSourceError(f"{where}: header grid has {grid.size} points "
                              f"[{grid[:1]}..{grid[-1:]}], expected {want.size} on "
                              f"{want[0]}..{want[-1]}")


def read_qm9s_numbers(path: str) -> np.ndarray:
    """[n] QM9 index (``number``) of every entry of the figshare ``qm9s.pt`` list (lazy tensors)."""
    try:
        obj = torch_pickle.load(path)
    except torch_pickle.TorchFileError as e:
        raise QM9SSourceError(str(e)) from None
    if not isinstance(obj, list):
        raise QM9SSourceError(f"{path}: expected a list of PyG Data objects, got {type(obj).__name__}")
    out = []
    for i, item in enumerate(obj):
        mapping = item.get("_store", item).get("_mapping", item) if isinstance(item, dict) else None
        if mapping is None or "number" not in mapping:
            raise QM9SSourceError(f"{path}: entry {i} has no 'number' (QM9 index)")
        out.append(int(np.asarray(mapping["number"]).reshape(-1)[0]))
    return np.asarray(out, np.int64)


class CsvRelease:
    """The figshare ``*_boraden.csv`` files, joined to QM9 indices through ``qm9s.pt``'s ``number``
    by row id, staged once into float32 ``.npy`` memory maps in ``staging_dir`` for random access.

    The three CSVs are read in lockstep (row ids must agree and be consecutive from 0). Third
    parties report ``qm9s.pt`` with one entry more than the CSVs
    (``docs/spec/data-notes.md`` §6.5): rows are matched by row id, and the entry counts are kept
    in :attr:`notes` for the build report.
    """

    def __init__(self, directory: str, staging_dir: str):
        numbers = read_qm9s_numbers(os.path.join(directory, QM9S_PT))
        paths = {k: os.path.join(directory, v) for k, v in CSV_NAMES.items()}
        csv.field_size_limit(sys.maxsize)
        with open(paths["uv"], "rb") as f:
            rows = max(0, sum(1 for _ in f) - 1)
        os.makedirs(staging_dir, exist_ok=True)
        self._data = {
            k: np.lib.format.open_memmap(os.path.join(staging_dir, f"{k}.npy"), mode="w+",
                                         dtype=np.float32, shape=(rows, SPECTRUM_LENGTHS[k]))
            for k in SPECTRUM_LENGTHS
        }
        self.directory = directory
        self.indices = self._stage(paths, numbers, rows)
        self.notes = {"qm9s_pt_entries": int(len(numbers)), "csv_rows": len(self.indices)}

    def _stage(self, paths, numbers, rows) -> list[int]:
        import tqdm  # noqa: PLC0415

        indices = []
        files = {k: open(p, newline="") for k, p in paths.items()}
        try:
            readers = {k: csv.reader(f) for k, f in files.items()}
            for k, r in readers.items():
                header = next(r, None)
                if header is None:
                    raise QM9SSourceError(f"{paths[k]}: empty file")
                _csv_grid(header, k, f"{paths[k]}:line 1")
            for row_id in tqdm.tqdm(range(rows + 1), total=rows, desc="QM9S CSV", unit="row"):
                lines = {k: next(r, None) for k, r in readers.items()}
                ended = [k for k, v in lines.items() if v is None]
                if ended:
                    if len(ended) != len(lines):
                        raise QM9SSourceError(
                            f"{paths[ended[0]]} ends at row {row_id} but "
                            f"{[paths[k] for k in lines if k not in ended]} go on (truncated file?)")
                    break
                if row_id >= rows:
                    raise QM9SSourceError(f"{paths['uv']} has fewer rows than the other CSVs")
                for k, row in lines.items():
                    where = f"{paths[k]}:line {row_id + 2}"
                    if not row or row[0].strip() != str(row_id):
                        raise QM9SSourceError(f"{where}: row id {row[0] if row else None!r}, "
                                              f"expected {row_id} (rows out of step)")
                    try:
                        values = np.array(row[1:], dtype=np.float64)
                    except ValueError as e:
                        raise QM9SSourceError(f"{where}: non-numeric value ({e})") from None
                    self._data[k][row_id] = check_spectrum(k, values, where)
                if row_id >= len(numbers):
                    raise QM9SSourceError(f"{paths['uv']}:line {row_id + 2}: row {row_id} has no "
                                          f"entry in {QM9S_PT} ({len(numbers)} entries)")
                indices.append(int(numbers[row_id]))
        finally:
            for f in files.values():
                f.close()
        for arr in self._data.values():
            arr.flush()
        return indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, row: int) -> Spectra:
        return Spectra(self.indices[row], where=f"{self.directory} CSV row {row}",
                       **{k: np.array(v[row]) for k, v in self._data.items()})
