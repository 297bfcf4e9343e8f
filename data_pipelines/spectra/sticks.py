"""Stick spectra on disk: one JSON object per line (`.jsonl`, or gzip-compressed `.jsonl.gz`).

A record holds, for one molecule, the geometry the spectra were computed at and the line lists:

    {"qm9_index": 17,                      # 1-based QM9/GDB-9 index (our `qm9` builder's `index`)
     "smiles": "CC(C)=O",
     "atomic_numbers": [6, 6, ...],         # [n_atoms]
     "positions": [[x, y, z], ...],         # [n_atoms, 3] Å, geometry the spectra belong to
     "vib_freq_cm1": [...],                 # [n_modes] harmonic wavenumbers, cm^-1
     "ir_intensity_km_mol": [...],          # [n_modes] IR intensities, km/mol
     "raman_activity_a4_amu": [...],        # [n_modes] Raman activities, Å^4/amu
     "uv_energy_ev": [...],                 # [n_states] excitation energies, eV
     "uv_osc_strength": [...]}              # [n_states] oscillator strengths (dimensionless)

The format is append-only so a long computation can write a molecule as soon as it is done and
resume after a kill: `append` writes a whole line then flushes and fsyncs, and `read_finished`
ignores (and reports) a torn last line. Readers of a finished file (`read`) treat any bad line as an
error naming the file and line. The level of theory and units of a whole file live in a `meta.json`
next to it (written by the computation pipeline).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Iterator

import numpy as np

SPECTRA = ("uv", "ir", "raman")
_STICK_FIELDS = {
    "uv": ("uv_energy_ev", "uv_osc_strength"),
    "ir": ("vib_freq_cm1", "ir_intensity_km_mol"),
    "raman": ("vib_freq_cm1", "raman_activity_a4_amu"),
}
MAX_Z = 100


class StickFormatError(ValueError):
    """A stick file or record is malformed; the message names the file, line and fault."""


@dataclasses.dataclass(frozen=True)
class StickRecord:
    qm9_index: int
    smiles: str
    atomic_numbers: np.ndarray  # [n_atoms] int
    positions: np.ndarray  # [n_atoms, 3] float64, Å
    vib_freq_cm1: np.ndarray  # [n_modes]
    ir_intensity_km_mol: np.ndarray  # [n_modes]
    raman_activity_a4_amu: np.ndarray  # [n_modes]
    uv_energy_ev: np.ndarray  # [n_states]
    uv_osc_strength: np.ndarray  # [n_states]

    def sticks(self, spectrum: str) -> tuple[np.ndarray, np.ndarray]:
        """(positions [n], intensities [n]) of one spectrum type: "uv", "ir" or "raman"."""
        if spectrum not in _STICK_FIELDS:
            raise KeyError(f"unknown spectrum type {spectrum!r}; choose one of {SPECTRA}")
        pos, inten = _STICK_FIELDS[spectrum]
        return getattr(self, pos), getattr(self, inten)

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}
        return json.dumps(d, separators=(",", ":"))


def from_dict(d: dict, where: str) -> StickRecord:
    """Validates a decoded record; `where` ("file:line") prefixes every error."""
    try:
        z = np.asarray(d["atomic_numbers"], dtype=np.int64)
        pos = np.asarray(d["positions"], dtype=np.float64)
        arrays = {k: np.asarray(d[k], dtype=np.float64) for k in
                  ("vib_freq_cm1", "ir_intensity_km_mol", "raman_activity_a4_amu",
                   "uv_energy_ev", "uv_osc_strength")}
        index, smiles = int(d["qm9_index"]), str(d["smiles"])
    except KeyError as e:
        raise StickFormatError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise StickFormatError(f"{where}: malformed field ({e})") from None
    if z.ndim != 1 or z.size == 0 or z.min() < 1 or z.max() > MAX_Z:
        raise StickFormatError(f"{where}: atomic_numbers must be 1..{MAX_Z}, got {z.tolist()}")
    if pos.shape != (z.size, 3):
        raise StickFormatError(
            f"{where}: {z.size} atoms but positions have shape {list(pos.shape)}")
    for name, arr in arrays.items():
        if arr.ndim != 1:
            raise StickFormatError(f"{where}: {name} must be a flat list")
        if not np.all(np.isfinite(arr)):
            raise StickFormatError(f"{where}: {name} contains NaN or inf")
    if not np.all(np.isfinite(pos)):
        raise StickFormatError(f"{where}: positions contain NaN or inf")
    for a, b in (("vib_freq_cm1", "ir_intensity_km_mol"), ("vib_freq_cm1", "raman_activity_a4_amu"),
                 ("uv_energy_ev", "uv_osc_strength")):
        if arrays[a].shape != arrays[b].shape:
            raise StickFormatError(
                f"{where}: {a} has {arrays[a].size} entries but {b} has {arrays[b].size}")
    for name in ("ir_intensity_km_mol", "raman_activity_a4_amu", "uv_osc_strength"):
        if arrays[name].size and arrays[name].min() < 0:
            raise StickFormatError(f"{where}: {name} has a negative intensity "
                                   f"({arrays[name].min():.4g})")
    return StickRecord(qm9_index=index, smiles=smiles, atomic_numbers=z, positions=pos, **arrays)


def _open_text(path: str, mode: str):
    if path.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read(path: str) -> Iterator[StickRecord]:
    """Yields every record of a finished stick file; any bad line is a StickFormatError."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"stick-spectra file not found: {path}")
    seen: set[int] = set()
    try:
        with _open_text(path, "r") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise StickFormatError(f"{where}: not valid JSON ({e.msg})") from None
                rec = from_dict(d, where)
                if rec.qm9_index in seen:
                    raise StickFormatError(f"{where}: duplicate qm9_index {rec.qm9_index}")
                seen.add(rec.qm9_index)
                yield rec
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise StickFormatError(f"{path}: corrupt or truncated file ({e})") from None


def append(path: str, record: StickRecord) -> None:
    """Appends one record as a whole line, then flushes to disk (crash-safe append)."""
    if path.endswith(".gz"):
        raise ValueError("append to an uncompressed .jsonl file; compress it when finished")
    with open(path, "a", encoding="utf-8") as f:
        f.write(record.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_finished(path: str) -> tuple[list[StickRecord], int]:
    """Records of a file that may have been cut by a kill, and the number of torn lines dropped.

    A torn (incomplete) last line is removed from the file so appending can continue cleanly.
    A bad line anywhere else is still an error: that is corruption, not an interrupted append.
    """
    if not os.path.exists(path):
        return [], 0
    with open(path, "rb") as f:
        data = f.read()
    torn = 0
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        torn = 1
    return list(read(path)), torn


def write_meta(directory: str, meta: dict) -> None:
    """Writes `meta.json` (level of theory, units, program versions, ...) atomically."""
    tmp = os.path.join(directory, "meta.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, "meta.json"))


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: every stick-spectra directory needs one")
    with open(path, encoding="utf-8") as f:
        return json.load(f)

