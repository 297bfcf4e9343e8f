"""mspec.ase.Calculator on a tiny MD17 model fine-tuned here on the shipped GFN2-xTB ethanol:
energies and forces equal the evaluation's (in eV), forces are -∂E/∂x, NVE conserves energy, and
models without an energy head or unusable molecules are refused."""

import json
import os

import numpy as np
import pytest
from ase import Atoms, units
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from experiments import predict
from experiments.configs import finetune_md17, finetune_qm9, pretrain_frad
from data_pipelines import md17
from data_pipelines.spectra import inputs
from mspec import ase as mspec_ase
from mspec import inference
from mspec.data import datasets
from mspec.training import loop

SHIPPED_ETHANOL = os.path.join(os.path.dirname(md17.__file__), "md17_gfn2_data", "md17_ethanol.npz")
KCAL_PER_MOL = units.kcal / units.mol  # eV


@pytest.fixture(scope="module")
def ethanol(tmp_path_factory):
    """``(workdir, config)``: the tiny MD17 config on md17/gfn2_ethanol, trained 20 steps (fewer
    leave a potential that lets two hydrogens collapse within 100 fs), then evaluated."""
    d = tmp_path_factory.mktemp("md17_gfn2")
    c = finetune_md17.get_config("tiny")
    assert c.data.dataset == "md17/gfn2_ethanol"  # the shipped GFN2-xTB frames
    c.data.data_dir = str(d / "tfds")
    c.total_steps = c.eval_every = c.checkpoint_every = c.log_every = 20
    c.data.eval_max_molecules = 8
    c.evaluate.checkpoints = ("last",)
    c.evaluate.validation_max_molecules = 8
    workdir = str(d / "run")
    loop.train_and_evaluate(c, workdir)
    return workdir, c


@pytest.fixture(scope="module")
def calc(ethanol):
    return mspec_ase.Calculator(ethanol[0])


def _frame(k=0):
    d = np.load(SHIPPED_ETHANOL)
    return Atoms(numbers=d["z"], positions=d["R"][k])


def test_energy_and_forces_equal_the_evaluation_in_ev(ethanol, calc):
    """Over the whole test split, the calculator's (and experiments.predict's) energy and force
    MAEs equal those experiments.evaluate wrote to results.json; frame by frame they agree."""
    workdir, c = ethanol
    with open(os.path.join(workdir, "results.json")) as f:
        evaluated = json.load(f)["last"]["test"]
    test = datasets.open_split(datasets.get_builder(c.data.dataset, c.data.data_dir), c.data.test_split)
    frames = [test[k] for k in range(len(test))]
    assert len(frames) == evaluated["n"] == 200
    energies, forces = [], []
    for ex in frames:
        atoms = Atoms(numbers=ex["atomic_numbers"], positions=ex["positions"])
        atoms.calc = calc
        energies.append(atoms.get_potential_energy() / KCAL_PER_MOL)
        forces.append(atoms.get_forces() / KCAL_PER_MOL)
    true_e = np.array([float(ex["energy"]) for ex in frames])
    true_f = np.concatenate([ex["forces"] for ex in frames])
    energies, forces = np.array(energies), np.concatenate(forces)
    assert np.mean(np.abs(energies - true_e)) == pytest.approx(evaluated["energy_mae"], abs=1e-4)
    assert np.mean(np.abs(forces - true_f)) == pytest.approx(evaluated["forces_mae"], abs=1e-4)

    # experiments.predict on the same frames: energy (kcal/mol) per molecule, forces per atom.
    model = inference.load(workdir)
    mols = [inputs.MoleculeInput(k, "", ex["atomic_numbers"], ex["positions"], where=f"test frame {k}")
            for k, ex in enumerate(frames)]
    p = predict.predict(model, mols, batch_size=16, progress=False)
    assert p.units == {"energy": "kcal/mol", "forces": "kcal/mol/Å"} and p.compilations == 1
    # float32 sums in another order (other batch layout and edge list): forces reach 35
    # kcal/mol/Å and differ by < 1e-3 (3e-5 relative).
    np.testing.assert_allclose(p.arrays["energy"], energies, rtol=0, atol=2e-4)
    np.testing.assert_allclose(p.arrays["forces"], forces, rtol=0, atol=2e-3)


@pytest.mark.parametrize("frame", [0, 3])
def test_forces_are_minus_the_energy_gradient(calc, frame):
    atoms = _frame(frame)
    atoms.calc = calc
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 0.5  # eV/Å: a real force field, not zeros

    def energy(i, axis, shift):
        moved = atoms.copy()
        moved.positions[i, axis] += shift
        moved.calc = calc
        return moved.get_potential_energy()

    # Fourth-order central differences, h = 1e-3 Å (truncation < 1e-3 eV/Å here; at 4e-3 Å the
    # few-step model's curvature makes it 4e-2). The model runs in float32: the energy is
    # resolved to ~1e-6 eV, i.e. ~1e-3 eV/Å in the difference quotient, hence the bound
    # (0.2% of the largest force; a sign, unit or std error is 100% of it).
    h = 1e-3
    for i in range(len(atoms)):
        for axis in range(3):
            e = [energy(i, axis, s * h) for s in (2, 1, -1, -2)]
            fd = -(-e[0] + 8 * e[1] - 8 * e[2] + e[3]) / (12 * h)
            assert abs(fd - forces[i, axis]) < 3e-3, (i, axis, fd, forces[i, axis])


def _nve(calc, dt_fs: float, steps: int) -> dict[str, np.ndarray]:
    """Velocity Verlet from a shipped frame with 300 K Maxwell-Boltzmann velocities (seeded; no
    net momentum or rotation): total and kinetic energy (eV) and the longest interatomic
    distance (Å) at every step."""
    atoms = _frame(0)
    atoms.calc = calc
    thermalize_momenta(atoms, 300, rng=np.random.default_rng(0))
    Stationary(atoms)
    ZeroRotation(atoms)
    out = {"total": [], "kinetic": [], "longest": []}

    def record():
        out["kinetic"].append(atoms.get_kinetic_energy())
        out["total"].append(atoms.get_potential_energy() + out["kinetic"][-1])
        out["longest"].append(atoms.get_all_distances().max())

    md = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    md.attach(record, interval=1)
    md.run(steps)
    return {k: np.array(v) for k, v in out.items()}


def test_nve_molecular_dynamics_conserves_energy(calc, ethanol):
    """200 steps of NVE at dt = 0.25 fs (50 fs) of ethanol at 300 K.

    Velocity Verlet is symplectic: with forces that are the exact gradient of a smooth energy,
    the total energy does not drift; it oscillates with an amplitude of order (ω dt)² / 8 of the
    vibrational energy (C-H stretch: ω dt ≈ 0.14 at 0.25 fs, i.e. ~1 meV here). Bounds, as a
    fraction of the kinetic energy of 9 atoms at 300 K (3/2 N k T = 0.35 eV): every deviation
    from the initial total energy < 2% (7 meV; ~1 meV measured), the drift between the first and
    the last 40 steps' mean < 1% (3.5 meV), while the kinetic energy swings by > 100 meV (~320
    meV measured: the forces do real work). Forces off by 10%, a wrong unit or sign break the
    first bound.

    The ET's energy is continuous only while no atom pair crosses the cutoff (its vector messages
    are not cut off smoothly, as in torchmd-net: a pair crossing 5 Å moves the energy by tens of
    meV), so the run must stay within it: ethanol's longest distance is ~3.7 Å.
    """
    run = _nve(calc, 0.25, 200)
    total = run["total"]
    assert len(total) == 201 and np.all(np.isfinite(total))
    assert run["longest"].max() < ethanol[1].model.cutoff
    scale = 1.5 * len(_frame()) * units.kB * 300
    deviation = np.abs(total - total[0]).max()
    assert deviation < 0.02 * scale, (deviation, scale)
    drift = abs(total[-40:].mean() - total[:40].mean())
    assert drift < 0.01 * scale, (drift, scale)
    assert run["kinetic"].max() - run["kinetic"].min() > 0.1


def _config_only_workdir(path, config) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(json.loads(config.to_json_best_effort()), f)
    return str(path)


def test_models_without_an_energy_head_are_refused(tmp_path):
    qm9 = _config_only_workdir(tmp_path / "homo", finetune_qm9.get_config("tiny,target=homo"))
    with pytest.raises(inference.ModelError, match="QM9 property 'homo'.*not a potential energy"):
        mspec_ase.Calculator(qm9)
    pre = _config_only_workdir(tmp_path / "frad", pretrain_frad.get_config("tiny"))
    with pytest.raises(inference.ModelError, match="no energy head.*config.task 'denoise'"):
        mspec_ase.Calculator(pre)


def test_unusable_molecules_are_refused(calc):
    atoms = _frame(0)
    atoms.calc = calc
    atoms.pbc = True
    atoms.cell = [20, 20, 20]
    with pytest.raises(ValueError, match="periodic boundary conditions"):
        atoms.get_potential_energy()
    chloro = _frame(0)
    chloro.numbers[2] = 17  # O -> Cl: not in ethanol's training data
    chloro.calc = calc
    with pytest.raises(ValueError, match=r"Cl \(Z=17\) is not in the model's training data \(H, C, O\)"):
        chloro.get_forces()
    squashed = _frame(0)
    squashed.positions[1] = squashed.positions[0] + 0.01
    squashed.calc = calc
    with pytest.raises(ValueError, match="atoms 1 and 2 are 0.0173 Å apart"):
        squashed.get_potential_energy()
