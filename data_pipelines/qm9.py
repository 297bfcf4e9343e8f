"""TFDS builder for QM9 from the `qm9pack` package: geometries, targets, SMILES and Frad torsions.

Nothing is downloaded: qm9pack (a pip dependency of mspec) ships the 130,831 characterised QM9
molecules. The builder writes array_record files readable without TensorFlow.

Build (automatic on first use by the training code; or by hand)::

    python -m data_pipelines.qm9 --data_dir ~/tensorflow_datasets            # config "full"
    python -m data_pipelines.qm9 --data_dir ~/tensorflow_datasets --config sample

Configs (all give the same molecules, order, targets and splits; only the source differs):
  * ``full``   : all 130,831 molecules from qm9pack, split 110,000 / 10,000 / 10,831 by
    ``numpy.random.default_rng(1).permutation`` (the torchmd-net / PyG split).
  * ``sample`` : 2,000 molecules, the first 1,600 / 200 / 200 of those same three splits (so a
    sample split is a subset of the full split), for quick runs and tests.
  * ``xyz``    : the original release ``dsgdb9nsd.xyz.tar.bz2`` + ``uncharacterized.txt``
    (``--source_dir``; see :mod:`data_pipelines.qm9_raw`).
  * ``pyg``    : the PyG / MoleculeNet raw layout ``gdb9.sdf`` + ``gdb9.sdf.csv`` +
    ``uncharacterized.txt`` (``--source_dir``; SDF coordinates have 4 decimals).

    python -m data_pipelines.qm9 --config xyz --source_dir ~/downloads/qm9

The raw sources must hold the whole release (133,885 molecules, 3,054 uncharacterised) unless
``allow_partial=True`` (``--allow_partial``, used for fixtures): a partial source is split by the
same seed-1 permutation of its own size, 80 / 10 / 10 %; a split that comes out empty (a handful of
molecules) is left out and recorded as ``empty_splits`` (:mod:`data_pipelines.local_builder`).

Features per molecule (examples in each split are stored in split-permutation order):
  * ``index``: QM9 index (1-based, as in ``dsgdb9nsd_NNNNNN``); ``pyg_idx``: 0-based position in
    the 130,831-molecule ordering (what ``splits.npz`` of torchmd-net indexes).
  * ``smiles``; ``atomic_numbers [n] int32``; ``positions [n, 3] float32`` (Å, B3LYP/6-31G(2df,p)).
  * ``targets [15] float64`` in the order and units of
    :data:`data_pipelines.qm9pack_source.TARGETS`: mu (D), alpha (a0^3), homo, lumo, gap (eV),
    r2 (a0^2), zpve, U0, U, H, G (eV), cv (cal/mol/K), A, B, C (GHz). These are the first 12
    columns of PyG's ``y`` in PyG units, plus the rotational constants.
  * ``torsions [t, 4] int32`` and ``torsion_moving [t * n] bool`` (row-major ``[t, n]``): Frad's rotatable torsions and
    the atoms each one moves (see :mod:`data_pipelines.torsions`). ``torsion_status``: ``ok``,
    ``no_rotatable_torsion`` or ``bond_perception_failed``; the last two have t = 0 and get Coord
    noise in training. Their counts are in the dataset metadata and in ``build_report.json``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_pipelines import qm9_raw, qm9pack_source, torsions
from data_pipelines.local_builder import LocalBuilder

SAMPLE_SIZES = {"train": 1600, "validation": 200, "test": 200}
SPLIT_NAMES = ("train", "validation", "test")


def molecule_features() -> dict:
    """TFDS features of one QM9 molecule (shared with the ``qm9s`` builder)."""
    return {
        "index": tfds.features.Scalar(np.int32),
        "pyg_idx": tfds.features.Scalar(np.int32),
        "smiles": tfds.features.Text(),
        "atomic_numbers": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "positions": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
        # BYTES: the default encoding goes through a float32 list and would round U0
        # (~ -1e4 eV) to ~1 meV.
        "targets": tfds.features.Tensor(shape=(len(qm9pack_source.TARGETS),), dtype=np.float64,
                                        encoding=tfds.features.Encoding.BYTES),
        "torsions": tfds.features.Tensor(shape=(None, 4), dtype=np.int32),
        # [t * n] row-major: TFDS cannot decode empty 2-D "bytes" tensors.
        "torsion_moving": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
        "torsion_status": tfds.features.Text(),
    }


def _with_torsions(record: dict) -> dict:
    meta = torsions.torsion_metadata(
        record["atomic_numbers"], record["positions"], smiles=record["smiles"]
    )
    return {**record, **meta}


class QM9(LocalBuilder):
    """QM9 (130,831 molecules) from qm9pack, with Frad torsion metadata."""

    name = "qm9"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "qm9pack 1.0.3 geometries and labels, Frad torsions.",
        "1.1.0": "targets stored as exact float64 (1.0.0 rounded them to float32); raw-release "
        "configs xyz and pyg.",
    }
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="full", description="All 130,831 molecules."),
        tfds.core.BuilderConfig(name="sample", description="2,000-molecule subset of the splits."),
        tfds.core.BuilderConfig(name="xyz", description="From dsgdb9nsd.xyz.tar.bz2."),
        tfds.core.BuilderConfig(name="pyg", description="From gdb9.sdf + gdb9.sdf.csv."),
    ]
    DEFAULT_CONFIG_NAME = "full"
    RAW_CONFIGS = ("xyz", "pyg")

    def __init__(self, *args, num_workers: int | None = None, source_dir: str | None = None,
                 allow_partial: bool = False, **kwargs):
        self._num_workers = num_workers
        self._source_dir = source_dir
        self._allow_partial = allow_partial
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(molecule_features()),
            metadata=tfds.core.MetadataDict(),
            # Keep each split in seed-1 permutation order (reproducible, torchmd-net order).
            disable_shuffling=True,
            homepage="https://pypi.org/project/qm9pack/",
            citation="Ramakrishnan et al., Quantum chemistry structures and properties of 134 "
            "kilo molecules, Sci. Data 1, 140022 (2014).",
        )

    def _read_raw_source(self, dl_manager) -> list[dict]:
        """Records of the ``xyz`` / ``pyg`` release in ascending QM9 index."""
        directory = self._source_dir or _manual_dir(dl_manager)
        if not directory:
            raise qm9pack_source.QM9SourceError(
                f"QM9 config {self.builder_config.name!r} reads the raw release: pass source_dir= "
                "(--source_dir) or a TFDS manual_dir holding "
                + (f"{qm9_raw.XYZ_TARBALL} and {qm9_raw.UNCHARACTERIZED}"
                   if self.builder_config.name == "xyz" else
                   f"{qm9_raw.PYG_SDF}, {qm9_raw.PYG_CSV} and {qm9_raw.UNCHARACTERIZED}")
            )
        full = not self._allow_partial
        if self.builder_config.name == "xyz":
            records = qm9_raw.read_xyz_tarball(directory, expect_full=full)
        else:
            records = list(tqdm.tqdm(qm9_raw.read_pyg_raw(directory, expect_full=full),
                                     desc="gdb9.sdf", unit="mol"))
        if full and len(records) != qm9pack_source.NUM_MOLECULES:
            raise qm9pack_source.QM9SourceError(
                f"{directory}: {len(records)} characterised molecules, expected "
                f"{qm9pack_source.NUM_MOLECULES}"
            )
        if not records:
            raise qm9pack_source.QM9SourceError(f"{directory}: no characterised molecule")
        indices = [r["index"] for r in records]
        if len(set(indices)) != len(indices):
            raise qm9pack_source.QM9SourceError(f"{directory}: duplicate QM9 indices")
        return records

    def _split_generators(self, dl_manager):
        if self.builder_config.name in self.RAW_CONFIGS:
            raw = self._read_raw_source(dl_manager)
            records = dict(enumerate(raw))
            if len(raw) == qm9pack_source.NUM_MOLECULES:
                splits = dict(zip(SPLIT_NAMES, qm9pack_source.split_indices()))
            else:
                n = len(raw)
                splits = dict(zip(SPLIT_NAMES, qm9pack_source.split_indices(
                    n, train=int(round(0.8 * n)), val=int(round(0.1 * n)))))
        else:
            splits = dict(zip(SPLIT_NAMES, qm9pack_source.split_indices()))
            if self.builder_config.name == "sample":
                splits = {k: v[: SAMPLE_SIZES[k]] for k, v in splits.items()}
            records = _read_qm9pack_positions(set(np.concatenate(list(splits.values())).tolist()))
        order = sorted(records)
        processed = with_torsions_parallel([records[p] for p in order], self._num_workers)
        by_pos = dict(zip(order, processed))

        statuses = [r["status"] for r in processed]
        report = {
            "config": self.builder_config.name,
            "source": (self._source_dir or "downloads/manual")
            if self.builder_config.name in self.RAW_CONFIGS else "qm9pack 1.0.3",
            "num_molecules": len(processed),
            "torsion_status_counts": {s: statuses.count(s) for s in sorted(set(statuses))},
            "coord_noise_fallback": sum(s != "ok" for s in statuses),
            "coord_noise_fallback_indices": {
                s: [by_pos[p]["index"] for p in order if by_pos[p]["status"] == s]
                for s in sorted(set(statuses) - {"ok"})
            },
            "split_sizes": {k: int(len(v)) for k, v in splits.items()},
        }
        n_atoms = np.array([len(r["atomic_numbers"]) for r in processed])
        report["num_atoms_mean"] = float(n_atoms.mean())
        report["num_atoms_max"] = int(n_atoms.max())
        report["num_torsions_max"] = int(max(len(r["torsions"]) for r in processed))
        # The input pipeline sizes its static batch budgets from these statistics.
        self.info.metadata.update(
            {
                k: report[k]
                for k in (
                    "torsion_status_counts",
                    "coord_noise_fallback",
                    "split_sizes",
                    "num_atoms_mean",
                    "num_atoms_max",
                    "num_torsions_max",
                )
            }
        )
        self._report = report
        print(
            f"QM9 ({self.builder_config.name}): {report['coord_noise_fallback']} of "
            f"{len(processed)} molecules fall back to Coord noise "
            f"({report['torsion_status_counts']})",
            file=sys.stderr,
        )
        return {
            name: self._generate_examples([(int(p), by_pos[int(p)]) for p in idx])
            for name, idx in self.drop_empty_splits(splits).items()
        }

    def _generate_examples(self, items):
        # With shuffling disabled TFDS orders examples by key: the rank keeps permutation order.
        for rank, (pos, rec) in enumerate(items):
            yield rank, molecule_example(rec, pyg_idx=pos)


def molecule_example(rec: dict, pyg_idx: int) -> dict:
    """The :func:`molecule_features` values of one parsed molecule with its torsion metadata."""
    return {
        "index": rec["index"],
        "pyg_idx": pyg_idx,
        "smiles": rec["smiles"],
        "atomic_numbers": rec["atomic_numbers"],
        "positions": rec["positions"].astype(np.float32),
        "targets": rec["targets"],
        "torsions": rec["torsions"].reshape(-1, 4).astype(np.int32),
        "torsion_moving": rec["moving"].astype(bool).reshape(-1),
        "torsion_status": rec["status"],
    }


def _manual_dir(dl_manager) -> str | None:
    try:
        path = dl_manager.manual_dir
    except (AssertionError, AttributeError, ValueError):  # TFDS asserts when none was given
        return None
    return os.fspath(path) if path and os.path.isdir(os.fspath(path)) else None


def _read_qm9pack_positions(wanted: set[int]) -> dict[int, dict]:
    """qm9pack records at the given positions of the 130,831-molecule ordering."""
    print("QM9: reading qm9pack CSV files ...", file=sys.stderr)
    records = {}
    pos = -1
    for pos, rec in enumerate(
        tqdm.tqdm(qm9pack_source.raw_rows(), total=qm9pack_source.NUM_MOLECULES, desc="parse", unit="mol")
    ):
        if pos in wanted:
            records[pos] = qm9pack_source.parse_row(rec[0], rec[1])
    if len(records) != len(wanted):
        raise qm9pack_source.QM9SourceError(
            f"qm9pack holds fewer molecules than expected ({pos + 1} rows, need "
            f"{qm9pack_source.NUM_MOLECULES}); reinstall qm9pack==1.0.3"
        )
    return records


def with_torsions_parallel(records: list[dict], num_workers: int | None = None) -> list[dict]:
    """Adds Frad torsion metadata (``torsions``, ``moving``, ``status``) to each record, in order."""
    workers = num_workers or max(1, (os.cpu_count() or 1))
    workers = min(workers, max(1, len(records) // 64))  # process start-up dominates tiny builds
    if workers == 1:
        return [_with_torsions(r) for r in tqdm.tqdm(records, desc="torsions", unit="mol")]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(
            tqdm.tqdm(
                pool.imap(_with_torsions, records, chunksize=64),
                total=len(records),
                desc="torsions",
                unit="mol",
            )
        )


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Build the QM9 TFDS dataset from qm9pack.")
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--config", default="full", choices=["full", "sample", "xyz", "pyg"])
    parser.add_argument("--source_dir", default=None,
                        help="directory with the raw release files (configs xyz and pyg)")
    parser.add_argument("--allow_partial", action="store_true",
                        help="accept a raw source with fewer than all molecules")
    parser.add_argument("--num_workers", type=int, default=None)
    args = parser.parse_args(argv)
    builder = QM9(
        config=args.config,
        data_dir=args.data_dir,
        num_workers=args.num_workers,
        source_dir=args.source_dir,
        allow_partial=args.allow_partial,
        file_format="array_record",
    )
    builder.download_and_prepare()
    print(f"prepared {builder.data_dir}")


if __name__ == "__main__":
    main()
