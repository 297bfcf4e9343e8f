"""A small QM9 dataset with *synthetic* UV/IR/Raman spectra, for tests and CPU smoke runs.

Not physics: every spectrum is a deterministic function of the molecule's atoms and 3D geometry
(bond lengths and element pairs), so a 3D encoder can learn to retrieve a molecule's spectra and
SpecFormer can learn to reconstruct them. It follows the data contract of the real ``qm9s``
dataset: every feature of the ``qm9`` builder plus raw float32 ``uv [701]`` (1-15 eV, 0.02 eV),
``ir [3501]`` and ``raman [3501]`` (500-4000 cm^-1, 1 cm^-1), with the grids in the metadata.

* IR / Raman: one Lorentzian line (FWHM 15 cm^-1) per bonded pair (distance < 1.15 x the sum of
  covalent radii) at ``nu = 3275 / sqrt(mu d^3)`` cm^-1 (mu: reduced mass in u, d in Å; about
  3000 for C-H, 700 for C-C), plus one line per heavy atom from its mean bond length. IR
  intensity grows with the electronegativity difference, Raman intensity with the bond
  polarisability (Z_i + Z_j) / d; the scales (10^2 .. 10^4) make ``log10(1 + s)`` matter.
* UV: one Gaussian band (sigma 0.25 eV) per heavy atom at an energy set by its element, its
  number of bonds and its mean bond length.

The examples are read from the prepared ``qm9/sample`` dataset in the same data directory (built
first if needed), keeping its split order. Build (automatic on first use, or by hand)::

    python -m data_pipelines.synthetic_spectra --data_dir ~/tensorflow_datasets
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_pipelines.local_builder import LocalBuilder

SPLIT_SIZES = {"train": 600, "validation": 100, "test": 100}

# Grids of the QM9S spectra (docs/spec/molspectra.md §2.1): (start, stop, step, unit).
GRIDS = {
    "uv": (1.0, 15.0, 0.02, "eV"),
    "ir": (500.0, 4000.0, 1.0, "cm^-1"),
    "raman": (500.0, 4000.0, 1.0, "cm^-1"),
}

_COVALENT_RADIUS = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57}
_MASS = {1: 1.008, 6: 12.011, 7: 14.007, 8: 15.999, 9: 18.998}
_ELECTRONEGATIVITY = {1: 2.20, 6: 2.55, 7: 3.04, 8: 3.44, 9: 3.98}


def grid(name: str) -> np.ndarray:
    """The sample points of spectrum ``name`` (``[701]`` for UV, ``[3501]`` for IR/Raman)."""
    start, stop, step, _ = GRIDS[name]
    return start + step * np.arange(int(round((stop - start) / step)) + 1)


def _bonds(z: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    radius = np.array([_COVALENT_RADIUS.get(int(a), 0.75) for a in z])
    d = np.linalg.norm(pos[:, None] - pos[None, :], axis=-1)
    i, j = np.nonzero(np.triu(d < 1.15 * (radius[:, None] + radius[None, :]), k=1))
    return i, j, d[i, j]


def synthetic_spectra(atomic_numbers: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Deterministic synthetic spectra of one molecule (see the module docstring).

    Args:
      atomic_numbers: ``[n]`` int.
      positions: ``[n, 3]`` Å.

    Returns:
      ``{"uv": [701], "ir": [3501], "raman": [3501]}`` float32, non-negative.
    """
    z = np.asarray(atomic_numbers)
    pos = np.asarray(positions, np.float64)
    i, j, d = _bonds(z, pos)
    mass = np.array([_MASS.get(int(a), 2.0 * a) for a in z])
    chi = np.array([_ELECTRONEGATIVITY.get(int(a), 2.5) for a in z])
    mu = mass[i] * mass[j] / (mass[i] + mass[j])
    nu = list(3275.0 / np.sqrt(mu * d**3))
    ir_int = list(100.0 * (0.05 + (chi[i] - chi[j]) ** 2))
    raman_int = list(1000.0 * (z[i] + z[j]) / (d * 10.0))
    heavy = np.nonzero(z > 1)[0]
    n_bonds = np.bincount(np.concatenate([i, j]), minlength=len(z))
    bond_sum = np.bincount(np.concatenate([i, j]), weights=np.concatenate([d, d]), minlength=len(z))
    mean_bond = bond_sum / np.maximum(n_bonds, 1)
    for a in heavy:  # a skeletal line per heavy atom
        nu.append(600.0 + 900.0 * (mean_bond[a] - 1.0) + 40.0 * n_bonds[a])
        ir_int.append(30.0 * chi[a])
        raman_int.append(200.0 * n_bonds[a])
    nu, ir_int, raman_int = np.array(nu), np.array(ir_int), np.array(raman_int)

    half_width = 7.5  # FWHM 15 cm^-1
    x = grid("ir")[:, None]
    lorentz = half_width**2 / ((x - nu[None, :]) ** 2 + half_width**2)  # [L, lines]
    ir = lorentz @ ir_int
    raman = lorentz @ raman_int

    e = 4.0 + 0.8 * (z[heavy] - 6) + 0.6 * n_bonds[heavy] + 6.0 * (mean_bond[heavy] - 1.2)
    strength = 0.2 + 0.1 * n_bonds[heavy]
    u = grid("uv")[:, None]
    uv = np.exp(-0.5 * ((u - e[None, :]) / 0.25) ** 2) @ strength
    return {
        "uv": uv.astype(np.float32),
        "ir": ir.astype(np.float32),
        "raman": raman.astype(np.float32),
    }


class QM9SyntheticSpectra(LocalBuilder):
    """QM9 sample molecules with synthetic spectra (600 / 100 / 100)."""

    name = "qm9_synthetic_spectra"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Synthetic Lorentzian IR/Raman and Gaussian UV spectra."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="sample", description="First 600/100/100 of qm9/sample."),
    ]
    DEFAULT_CONFIG_NAME = "sample"

    def _info(self) -> tfds.core.DatasetInfo:
        from data_pipelines import qm9pack_source

        tensor = tfds.features.Tensor
        spectra = {k: tensor(shape=(len(grid(k)),), dtype=np.float32) for k in GRIDS}
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "index": tfds.features.Scalar(np.int32),
                    "pyg_idx": tfds.features.Scalar(np.int32),
                    "smiles": tfds.features.Text(),
                    "atomic_numbers": tensor(shape=(None,), dtype=np.int32),
                    "positions": tensor(shape=(None, 3), dtype=np.float32),
                    "targets": tensor(shape=(len(qm9pack_source.TARGETS),), dtype=np.float64),
                    "torsions": tensor(shape=(None, 4), dtype=np.int32),
                    "torsion_moving": tensor(shape=(None,), dtype=np.bool_),
                    "torsion_status": tfds.features.Text(),
                    **spectra,
                }
            ),
            metadata=tfds.core.MetadataDict(
                spectra={
                    k: {
                        "start": g[0],
                        "stop": g[1],
                        "step": g[2],
                        "unit": g[3],
                        "num_points": len(grid(k)),
                    }
                    for k, g in GRIDS.items()
                },
                synthetic=True,
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        from mspec.data import datasets

        source_builder = datasets.get_builder("qm9/sample", os.fspath(self._data_dir_root))
        meta = dict(source_builder.info.metadata or {})
        self.info.metadata.update(
            {
                k: meta[k]
                for k in ("num_atoms_max", "num_torsions_max", "num_atoms_mean")
                if k in meta
            }
        )
        self._report = {"source": f"qm9/sample in {source_builder.data_dir}", "synthetic": True,
                        "split_sizes": dict(SPLIT_SIZES)}
        return {
            split: self._generate_examples(datasets.open_split(source_builder, split), n)
            for split, n in SPLIT_SIZES.items()
        }

    def _generate_examples(self, source, n: int):
        if len(source) < n:
            raise ValueError(f"qm9/sample split has {len(source)} molecules, need {n}")
        for rank in tqdm.trange(n, desc="synthetic spectra", unit="mol"):
            ex = source[rank]
            yield (
                rank,
                {
                    **{
                        k: ex[k]
                        for k in (
                            "index",
                            "pyg_idx",
                            "atomic_numbers",
                            "positions",
                            "targets",
                            "torsions",
                            "torsion_moving",
                        )
                    },
                    "smiles": _text(ex["smiles"]),
                    "torsion_status": _text(ex["torsion_status"]),
                    **synthetic_spectra(ex["atomic_numbers"], ex["positions"]),
                },
            )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    args = parser.parse_args(argv)
    builder = QM9SyntheticSpectra(data_dir=args.data_dir, file_format="array_record")
    builder.download_and_prepare()
    print(f"prepared {builder.data_dir}")


if __name__ == "__main__":
    main()
