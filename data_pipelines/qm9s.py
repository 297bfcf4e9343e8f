"""TFDS builder ``qm9s``: QM9 molecules with UV, IR and Raman spectra (MolSpectra's pre-training set).

Configs:
  * ``gfn2`` (default): the stick spectra computed by this repository's spectra pipeline
    (GFN2-xTB IR/Raman, B3LYP/def2-SVP + sTDA UV; level of theory read from ``meta.json``),
    ``data_pipelines/spectra/data/qm9_gfn2/{sticks.jsonl[.gz], meta.json}`` unless ``source_dir``
    is given, broadened here onto the QM9S grids (:mod:`data_pipelines.spectra.broadening`).
  * ``gfn2_qm9train``: the same sticks, restricted to molecules of QM9's training split (the
    seed-1 110,000 of :func:`data_pipelines.qm9pack_source.split_indices`; the sticks were
    computed along a permutation of all of QM9, so about 16 % are QM9 validation/test molecules,
    counted as ``excluded_qm9_validation_or_test``). Use it when the encoder is judged on QM9:
    pre-training then never sees a held-out molecule (``experiments.reproduce`` does).
  * ``release``: the real QM9S spectra (B3LYP/def2-TZVP), from ``source_dir`` holding either
    MolSpectra's ``processed/data_with_uv_ir_raman.pt`` (OSF ``qm9sp.zip``; read without torch)
    or the figshare ``uv_boraden.csv``, ``ir_boraden.csv``, ``raman_boraden.csv`` + ``qm9s.pt``.

Build::

    python -m data_pipelines.qm9s --data_dir ~/tensorflow_datasets                     # gfn2
    python -m data_pipelines.qm9s --config release --source_dir ~/datasets/qm9sp

Each example has every feature of the ``qm9`` builder (index, pyg_idx, smiles, atomic_numbers,
positions = the QM9 B3LYP geometry from qm9pack joined by QM9 index, targets, Frad torsions) plus
unnormalised float32 spectra ``uv [701]`` (1-15 eV, step 0.02), ``ir [3501]`` and
``raman [3501]`` (500-4000 cm^-1, step 1). Normalisation (e.g. MolSpectra's ``log10(1 + s)``) is
left to the model/pipeline.

Splits: MolSpectra's ``numpy.random.default_rng(1).permutation`` of the molecules in source
order (``gfn2``: ascending QM9 index), 110,000 / 10,000 / rest when there are at least 120,000
molecules, else 80 / 10 / 10 %.

Skip policy: a spectrum whose QM9 index is not among qm9pack's 130,831 characterised molecules is
skipped and counted (``skipped_not_in_qm9`` in the metadata and ``build_report.json``). Any other
fault (wrong spectrum length, NaN/inf, negative intensity, atoms disagreeing with QM9, corrupt
file) is an error naming the file and record.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import os
import shutil
import sys
import tempfile

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_pipelines import qm9, qm9pack_source
from data_pipelines.local_builder import LocalBuilder
from data_pipelines.qm9s_source import (GRIDS, SPECTRUM_LENGTHS, CsvRelease, PtRelease,
                                        QM9SSourceError, find_release, find_stick_file,
                                        read_sticks)

def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _records_sha256(path: str, limit: int | None) -> str:
    """SHA-256 of the first ``limit`` records (non-blank lines, decompressed; None: all) of a
    stick file: what a ``gfn2`` version reads, so appending molecules to the file leaves the
    hash of an older version, and its prepared dataset, unchanged."""
    digest = hashlib.sha256()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        kept = 0
        for line in f:
            if limit is not None and kept >= limit:
                break
            if line.strip():
                digest.update(line.rstrip(b"\r\n") + b"\n")
                kept += 1
    return digest.hexdigest()


DEFAULT_GFN2_DIR = os.path.join(os.path.dirname(__file__), "spectra", "data", "qm9_gfn2")
SPLIT_NAMES = ("train", "validation", "test")
UNITS = {"uv": "oscillator strength per Gaussian peak height (dimensionless), grid in eV",
         "ir": "km/mol (peak height), grid in cm^-1",
         "raman": "A^4/amu (peak height), grid in cm^-1"}


# Versions of the ``gfn2`` configs. The shipped stick file only grows by appending, in the fixed
# sample order (``spectra/data/qm9_gfn2/README.md``), so an older version is the file's first
# ``GFN2_MOLECULES[version]`` molecules (None: all of them), and a study that names a version
# reads the same molecules whatever the file has grown to since.
GFN2_MOLECULES = {"1.0.0": 1119, "2.0.0": None}
GFN2_VERSION = "2.0.0"
GFN2_OLDER_VERSIONS = ["1.0.0"]
GFN2_RELEASE_NOTES = {
    "1.0.0": "The first 1,119 molecules of the shipped sticks (sample positions 0-1,127; 936 in "
             "QM9's training split): the set of the reproduction study's protocol v1.",
    "2.0.0": "Every molecule of the shipped sticks: 6,032 (sample positions 0-6,099), 5,033 of "
             "them in QM9's training split.",
}


def split_sizes(n: int) -> tuple[int, int]:
    """(train, validation) sizes; the rest is test."""
    if n >= 120_000:
        return 110_000, 10_000
    return int(round(0.8 * n)), int(round(0.1 * n))


class QM9S(LocalBuilder):
    """QM9 molecules + UV/IR/Raman spectra on the QM9S grids."""

    name = "qm9s"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "gfn2 stick spectra or the QM9S release, joined to qm9pack QM9."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="gfn2", description="Locally computed GFN2/sTDA sticks.",
                                version=GFN2_VERSION, supported_versions=GFN2_OLDER_VERSIONS,
                                release_notes=GFN2_RELEASE_NOTES),
        tfds.core.BuilderConfig(
            name="gfn2_qm9train",
            description="The gfn2 sticks of molecules in QM9's training split only (seed-1 "
            "110,000 / 10,000 / rest): pre-training on it never sees a QM9 validation or test "
            "molecule, which a study judged on QM9 needs.",
            version=GFN2_VERSION, supported_versions=GFN2_OLDER_VERSIONS,
            release_notes=GFN2_RELEASE_NOTES),
        tfds.core.BuilderConfig(name="release", description="The real QM9S spectra."),
    ]
    DEFAULT_CONFIG_NAME = "gfn2"

    def __init__(self, *args, source_dir: str | None = None, num_workers: int | None = None,
                 **kwargs):
        self._source_dir = source_dir
        self._num_workers = num_workers
        self._requested_version = kwargs.get("version")
        super().__init__(*args, **kwargs)

    @functools.cached_property
    def canonical_version(self) -> tfds.core.Version:
        # TFDS builds only a builder's newest version, on the assumption that older ones were
        # made by older code. Every gfn2 version is made by this code (a prefix of the stick
        # file, GFN2_MOLECULES), so the version asked for is the one this builder builds.
        requested = self._requested_version
        if (requested is not None and self.builder_config is not None
                and self.builder_config.name.startswith("gfn2")
                and str(requested) in GFN2_MOLECULES):
            return tfds.core.Version(str(requested))
        return super().canonical_version

    def _info(self) -> tfds.core.DatasetInfo:
        features = qm9.molecule_features()
        for name, length in SPECTRUM_LENGTHS.items():
            features[name] = tfds.features.Tensor(shape=(length,), dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
            homepage="https://doi.org/10.6084/m9.figshare.24235333",
            citation="Zou et al., A deep learning model for predicting selected organic molecular "
            "spectra, Nat. Comput. Sci. 3, 957 (2023) (QM9S); Ramakrishnan et al., Sci. Data 1, "
            "140022 (2014) (QM9).",
        )

    def download_and_prepare(self, *args, **kwargs):
        """Builds the dataset (if needed) and its ``build_report.json``; removes the CSV staging."""
        try:
            super().download_and_prepare(*args, **kwargs)
        finally:
            staging = getattr(self, "_staging_dir", None)
            if staging:
                shutil.rmtree(staging, ignore_errors=True)

    def source_changed(self) -> bool:
        """True when a prepared ``gfn2`` dataset was built from other stick spectra than the
        ones now in its source directory (e.g. the shipped file grew in a new release), so
        :func:`mspec.data.datasets.get_builder` rebuilds it instead of serving stale data."""
        if not self.builder_config.name.startswith("gfn2"):
            return False
        meta = self.info.metadata
        try:
            path = find_stick_file(self._source_dir or DEFAULT_GFN2_DIR)
        except QM9SSourceError:
            return False  # the source is gone; the prepared dataset is all there is
        if "source_records_sha256" in meta:
            limit = GFN2_MOLECULES[str(self.version)]
            try:
                current = _records_sha256(path, limit)
            except (OSError, EOFError):
                return True  # unreadable now: the rebuild names the file and its fault
            return meta["source_records_sha256"] != current
        # Built before the per-version hash: the whole file's (rebuilt once after it grows).
        return meta.get("source_sha256") != _sha256(path)

    # --- sources -----------------------------------------------------------------------------

    def _source(self, dl_manager):
        """``(store, info)``: random-access spectra (``len``, ``[i]``, ``.indices``) + metadata."""
        config = self.builder_config.name
        directory = self._source_dir or qm9._manual_dir(dl_manager)
        if config.startswith("gfn2"):
            directory = directory or DEFAULT_GFN2_DIR
            spectra, meta = read_sticks(directory)
            limit = GFN2_MOLECULES[str(self.version)]
            records = sorted(tqdm.tqdm(itertools.islice(spectra, limit), total=limit,
                                       desc="broaden sticks", unit="mol"),
                             key=lambda s: s.qm9_index)
            if limit is not None and len(records) < limit:
                raise QM9SSourceError(
                    f"{find_stick_file(directory)}: version {self.version} of qm9s/"
                    f"{config} is the first {limit} molecules of the stick file, which holds "
                    f"only {len(records)}")
            store = _ListStore(records)
            info = {"source": directory, "level_of_theory": meta.get("level_of_theory", meta),
                    "line_shapes": meta["line_shapes"],
                    "source_records_sha256": _records_sha256(find_stick_file(directory), limit)}
            return store, info
        if not directory:
            raise QM9SSourceError(
                "qm9s/release reads the QM9S release: pass source_dir= (--source_dir) holding "
                "processed/data_with_uv_ir_raman.pt or the figshare *_boraden.csv + qm9s.pt")
        kind, path = find_release(directory)
        if kind == "pt":
            store = PtRelease(path)
            info = {"source": path, "format": "MolSpectra processed .pt"}
        else:
            self._staging_dir = tempfile.mkdtemp(prefix="qm9s_staging_", dir=self._data_dir_root)
            store = CsvRelease(path, self._staging_dir)
            info = {"source": path, "format": "figshare CSV", **store.notes}
        info["level_of_theory"] = "B3LYP/def2-TZVP (QM9S release; UV from TDDFT)"
        return store, info

    def _split_generators(self, dl_manager):
        store, info = self._source(dl_manager)
        indices = list(store.indices)
        if len(set(indices)) != len(indices):
            dup = sorted({i for i in indices if indices.count(i) > 1})[:5]
            raise QM9SSourceError(f"{info['source']}: duplicate QM9 indices {dup}")
        qm9_records = _qm9pack_by_index(set(indices))
        kept = [p for p, i in enumerate(indices) if i in qm9_records]
        skipped = [i for i in indices if i not in qm9_records]
        if self.builder_config.name.startswith("gfn2") and skipped:
            raise QM9SSourceError(f"{info['source']}: stick spectra for QM9 indices {skipped[:5]} "
                                  "that are not characterised QM9 molecules in qm9pack")
        heldout = []
        if self.builder_config.name == "gfn2_qm9train":
            train_positions = set(qm9pack_source.split_indices()[0].tolist())
            heldout = [indices[p] for p in kept if qm9_records[indices[p]]["pyg_idx"] not in train_positions]
            kept = [p for p in kept if qm9_records[indices[p]]["pyg_idx"] in train_positions]
        if not kept:
            raise QM9SSourceError(f"{info['source']}: no molecule joins to QM9")

        n_train, n_val = split_sizes(len(kept))
        perm = np.random.default_rng(1).permutation(len(kept))
        splits = {"train": perm[:n_train], "validation": perm[n_train:n_train + n_val],
                  "test": perm[n_train + n_val:]}
        molecules = qm9.with_torsions_parallel(
            [qm9_records[indices[p]] for p in kept], self._num_workers)

        statuses = [m["status"] for m in molecules]
        n_atoms = np.array([len(m["atomic_numbers"]) for m in molecules])
        meta = {
            **info,
            "num_molecules": len(kept),
            "skipped_not_in_qm9": len(skipped),
            "excluded_qm9_validation_or_test": len(heldout),
            "split_sizes": {k: int(len(v)) for k, v in splits.items()},
            "torsion_status_counts": {s: statuses.count(s) for s in sorted(set(statuses))},
            "coord_noise_fallback": sum(s != "ok" for s in statuses),
            "num_atoms_mean": float(n_atoms.mean()),
            "num_atoms_max": int(n_atoms.max()),
            "num_torsions_max": int(max(len(m["torsions"]) for m in molecules)),
            "grids": {k: {"first": float(g[0]), "last": float(g[-1]), "points": int(g.size),
                          "unit": "eV" if k == "uv" else "cm^-1"} for k, g in GRIDS.items()},
            "spectrum_units": UNITS,
            "normalised": False,
        }
        self.info.metadata.update(meta)
        self._report = {**meta, "skipped_not_in_qm9_indices": skipped}
        print(f"QM9S ({self.builder_config.name}): {len(kept)} molecules, {len(skipped)} skipped "
              "(not in QM9)" + (f", {len(heldout)} excluded (QM9 validation/test split)"
                               if self.builder_config.name == "gfn2_qm9train" else ""),
              file=sys.stderr)
        return {name: self._generate_examples(store, kept, molecules, order)
                for name, order in self.drop_empty_splits(splits).items()}

    def _generate_examples(self, store, kept, molecules, order):
        for rank, m in enumerate(order):
            rec = molecules[m]
            spectra = store[kept[m]]
            if spectra.atomic_numbers is not None and not np.array_equal(
                    np.asarray(spectra.atomic_numbers, np.int32), rec["atomic_numbers"]):
                raise QM9SSourceError(
                    f"{spectra.where}: atoms {np.asarray(spectra.atomic_numbers).tolist()} disagree "
                    f"with QM9 molecule {rec['index']} {rec['atomic_numbers'].tolist()}")
            yield rank, {
                **qm9.molecule_example(rec, pyg_idx=rec["pyg_idx"]),
                "uv": spectra.uv,
                "ir": spectra.ir,
                "raman": spectra.raman,
            }


class _ListStore:
    def __init__(self, records):
        self._records = records
        self.indices = [r.qm9_index for r in records]

    def __len__(self):
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]


def _qm9pack_by_index(indices: set[int]) -> dict[int, dict]:
    """qm9pack records (with ``pyg_idx``) of the given QM9 indices that exist in qm9pack."""
    out = {}
    for pos, (row, where) in enumerate(tqdm.tqdm(qm9pack_source.raw_rows(),
                                                 total=qm9pack_source.NUM_MOLECULES,
                                                 desc="qm9pack", unit="mol")):
        index = int(row["Index"])
        if index in indices:
            out[index] = {**qm9pack_source.parse_row(row, where), "pyg_idx": pos}
            if len(out) == len(indices):
                break
    return out


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Build the QM9S TFDS dataset.")
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--config", default="gfn2", choices=["gfn2", "gfn2_qm9train", "release"])
    parser.add_argument("--source_dir", default=None)
    parser.add_argument("--num_workers", type=int, default=None)
    args = parser.parse_args(argv)
    builder = QM9S(config=args.config, data_dir=args.data_dir, source_dir=args.source_dir,
                   num_workers=args.num_workers, file_format="array_record")
    builder.download_and_prepare()
    print(f"prepared {builder.data_dir}")


if __name__ == "__main__":
    main()
