"""Streaming readers for the PCQM4Mv2 3D release (OGB-LSC), ``docs/spec/data-notes.md`` §6.4.

* ``pcqm4m-v2-train.sdf``: V2000 molblocks (``$$$$``-terminated) of the training split with DFT
  geometries and explicit H; entry ``i`` is molecule ``split_dict['train'][i]`` (or ``i`` without
  a split file).
* ``pcqm4m-v2_xyz/<start>_<end>/<idx>.xyz``: one xyz file per training molecule (atom count, a
  comment line that is usually blank, ``El x y z``), sorted by integer file name.
* ``data.csv.gz`` (``idx,smiles,homolumogap``; the gap is empty for the test sets), read in
  lockstep with the geometries since both are in ascending ``idx``.
* ``split_dict.pt``: ``{'train','valid','test-dev','test-challenge'}`` index arrays (read
  without torch).

Everything streams: memory does not grow with the number of molecules.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
from typing import Iterator

import numpy as np

from data_pipelines import torch_pickle

SDF = "pcqm4m-v2-train.sdf"
XYZ_DIR = "pcqm4m-v2_xyz"
CSV = "data.csv.gz"
SPLIT_DICT = "split_dict.pt"
NUM_TRAIN = 3_378_606
RELEASE = {
    SDF: "http://ogb-data.stanford.edu/data/lsc/pcqm4m-v2-train.sdf.tar.gz (unpack it)",
    CSV: "http://ogb-data.stanford.edu/data/lsc/pcqm4m-v2.zip (pcqm4m-v2/raw/data.csv.gz)",
    SPLIT_DICT: "http://ogb-data.stanford.edu/data/lsc/pcqm4m-v2.zip (pcqm4m-v2/split_dict.pt)",
    XYZ_DIR: "pcqm4m-v2_xyz.zip as used by MolSpectra / Frad (unzipped)",
}
_XYZ_NAME = re.compile(r"^(\d+)\.xyz$")


class PCQMSourceError(RuntimeError):
    """A PCQM4Mv2 file is missing, truncated or inconsistent (not a per-molecule skip)."""


def locate(directory: str, name: str, required: bool = True) -> str | None:
    """Finds ``name`` directly in ``directory`` or where OGB's zip puts it."""
    candidates = [os.path.join(directory, name),
                  os.path.join(directory, "pcqm4m-v2", name),
                  os.path.join(directory, "pcqm4m-v2", "raw", name)]
    for path in candidates:
        if os.path.exists(path):
            return path
    if required:
        raise PCQMSourceError(f"missing {name} in {directory} (looked at {candidates}); "
                              f"the public release is {RELEASE[name]}")
    return None


def read_split_dict(path: str) -> dict[str, np.ndarray]:
    try:
        obj = torch_pickle.load(path, mmap=False)
    except torch_pickle.TorchFileError as e:
        raise PCQMSourceError(str(e)) from None
    if not isinstance(obj, dict) or "train" not in obj:
        raise PCQMSourceError(f"{path}: expected a dict with a 'train' index array, got "
                              f"{type(obj).__name__} {sorted(obj) if isinstance(obj, dict) else ''}")
    return {k: np.asarray(v, np.int64).reshape(-1) for k, v in obj.items()}


def iter_sdf(path: str) -> Iterator[tuple[str, str]]:
    """``(molblock text, "file:molecule k")`` for each entry, reading line by line."""
    block: list[str] = []
    k = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("$$$$"):
                    yield "".join(block), f"{path}:molecule {k}"
                    block, k = [], k + 1
                else:
                    block.append(line)
    except OSError as e:
        raise PCQMSourceError(f"{path}: cannot read ({e})") from None
    if any(line.strip() for line in block):
        raise PCQMSourceError(f"{path}: molecule {k} is not terminated by $$$$ (truncated file?)")


def iter_xyz_dir(path: str) -> Iterator[tuple[int, str, str]]:
    """``(idx, file text, file path)`` for every ``<idx>.xyz`` under ``path``, by integer idx."""
    if not os.path.isdir(path):
        raise PCQMSourceError(f"{path} is not a directory; the public release is {RELEASE[XYZ_DIR]}")
    for block in sorted(os.listdir(path)):
        sub = os.path.join(path, block)
        if not os.path.isdir(sub):
            continue
        names = sorted((int(m.group(1)), n) for n in os.listdir(sub) if (m := _XYZ_NAME.match(n)))
        for idx, name in names:
            file = os.path.join(sub, name)
            with open(file, encoding="utf-8", errors="replace") as f:
                yield idx, f.read(), file


class CsvCursor:
    """Looks up ``(smiles, homolumogap)`` by ascending ``idx`` while streaming ``data.csv.gz``."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
            self._reader = csv.reader(self._file)
            header = next(self._reader)
        except (OSError, EOFError, StopIteration) as e:
            raise PCQMSourceError(f"{path}: cannot read the header ({e})") from None
        if [h.strip() for h in header[:3]] != ["idx", "smiles", "homolumogap"]:
            raise PCQMSourceError(f"{path}: header {header} is not idx,smiles,homolumogap")
        self._line = 1
        self._row: tuple[int, str, float] | None = None

    def _next(self):
        try:
            row = next(self._reader)
        except StopIteration:
            return None
        except (OSError, EOFError, gzip.BadGzipFile, csv.Error) as e:
            raise PCQMSourceError(f"{self.path}: truncated or corrupt near line {self._line + 1} "
                                  f"({type(e).__name__}: {e})") from None
        self._line += 1
        try:
            gap = float(row[2]) if len(row) > 2 and row[2].strip() else float("nan")
            return int(row[0]), row[1], gap
        except (ValueError, IndexError):
            raise PCQMSourceError(f"{self.path}:{self._line}: malformed row {row[:3]}") from None

    def get(self, idx: int) -> tuple[str, float]:
        while self._row is None or self._row[0] < idx:
            previous = self._row
            self._row = self._next()
            if self._row is None:
                raise PCQMSourceError(f"{self.path}: idx {idx} not found (file ends at line "
                                      f"{self._line}; truncated?)")
            if previous is not None and self._row[0] <= previous[0]:
                raise PCQMSourceError(f"{self.path}:{self._line}: idx {self._row[0]} is not "
                                      "ascending")
        if self._row[0] != idx:
            raise PCQMSourceError(f"{self.path}: idx {idx} not found (next row is {self._row[0]})")
        return self._row[1], self._row[2]

    def close(self):
        self._file.close()
