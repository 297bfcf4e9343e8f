"""TFDS builder ``pcqm4mv2``: PCQM4Mv2 training molecules with DFT 3D geometries and Frad torsions.

Configs (the user's files, in ``--source_dir``; nothing is downloaded):
  * ``sdf``: ``pcqm4m-v2-train.sdf`` (from ``pcqm4m-v2-train.sdf.tar.gz``) + ``data.csv.gz``
    (+ ``split_dict.pt``, read without torch, to map SDF entry ``i`` to OGB ``idx``).
  * ``xyz``: the ``pcqm4m-v2_xyz/`` folder layout (MolSpectra / Frad) + ``data.csv.gz``.
  ``data.csv.gz`` and ``split_dict.pt`` may also sit where OGB's zip puts them
  (``pcqm4m-v2/raw/data.csv.gz``, ``pcqm4m-v2/split_dict.pt``).

Build::

    python -m data_pipelines.pcqm4mv2 --config sdf --source_dir ~/datasets/pcqm4mv2 \\
        --data_dir ~/tensorflow_datasets --num_workers 16

The 3.4 M-molecule build runs in two stages:
  1. *Staging* (parallel over processes, streaming, resumable): molecules are read in file order
     and processed in chunks of ``chunk_size`` (RDKit parse, Frad torsions) by a process pool with
     a bounded number of chunks in flight; each finished chunk is written to
     ``<data_dir>/pcqm4mv2_staging/<config>/chunk_NNNNNN.npz`` via an atomic rename, with a
     digest of its inputs (the molecules' source text, location and CSV row). After a kill or a
     failed build, rerunning the command skips the finished chunks whose inputs are unchanged and
     stages again those whose source files were fixed or replaced meanwhile. A progress bar
     shows molecules/s + ETA.
  2. *Writing*: the chunks are streamed into array_record files by TFDS, which writes into an
     ``incomplete.*`` directory and renames it only at the end, so a kill at any point leaves no
     dataset that looks complete. The staging directory is deleted after success.

Splits (MolSpectra's stage-1 rule): ``numpy.random.default_rng(1).permutation`` of the kept
molecules in file order; validation and test get ``min(100, max(1, n // 10))`` molecules each,
train the rest. All of them are OGB *training* molecules (only those have 3D structures).

Features: ``index`` (OGB idx), ``smiles`` (from ``data.csv.gz``), ``atomic_numbers [n] int32``,
``positions [n, 3] float32`` (Å, B3LYP/6-31G*), ``homolumogap`` (eV, float64), ``formal_charge``,
``torsions [t, 4]``, ``torsion_moving [t * n]``, ``torsion_status`` (as in the ``qm9`` builder).

Skip policy: a molecule RDKit cannot parse, an xyz file whose atom count disagrees with its
coordinates, an unknown element or non-finite coordinates is skipped and counted; the counts and
every skipped idx with its reason are in the metadata and in ``build_report.json`` next to the
dataset. Missing/truncated/corrupt files, a CSV out of step with the geometries, and (``sdf``) an
SDF whose entry count disagrees with ``split_dict['train']`` are errors.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import zipfile

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_pipelines import pcqm4mv2_source as src
from data_pipelines import torsions
from data_pipelines.local_builder import LocalBuilder
from data_pipelines.pcqm4mv2_source import PCQMSourceError

# 2: each chunk records the digest of its inputs (format-1 staging directories start over).
STAGING_FORMAT = 2
# Test hook: seconds to sleep after each staged chunk (lets tests kill a build mid-way).
_DELAY_ENV = "MSPEC_PCQM_TEST_CHUNK_DELAY_S"


def _symbol_to_z():
    from rdkit import Chem  # noqa: PLC0415

    table = Chem.GetPeriodicTable()
    return {table.GetElementSymbol(z): z for z in range(1, 119)}


def parse_sdf_entry(text: str, where: str):
    """``(record, None)`` or ``(None, skip reason)`` for one molblock."""
    from rdkit import Chem, rdBase  # noqa: PLC0415

    with rdBase.BlockLogs():
        mol = Chem.MolFromMolBlock(text, sanitize=True, removeHs=False)
    if mol is None:
        return None, "rdkit_cannot_parse"
    if mol.GetNumConformers() == 0:
        return None, "no_coordinates"
    pos = np.asarray(mol.GetConformer().GetPositions(), np.float64)
    if not np.all(np.isfinite(pos)):
        return None, "non_finite_coordinates"
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], np.int32)
    if z.min() < 1:
        return None, "dummy_atom"
    tors = torsions.find_torsions(mol)
    status = torsions.STATUS_OK if len(tors) else torsions.STATUS_NO_TORSION
    moving = torsions.moving_masks(mol, tors) if len(tors) else np.zeros((0, len(z)), bool)
    return {"atomic_numbers": z, "positions": pos, "formal_charge": Chem.GetFormalCharge(mol),
            "torsions": tors, "moving": moving, "status": status}, None


def parse_xyz_entry(text: str, smiles: str, symbol_to_z: dict):
    """``(record, None)`` or ``(None, skip reason)`` for one xyz file (line 2 may be anything)."""
    from rdkit import Chem, rdBase  # noqa: PLC0415

    lines = text.splitlines()
    try:
        n = int(lines[0].split()[0])
    except (IndexError, ValueError):
        return None, "bad_atom_count_line"
    atom_lines = [ln.split() for ln in lines[2:] if ln.strip()]
    if len(atom_lines) != n or any(len(t) < 4 for t in atom_lines):
        return None, "atom_count_mismatch"
    symbols = [t[0] for t in atom_lines]
    if any(s not in symbol_to_z for s in symbols):
        return None, "unknown_element"
    try:
        pos = np.array([[float(c) for c in t[1:4]] for t in atom_lines], np.float64)
    except ValueError:
        return None, "bad_coordinate"
    if not np.all(np.isfinite(pos)):
        return None, "non_finite_coordinates"
    z = np.array([symbol_to_z[s] for s in symbols], np.int32)
    with rdBase.BlockLogs():
        template = Chem.MolFromSmiles(smiles) if smiles else None
    charge = Chem.GetFormalCharge(template) if template is not None else 0
    meta = torsions.torsion_metadata(z, pos, smiles=smiles, charge=charge)
    return {"atomic_numbers": z, "positions": pos, "formal_charge": charge, **meta}, None


def input_digest(config: str, entries) -> str:
    """Hash of everything a chunk is made from (each molecule's idx, source text and location,
    CSV SMILES and gap): a staged chunk is reused only while its inputs are unchanged."""
    digest = hashlib.blake2b(f"{STAGING_FORMAT}\0{config}".encode(), digest_size=20)
    for idx, text, where, smiles, gap in entries:
        digest.update(f"\0{idx}\0{where}\0{smiles}\0{gap!r}\0".encode())
        digest.update(text.encode() if isinstance(text, str) else text)
    return digest.hexdigest()


def staged_digest(path: str) -> str | None:
    """The input digest a staged chunk was made from; None if absent or unreadable."""
    try:
        with np.load(path) as d:
            return str(d["input_digest"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def process_chunk(job) -> tuple[int, int, int]:
    """Worker: parses one chunk of molecules and writes ``out_path`` atomically.

    ``job = (config, chunk_id, entries, out_path, digest)`` with entries ``(idx, text, where,
    smiles, gap)`` and ``digest`` their :func:`input_digest`. Returns ``(chunk_id, kept,
    skipped)``.
    """
    config, chunk_id, entries, out_path, digest = job
    symbol_to_z = _symbol_to_z() if config == "xyz" else None
    kept, skips = [], []
    for idx, text, where, smiles, gap in entries:
        if config == "sdf":
            rec, reason = parse_sdf_entry(text, where)
        else:
            rec, reason = parse_xyz_entry(text, smiles, symbol_to_z)
        if rec is None:
            skips.append((idx, f"{reason} ({where})"))
        else:
            kept.append({**rec, "idx": idx, "smiles": smiles, "gap": gap})
    _write_chunk(out_path, kept, skips, digest)
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    return chunk_id, len(kept), len(skips)


def _write_chunk(path: str, kept: list[dict], skips: list, digest: str) -> None:
    n_atoms = np.array([len(r["atomic_numbers"]) for r in kept], np.int64)
    n_tors = np.array([len(r["torsions"]) for r in kept], np.int64)
    cat = lambda key, shape, dtype: (np.concatenate([np.asarray(r[key], dtype).reshape(shape)  # noqa: E731
                                                     for r in kept]) if kept
                                     else np.zeros((0,) + shape[1:], dtype))
    arrays = {
        "idx": np.array([r["idx"] for r in kept], np.int64),
        "n_atoms": n_atoms,
        "n_torsions": n_tors,
        "atomic_numbers": cat("atomic_numbers", (-1,), np.int32),
        "positions": cat("positions", (-1, 3), np.float32),
        "gap": np.array([r["gap"] for r in kept], np.float64),
        "formal_charge": np.array([r["formal_charge"] for r in kept], np.int32),
        "smiles": np.array([r["smiles"] for r in kept], dtype=str),
        "status": np.array([r["status"] for r in kept], dtype=str),
        "torsions": cat("torsions", (-1, 4), np.int32),
        "moving": cat("moving", (-1,), bool),
        "skip_idx": np.array([s[0] for s in skips], np.int64),
        "skip_reason": np.array([s[1] for s in skips], dtype=str),
        "input_digest": np.array(digest),
    }
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a chunk file exists only when complete


def iter_chunk(path: str):
    """Molecule dicts of one staged chunk, in file order."""
    with np.load(path) as d:
        a = {k: d[k] for k in d.files}
    atom_off = np.concatenate([[0], np.cumsum(a["n_atoms"])])
    tors_off = np.concatenate([[0], np.cumsum(a["n_torsions"])])
    mov_off = np.concatenate([[0], np.cumsum(a["n_atoms"] * a["n_torsions"])])
    for m in range(len(a["idx"])):
        yield {
            "index": int(a["idx"][m]),
            "smiles": str(a["smiles"][m]),
            "atomic_numbers": a["atomic_numbers"][atom_off[m]:atom_off[m + 1]],
            "positions": a["positions"][atom_off[m]:atom_off[m + 1]],
            "homolumogap": float(a["gap"][m]),
            "formal_charge": int(a["formal_charge"][m]),
            "torsions": a["torsions"][tors_off[m]:tors_off[m + 1]],
            "torsion_moving": a["moving"][mov_off[m]:mov_off[m + 1]],
            "torsion_status": str(a["status"][m]),
        }


def split_positions(n: int) -> dict[str, np.ndarray]:
    """MolSpectra's rule: seed-1 permutation; validation/test of min(100, max(1, n // 10))."""
    k = min(100, max(1, n // 10))
    perm = np.random.default_rng(1).permutation(n)
    return {"train": perm[2 * k:], "validation": perm[:k], "test": perm[k:2 * k]}


class Stager:
    """Stage 1: streams the source into finished chunk files; resumable; bounded memory."""

    def __init__(self, config: str, source_dir: str, staging_dir: str, chunk_size: int,
                 num_workers: int):
        self.config, self.source_dir, self.dir = config, source_dir, staging_dir
        self.chunk_size, self.num_workers = chunk_size, num_workers

    def chunk_path(self, c: int) -> str:
        return os.path.join(self.dir, f"chunk_{c:06d}.npz")

    def _params(self) -> dict:
        return {"format": STAGING_FORMAT, "config": self.config,
                "source_dir": os.path.abspath(self.source_dir), "chunk_size": self.chunk_size}

    def _prepare_dir(self) -> None:
        params_path = os.path.join(self.dir, "params.json")
        if os.path.isfile(params_path):
            with open(params_path) as f:
                old = json.load(f)
            if old == self._params():
                return
            print(f"PCQM4Mv2: staging in {self.dir} was made with {old}; starting over",
                  file=sys.stderr)
            shutil.rmtree(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        with open(params_path + ".tmp", "w") as f:
            json.dump(self._params(), f)
        os.replace(params_path + ".tmp", params_path)

    def _entries(self):
        """``(idx, text, where, smiles, gap)`` in file order, CSV read in lockstep."""
        csv_cursor = src.CsvCursor(src.locate(self.source_dir, src.CSV))
        split_path = src.locate(self.source_dir, src.SPLIT_DICT, required=False)
        train = src.read_split_dict(split_path)["train"] if split_path else None
        try:
            if self.config == "sdf":
                sdf = src.locate(self.source_dir, src.SDF)
                count = 0
                for i, (text, where) in enumerate(src.iter_sdf(sdf)):
                    if train is not None and i >= len(train):
                        raise PCQMSourceError(f"{sdf}: more molecules than the {len(train)} "
                                              f"training indices of {split_path}")
                    idx = int(train[i]) if train is not None else i
                    smiles, gap = csv_cursor.get(idx)
                    count += 1
                    yield idx, text, where, smiles, gap
                if train is not None and count != len(train):
                    raise PCQMSourceError(f"{sdf}: {count} molecules but {split_path} lists "
                                          f"{len(train)} training indices (truncated SDF?)")
            else:
                folder = src.locate(self.source_dir, src.XYZ_DIR)
                for idx, text, path in src.iter_xyz_dir(folder):
                    smiles, gap = csv_cursor.get(idx)
                    yield idx, text, path, smiles, gap
        finally:
            csv_cursor.close()

    def _jobs(self):
        chunk, c = [], 0
        for entry in self._entries():
            chunk.append(entry)
            if len(chunk) == self.chunk_size:
                yield c, chunk
                chunk, c = [], c + 1
        if chunk:
            yield c, chunk

    def run(self) -> int:
        """Stages every chunk not yet finished, or made from other inputs than the current
        source (files fixed or replaced after a failed build); returns the number of chunks.

        The source is streamed again on every run, even when all chunks are staged: only the
        per-chunk input digest tells a fixed file from the one that was staged.
        """
        self._prepare_dir()
        total = None
        split_path = src.locate(self.source_dir, src.SPLIT_DICT, required=False)
        if split_path:
            total = len(src.read_split_dict(split_path)["train"])
        bar = tqdm.tqdm(total=total, desc=f"PCQM4Mv2 {self.config}", unit="mol", smoothing=0.05)
        n_chunks, resumed, stale = 0, 0, 0
        pending = collections.OrderedDict()
        pool = None
        if self.num_workers > 1:
            pool = concurrent.futures.ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            for c, entries in self._jobs():
                n_chunks = c + 1
                digest = input_digest(self.config, entries)
                if os.path.isfile(self.chunk_path(c)):
                    if staged_digest(self.chunk_path(c)) == digest:
                        resumed += 1
                        bar.update(len(entries))
                        continue
                    stale += 1
                job = (self.config, c, entries, self.chunk_path(c), digest)
                if pool is None:
                    process_chunk(job)
                    bar.update(len(entries))
                    continue
                pending[c] = (pool.submit(process_chunk, job), len(entries))
                while len(pending) >= 2 * self.num_workers:  # bounded memory
                    _, (fut, n) = pending.popitem(last=False)
                    fut.result()
                    bar.update(n)
            for fut, n in pending.values():
                fut.result()
                bar.update(n)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            bar.close()
        if resumed:
            print(f"PCQM4Mv2: resumed, {resumed} of {n_chunks} chunks were already staged",
                  file=sys.stderr)
        if stale:
            print(f"PCQM4Mv2: {stale} staged chunk(s) were made from other input than the "
                  "current source files and were staged again", file=sys.stderr)
        return n_chunks


class PCQM4Mv2(LocalBuilder):
    """PCQM4Mv2 training molecules with 3D DFT geometries and Frad torsions."""

    name = "pcqm4mv2"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "SDF and xyz-folder layouts, Frad torsions, counted skips."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="sdf", description="pcqm4m-v2-train.sdf + data.csv.gz"),
        tfds.core.BuilderConfig(name="xyz", description="pcqm4m-v2_xyz/ + data.csv.gz"),
    ]
    DEFAULT_CONFIG_NAME = "sdf"

    def __init__(self, *args, source_dir: str | None = None, num_workers: int | None = None,
                 chunk_size: int = 2000, **kwargs):
        self._source_dir = source_dir
        self._num_workers = num_workers
        self._chunk_size = chunk_size
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "index": tfds.features.Scalar(np.int32),
                "smiles": tfds.features.Text(),
                "atomic_numbers": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "positions": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
                "homolumogap": tfds.features.Tensor(shape=(), dtype=np.float64,
                                                    encoding=tfds.features.Encoding.BYTES),
                "formal_charge": tfds.features.Scalar(np.int32),
                "torsions": tfds.features.Tensor(shape=(None, 4), dtype=np.int32),
                "torsion_moving": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                "torsion_status": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
            homepage="https://ogb.stanford.edu/docs/lsc/pcqm4mv2/",
            citation="Hu et al., OGB-LSC: A Large-Scale Challenge for Machine Learning on Graphs "
            "(2021); Nakata & Shimazaki, PubChemQC project, J. Chem. Inf. Model. 57, 1300 (2017).",
        )

    @property
    def staging_dir(self) -> str:
        return os.path.join(self._data_dir_root, "pcqm4mv2_staging", self.builder_config.name)

    def download_and_prepare(self, *args, **kwargs):
        """Builds the dataset (if needed) and its ``build_report.json``; a build that finished
        in this process deletes its staged chunks."""
        super().download_and_prepare(*args, **kwargs)
        if getattr(self, "_report", None) is not None:
            shutil.rmtree(self.staging_dir, ignore_errors=True)

    def _split_generators(self, dl_manager):
        from data_pipelines.qm9 import _manual_dir  # noqa: PLC0415

        source_dir = self._source_dir or _manual_dir(dl_manager)
        if not source_dir:
            raise PCQMSourceError(
                "pcqm4mv2 reads the user's PCQM4Mv2 files: pass source_dir= (--source_dir) "
                f"holding {src.CSV} and " + (src.SDF if self.builder_config.name == "sdf"
                                             else src.XYZ_DIR + "/"))
        workers = self._num_workers or max(1, os.cpu_count() or 1)
        n_chunks = Stager(self.builder_config.name, source_dir, self.staging_dir,
                          self._chunk_size, workers).run()
        chunks = [os.path.join(self.staging_dir, f"chunk_{c:06d}.npz") for c in range(n_chunks)]

        # One streaming pass for counts and skips (chunk files are small and local).
        sizes, skips, statuses, atoms_max, atoms_sum, tors_max = [], [], collections.Counter(), 0, 0, 0
        for path in chunks:
            with np.load(path) as d:
                sizes.append(len(d["idx"]))
                skips += [(int(i), str(r)) for i, r in zip(d["skip_idx"], d["skip_reason"])]
                statuses.update(str(s) for s in d["status"])
                if len(d["n_atoms"]):
                    atoms_max = max(atoms_max, int(d["n_atoms"].max()))
                    atoms_sum += int(d["n_atoms"].sum())
                    tors_max = max(tors_max, int(d["n_torsions"].max()))
        n = sum(sizes)
        if n == 0:
            raise PCQMSourceError(f"{source_dir}: no molecule could be read")
        splits = split_positions(n)
        reasons = collections.Counter(r.split(" (")[0] for _, r in skips)
        meta = {
            "source": os.path.abspath(source_dir),
            "num_molecules": n,
            "skipped": len(skips),
            "skip_reasons": dict(reasons),
            "split_sizes": {k: int(len(v)) for k, v in splits.items()},
            "torsion_status_counts": dict(statuses),
            "coord_noise_fallback": sum(v for k, v in statuses.items() if k != "ok"),
            "num_atoms_mean": atoms_sum / n,
            "num_atoms_max": atoms_max,
            "num_torsions_max": tors_max,
            "level_of_theory": "B3LYP/6-31G* (PubChemQC); homolumogap in eV",
        }
        self.info.metadata.update(meta)
        self._report = {**meta, "skipped_molecules": [{"idx": i, "reason": r} for i, r in skips]}
        print(f"PCQM4Mv2: {n} molecules, {len(skips)} skipped {dict(reasons)}", file=sys.stderr)
        return {name: self._generate_examples(chunks, pos)
                for name, pos in self.drop_empty_splits(splits).items()}

    def _generate_examples(self, chunks, positions):
        rank = np.full(int(positions.max()) + 1, -1, np.int64)
        rank[positions] = np.arange(len(positions))
        p = 0
        for path in chunks:
            for ex in iter_chunk(path):
                if p < len(rank) and rank[p] >= 0:
                    yield int(rank[p]), {**ex, "torsions": ex["torsions"].reshape(-1, 4)}
                p += 1


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Build the PCQM4Mv2 3D TFDS dataset.")
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--config", default="sdf", choices=["sdf", "xyz"])
    parser.add_argument("--source_dir", required=True)
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument("--chunk_size", type=int, default=2000)
    args = parser.parse_args(argv)
    builder = PCQM4Mv2(config=args.config, data_dir=args.data_dir, source_dir=args.source_dir,
                       num_workers=args.num_workers, chunk_size=args.chunk_size,
                       file_format="array_record")
    builder.download_and_prepare()
    print(f"prepared {builder.data_dir}")


if __name__ == "__main__":
    main()
