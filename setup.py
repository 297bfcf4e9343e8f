"""Installs the `mspec` library (plus the `experiments` and `data_pipelines` packages).

Versions are pinned to releases verified together on CPU (see docs/spec/versions.md §1).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=2.0",
    "rdkit==2026.9.1",
    "tensorflow-datasets==4.9.10",
    # TFDS (through etils) imports it when a builder lives in an installed package.
    "importlib-resources>=6.0",
    "array-record==0.8.6",
    "grain==0.2.18",
    "qm9pack==1.0.3",
    "tensorboardX==2.6.5",
    "tqdm>=4.66",
    # Parity plots of fine-tuning results (mspec.training.evaluation).
    "matplotlib==3.11.2",
    # The PaiNN backbone's radial basis (mspec.models.painn); also the equivariance tests' tools.
    "e3nn-jax==0.21.0",
]

# Quantum chemistry, only to (re)compute data: the spectra pipeline (data_pipelines/spectra:
# GFN2-xTB IR/Raman, PySCF + sTDA UV) and the GFN2-xTB MD17-format trajectories
# (data_pipelines/md17_gfn2). Not needed to read or train on the shipped files.
COMPUTE = ["tblite==0.8.0", "pyscf==2.14.0"]

# The ASE calculator (mspec/ase.py): molecular dynamics and geometry work with MD17 models.
ASE = ["ase==3.29.0"]

EXTRAS_REQUIRE = {
    "spectra": COMPUTE,
    "ase": ASE,
    # The compute stack: the spectra / MD pipeline tests; ase: the calculator's tests.
    "test": ["pytest>=8", "tensorboard==2.21.0", *COMPUTE, *ASE],
}

setup(
    name="mspec",
    version="0.1.0",
    description="JAX/Flax pretraining of 3D molecular representations (Frad, MolSpectra).",
    python_requires=">=3.11",
    packages=find_packages(include=["mspec", "mspec.*", "experiments", "experiments.*",
                                    "data_pipelines", "data_pipelines.*"]),
    # The shipped GFN2-xTB MD17-format stand-in (data_pipelines/md17.py, configs md17/gfn2_*).
    # Shipped datasets: GFN2-xTB MD17-format trajectories and the QM9 stick spectra.
    package_data={"data_pipelines": ["md17_gfn2_data/*.npz", "md17_gfn2_data/*.json",
                                     "md17_gfn2_data/*.md", "spectra/data/qm9_gfn2/*"]},
    # The dataset builders, found by name through this group (mspec.data.datasets), so the
    # library never imports data_pipelines itself.
    entry_points={
        "mspec.datasets": [
            "qm9 = data_pipelines.qm9:QM9",
            "qm9s = data_pipelines.qm9s:QM9S",
            "pcqm4mv2 = data_pipelines.pcqm4mv2:PCQM4Mv2",
            "md17 = data_pipelines.md17:MD17",
            # Synthetic spectra on qm9/sample molecules, for tests and quick CPU runs.
            "qm9_synthetic_spectra = data_pipelines.synthetic_spectra:QM9SyntheticSpectra",
        ],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
