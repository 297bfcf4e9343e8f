"""TFDS builder for MD17 / rMD17 (energies and forces of single-molecule MD trajectories).

Three sources, one TFDS config per (source, molecule):

* ``md17/<molecule>``: the original sGDML MD17 ``md17_<file>.npz`` (Chmiela et al. 2017), the
  data Frad and MolSpectra fine-tune on. Not downloadable here: put the files in a directory and
  pass it as ``manual_dir`` (``--manual_dir``, ``config.data.manual_dir`` or
  ``$MSPEC_MD17_DIR``). Public release: http://www.sgdml.org/#datasets
  (http://quantum-machine.org/gdml/data/npz/md17_<file>.npz).
* ``md17/rmd17_<molecule>``: the revised MD17 (Christensen & von Lilienfeld 2020,
  https://doi.org/10.6084/m9.figshare.12672038, ``rmd17.tar.bz2``): ``rmd17_<molecule>.npz`` and
  ``splits/index_{train,test}_0{1..5}.csv``, found in ``manual_dir`` or
  ``manual_dir/rmd17/{npz_data,splits}``.
* ``md17/gfn2_<molecule>``: the **GFN2-xTB stand-in shipped with mspec**
  (``data_pipelines/md17_gfn2_data``, made by :mod:`data_pipelines.md17_gfn2`): same molecules
  and file layout, 1,200 frames each, semi-empirical energies. **Not the DFT MD17**; numbers are
  not comparable with published MD17 results.

Molecules (the original 8): aspirin, benzene, ethanol, malonaldehyde, naphthalene, salicylic,
toluene, uracil (the MD17 benzene file is ``md17_benzene2017.npz``).

Splits (examples stored in split order; ``frame`` is the index in the source file):

* ``train_950`` / ``validation_50`` / ``test_950``: ``numpy.random.default_rng(1).permutation``
  of all frames; first 950 train, next 50 validation, the rest test (the Frad/torchmd-net
  split);
* ``train_9500`` / ``validation_500`` / ``test_9500``: the same permutation, 9,500 / 500 / rest
  (only when the file has more than 10,000 frames);
* rMD17 only, ``k = 1..5``: ``train_rmd17_0k`` / ``validation_rmd17_0k`` (the first 950 and last
  50 indices of the official ``index_train_0k.csv``) and ``test_rmd17_0k``
  (``index_test_0k.csv``, 1,000 frames). A training-index file of 50 lines or fewer leaves
  ``train_rmd17_0k`` empty: it is left out and recorded as ``empty_splits``
  (:mod:`data_pipelines.local_builder`).

Features per frame: ``frame`` int32, ``atomic_numbers [n] int32``, ``positions [n, 3] float32``
(Å), ``energy`` float64 (kcal/mol), ``forces [n, 3] float32`` (kcal/mol/Å), and Frad torsion
metadata (``torsions [t, 4]``, ``torsion_moving [t * n]``) perceived once from the first frame:
the topology is fixed along a trajectory, as in the authors' per-molecule template.

Bad input raises :class:`MD17SourceError` naming the file (and frame): a missing or truncated
file, missing keys, inconsistent shapes, non-finite values. ``build_report.json`` beside the
prepared dataset holds the source file, frame and atom counts, split sizes and torsions.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import torsions as torsion_utils
from data_pipelines.local_builder import LocalBuilder

MOLECULES = (
    "aspirin", "benzene", "ethanol", "malonaldehyde", "naphthalene", "salicylic", "toluene",
    "uracil",
)
# File stem of each molecule in the sGDML MD17 release (and the shipped GFN2 stand-in).
MD17_FILE_STEMS = {m: ("benzene2017" if m == "benzene" else m) for m in MOLECULES}
SOURCES = ("md17", "rmd17", "gfn2")
SPLIT_SEED = 1
RANDOM_PROTOCOLS = ((950, 50), (9500, 500))
RMD17_SPLITS = (1, 2, 3, 4, 5)
RMD17_VAL = 50
GFN2_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "md17_gfn2_data")

MD17_URL = "http://www.sgdml.org/#datasets (files http://quantum-machine.org/gdml/data/npz/{name})"
RMD17_URL = "https://doi.org/10.6084/m9.figshare.12672038 (rmd17.tar.bz2 -> rmd17/npz_data/{name})"


class MD17SourceError(RuntimeError):
    """An MD17 / rMD17 input file is missing or malformed."""


@dataclasses.dataclass
class Trajectory:
    """One molecule's frames: ``z [n_atoms]``, ``R [n_frames, n_atoms, 3]`` Å,
    ``E [n_frames]`` kcal/mol, ``F [n_frames, n_atoms, 3]`` kcal/mol/Å."""

    path: str
    z: np.ndarray
    R: np.ndarray
    E: np.ndarray
    F: np.ndarray


def _load_npz(path: str, keys: tuple[str, ...], url: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise MD17SourceError(
            f"{path} not found. Download it from {url.format(name=os.path.basename(path))} "
            "and put it in the manual directory (config.data.manual_dir / --manual_dir / "
            "$MSPEC_MD17_DIR), or use the shipped GFN2 stand-in configs 'md17/gfn2_<molecule>'."
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise MD17SourceError(
                    f"{path}: missing key(s) {missing}; found {sorted(data.files)}"
                )
            return {k: np.asarray(data[k]) for k in keys}
    except MD17SourceError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise MD17SourceError(f"{path}: unreadable npz (truncated or corrupt?): {e}") from e


def validate(path: str, z, R, E, F) -> Trajectory:
    """Checks shapes and finiteness; returns a :class:`Trajectory` with ``E`` flattened to ``[n]``."""
    z = np.asarray(z)
    if z.ndim != 1 or not np.issubdtype(z.dtype, np.integer) and not np.all(z == np.round(z)):
        raise MD17SourceError(f"{path}: atomic numbers must be a 1-D integer array, got {z.shape} {z.dtype}")
    z = z.astype(np.int32)
    n_atoms = len(z)
    R, F, E = np.asarray(R, np.float64), np.asarray(F, np.float64), np.asarray(E, np.float64)
    if R.ndim != 3 or R.shape[1:] != (n_atoms, 3):
        raise MD17SourceError(f"{path}: positions have shape {R.shape}, expected (n_frames, {n_atoms}, 3)")
    n = R.shape[0]
    if n == 0:
        raise MD17SourceError(f"{path}: no frames")
    if F.shape != R.shape:
        raise MD17SourceError(f"{path}: forces have shape {F.shape}, positions {R.shape}")
    if E.shape not in ((n,), (n, 1)):
        raise MD17SourceError(f"{path}: energies have shape {E.shape}, expected ({n}, 1) or ({n},)")
    E = E.reshape(n)
    if np.any((z < 1) | (z > 118)):
        raise MD17SourceError(f"{path}: invalid atomic numbers {sorted(set(z.tolist()))}")
    for name, arr in (("positions", R), ("energies", E), ("forces", F)):
        bad = ~np.isfinite(arr.reshape(n, -1)).all(axis=1)
        if bad.any():
            raise MD17SourceError(
                f"{path}: non-finite {name} in frame {int(np.argmax(bad))} "
                f"({int(bad.sum())} bad frames in all)"
            )
    return Trajectory(path, z, R, E, F)


def read_md17(path: str) -> Trajectory:
    """Reads an sGDML MD17 file (keys ``z``, ``R``, ``E``, ``F``)."""
    d = _load_npz(path, ("z", "R", "E", "F"), MD17_URL)
    return validate(path, d["z"], d["R"], d["E"], d["F"])


def read_rmd17(path: str) -> Trajectory:
    """Reads an rMD17 file (keys ``nuclear_charges``, ``coords``, ``energies``, ``forces``)."""
    d = _load_npz(path, ("nuclear_charges", "coords", "energies", "forces"), RMD17_URL)
    return validate(path, d["nuclear_charges"], d["coords"], d["energies"], d["forces"])


def random_splits(n_frames: int, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """``train_T`` / ``validation_V`` / ``test_T`` index arrays for each protocol that fits."""
    perm = np.random.default_rng(seed).permutation(n_frames)
    out = {}
    for train, val in RANDOM_PROTOCOLS:
        if n_frames > train + val:
            out[f"train_{train}"] = perm[:train]
            out[f"validation_{val}"] = perm[train : train + val]
            out[f"test_{train}"] = perm[train + val :]
    if not out:
        raise MD17SourceError(
            f"{n_frames} frames are too few for the smallest split (950 + 50 + at least 1 test)"
        )
    return out


def read_index_csv(path: str, n_frames: int) -> np.ndarray:
    """One integer per line, no header (the rMD17 split files)."""
    if not os.path.isfile(path):
        raise MD17SourceError(f"rMD17 split file {path} not found; it is in {RMD17_URL.format(name='splits/')}")
    try:
        idx = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise MD17SourceError(f"{path}: not a list of integers: {e}") from e
    if idx.size == 0 or idx.min() < 0 or idx.max() >= n_frames:
        raise MD17SourceError(f"{path}: indices must lie in [0, {n_frames}); file has {idx.size} entries")
    return idx


def rmd17_splits(split_dir: str, n_frames: int) -> dict[str, np.ndarray]:
    out = {}
    for k in RMD17_SPLITS:
        train = read_index_csv(os.path.join(split_dir, f"index_train_0{k}.csv"), n_frames)
        test = read_index_csv(os.path.join(split_dir, f"index_test_0{k}.csv"), n_frames)
        out[f"train_rmd17_0{k}"] = train[:-RMD17_VAL]
        out[f"validation_rmd17_0{k}"] = train[-RMD17_VAL:]
        out[f"test_rmd17_0{k}"] = test
    return out


def _first_existing(candidates: list[str]) -> str:
    for c in candidates:
        if os.path.exists(c):
            return c
    return candidates[0]


@dataclasses.dataclass
class MD17Config(tfds.core.BuilderConfig):
    molecule: str = "aspirin"
    source: str = "md17"


def _config_name(source: str, molecule: str) -> str:
    return molecule if source == "md17" else f"{source}_{molecule}"


class MD17(LocalBuilder):
    """MD17, rMD17 and the shipped GFN2-xTB stand-in: one config per source and molecule."""

    name = "md17"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "MD17 / rMD17 npz files and the GFN2-xTB stand-in; Frad torsions."}
    BUILDER_CONFIGS = [
        MD17Config(name=_config_name(s, m), molecule=m, source=s,
                   description=f"{m} from {s}" + (" (GFN2-xTB stand-in, NOT DFT MD17)" if s == "gfn2" else ""))
        for s in SOURCES
        for m in MOLECULES
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "MD17: put md17_<molecule>.npz (sGDML release, http://www.sgdml.org/#datasets) in the manual "
        "directory. rMD17: extract rmd17.tar.bz2 (figshare 12672038) there, keeping rmd17/npz_data "
        "and rmd17/splits. The gfn2_* configs need nothing."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "frame": tfds.features.Scalar(np.int32),
                    "atomic_numbers": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "positions": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
                    # BYTES: the default encoding (a tf.train.Example float list) silently
                    # rounds float64 to float32, ~0.004 kcal/mol at MD17 energies of ~1e5.
                    "energy": tfds.features.Tensor(
                        shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES
                    ),
                    "forces": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
                    "torsions": tfds.features.Tensor(shape=(None, 4), dtype=np.int32),
                    "torsion_moving": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
            homepage="http://www.sgdml.org/#datasets",
            citation="Chmiela et al., Machine learning of accurate energy-conserving molecular force "
            "fields, Sci. Adv. 3, e1603015 (2017); Christensen & von Lilienfeld, Mach. Learn.: Sci. "
            "Technol. 1, 045018 (2020); Bannwarth et al., GFN2-xTB, JCTC 15, 1652 (2019).",
        )

    def _manual_dir(self, dl_manager) -> str:
        env = os.environ.get("MSPEC_MD17_DIR")
        if env:
            return os.path.expanduser(env)
        try:
            return os.fspath(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS asserts the directory exists.
            raise MD17SourceError(
                f"manual directory for md17/{self.builder_config.name} does not exist ({e}). "
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS
            ) from e

    def _load(self, dl_manager) -> tuple[Trajectory, dict[str, np.ndarray]]:
        cfg = self.builder_config
        if cfg.source == "gfn2":
            traj = read_md17(os.path.join(GFN2_DIR, f"md17_{MD17_FILE_STEMS[cfg.molecule]}.npz"))
            return traj, random_splits(len(traj.E))
        root = self._manual_dir(dl_manager)
        if cfg.source == "md17":
            traj = read_md17(os.path.join(root, f"md17_{MD17_FILE_STEMS[cfg.molecule]}.npz"))
            return traj, random_splits(len(traj.E))
        name = f"rmd17_{cfg.molecule}.npz"
        traj = read_rmd17(_first_existing(
            [os.path.join(root, name), os.path.join(root, "npz_data", name),
             os.path.join(root, "rmd17", "npz_data", name)]
        ))
        split_dir = _first_existing(
            [os.path.join(root, "splits"), os.path.join(root, "rmd17", "splits")]
        )
        return traj, rmd17_splits(split_dir, len(traj.E))

    def _split_generators(self, dl_manager):
        traj, splits = self._load(dl_manager)
        meta = torsion_utils.torsion_metadata(traj.z, traj.R[0])
        n_atoms = len(traj.z)
        self._report = {
            "config": self.builder_config.name,
            "source": os.path.abspath(traj.path),
            "num_frames": int(len(traj.E)),
            "num_atoms": int(n_atoms),
            "split_sizes": {k: int(len(v)) for k, v in splits.items()},
            "num_torsions": int(len(meta["torsions"])),
            "torsion_status": meta["status"],
            "skipped": 0,  # skip policy: none; any bad frame is an error
        }
        self.info.metadata.update(
            {
                "source_file": os.path.basename(traj.path),
                "source": self.builder_config.source,
                "num_frames": int(len(traj.E)),
                "split_sizes": {k: int(len(v)) for k, v in splits.items()},
                "num_atoms_mean": float(n_atoms),
                "num_atoms_max": int(n_atoms),
                "num_torsions_max": int(len(meta["torsions"])),
                "torsion_status": meta["status"],
                "energy_unit": "kcal/mol",
                "force_unit": "kcal/mol/Angstrom",
            }
        )
        print(
            f"md17/{self.builder_config.name}: {len(traj.E)} frames of {n_atoms} atoms from "
            f"{traj.path}; {len(meta['torsions'])} rotatable torsions ({meta['status']})",
            file=sys.stderr,
        )
        return {name: self._generate_examples(traj, idx, meta)
                for name, idx in self.drop_empty_splits(splits).items()}

    def _generate_examples(self, traj: Trajectory, indices: np.ndarray, meta: dict):
        tors = np.asarray(meta["torsions"], np.int32).reshape(-1, 4)
        moving = np.asarray(meta["moving"], bool).reshape(-1)
        for rank, frame in enumerate(indices):
            yield rank, {
                "frame": int(frame),
                "atomic_numbers": traj.z,
                "positions": traj.R[frame].astype(np.float32),
                "energy": float(traj.E[frame]),
                "forces": traj.F[frame].astype(np.float32),
                "torsions": tors,
                "torsion_moving": moving,
            }


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Build an MD17 / rMD17 / GFN2 TFDS dataset.")
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--config", default="gfn2_aspirin", choices=[c.name for c in MD17.BUILDER_CONFIGS])
    parser.add_argument("--manual_dir", default=None, help="directory holding the npz files")
    args = parser.parse_args(argv)
    builder = MD17(config=args.config, data_dir=args.data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir)
    )
    print(f"prepared {builder.data_dir}")


if __name__ == "__main__":
    main()
