"""Generates the shipped MD17-format dataset: GFN2-xTB Langevin MD of the 8 MD17 molecules.

This is **not** the DFT MD17 (PBE+vdW-TS, sGDML release). It is a small stand-in with the same
molecules, temperature and file layout, so that MD17 fine-tuning runs out of the box where the real
files cannot be downloaded. Energies and forces come from GFN2-xTB (tblite), a semi-empirical
tight-binding method, so absolute numbers are not comparable with published MD17 results.

Recipe per molecule (``python -m data_pipelines.md17_gfn2 --out_dir DIR``):

1. Starting geometry: RDKit ETKDG embedding of the SMILES (hydrogens appended after the heavy
   atoms, as in MD17) + MMFF, then GFN2-xTB relaxation by FIRE-like damped dynamics.
2. NVT molecular dynamics at 500 K (as MD17) with a BAOAB Langevin integrator, time step 0.5 fs,
   friction 0.01 fs^-1, atomic masses from RDKit.
3. ``EQUILIBRATION_STEPS`` = 2,000 steps (1 ps) discarded, then one frame saved every
   ``SAVE_EVERY`` = 20 steps (10 fs), ``NUM_FRAMES`` = 1,200 frames (12 ps) per molecule.

Output: ``DIR/md17_<file stem>.npz`` (stems as in the sGDML release, e.g. ``benzene2017``) in the sGDML MD17 layout (``R [n, N, 3]`` Å float64,
``z [N]``, ``E [n, 1]`` kcal/mol, ``F [n, N, 3]`` kcal/mol/Å, 0-d string metadata ``name``,
``type``, ``theory``, ``md5``, ``r_unit``, ``e_unit``), plus ``README.md`` and ``metadata.json``.

Resumable (the continuation matches an uninterrupted run to within the SCC convergence
tolerance, ~1e-7 Å, not bitwise: the first resumed SCC has no previous wavefunction as its guess):
the run state (frames so far, positions, velocities, RNG state) is saved atomically
every ``CHECKPOINT_EVERY`` frames to ``DIR/.partial/<molecule>.npz``; a finished molecule's npz is
written atomically (temporary file + rename) and skipped on the next run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import tqdm

# The original MD17 molecules (file stems of the sGDML release) and their SMILES.
MOLECULES = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "benzene2017": "c1ccccc1",
    "ethanol": "CCO",
    "malonaldehyde": "O=CCC=O",
    "naphthalene": "c1ccc2ccccc2c1",
    "salicylic": "OC(=O)c1ccccc1O",
    "toluene": "Cc1ccccc1",
    "uracil": "O=c1cc[nH]c(=O)[nH]1",
}

TEMPERATURE_K = 500.0
TIME_STEP_FS = 0.5
FRICTION_PER_FS = 0.01
EQUILIBRATION_STEPS = 2000
SAVE_EVERY = 20
NUM_FRAMES = 1200
CHECKPOINT_EVERY = 100
SEED = 17

# Unit conversions (CODATA 2018).
BOHR_IN_ANGSTROM = 0.529177210903
HARTREE_IN_KCAL_PER_MOL = 627.509474063
KB_KCAL_PER_MOL_K = 0.0019872042586
# 1 kcal/mol = 4184 J / N_A = 4.184e-4 amu Å^2 fs^-2, so a force in kcal/mol/Å divided by a
# mass in amu times this factor is an acceleration in Å/fs^2.
KCAL_PER_MOL_IN_AMU_A2_FS2 = 4.184e-4

THEORY = "GFN2-xTB (tblite 0.8.0), NVT Langevin MD at 500 K; NOT the DFT (PBE+vdW-TS) MD17"


class GFN2:
    """Energy [kcal/mol] and forces [kcal/mol/Å] of one molecule from tblite's GFN2-xTB."""

    def __init__(self, atomic_numbers: np.ndarray, positions: np.ndarray):
        from tblite.interface import Calculator

        self._calc = Calculator("GFN2-xTB", atomic_numbers, positions / BOHR_IN_ANGSTROM)
        self._calc.set("verbosity", 0)
        self._result = None

    def __call__(self, positions: np.ndarray) -> tuple[float, np.ndarray]:
        """``positions [N, 3]`` Å -> (energy kcal/mol, forces ``[N, 3]`` kcal/mol/Å)."""
        self._calc.update(positions / BOHR_IN_ANGSTROM)
        # Reusing the previous result as a guess speeds up the SCC by about 2x along a trajectory.
        self._result = self._calc.singlepoint(self._result)
        energy = float(self._result.get("energy")) * HARTREE_IN_KCAL_PER_MOL
        forces = -np.asarray(self._result.get("gradient")) * (
            HARTREE_IN_KCAL_PER_MOL / BOHR_IN_ANGSTROM
        )
        return energy, forces


def initial_structure(smiles: str, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RDKit ETKDG + MMFF geometry, heavy atoms first.

    Returns:
        ``(atomic_numbers [N] int64, positions [N, 3] Å, masses [N] amu)``.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))  # AddHs appends H after the heavy atoms.
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise RuntimeError(f"RDKit could not embed {smiles!r}")
    AllChem.MMFFOptimizeMolecule(mol)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    masses = np.array([a.GetMass() for a in mol.GetAtoms()], dtype=np.float64)
    return z, mol.GetConformer().GetPositions().astype(np.float64), masses


def relax(calc: GFN2, positions: np.ndarray, masses: np.ndarray, steps: int = 300) -> np.ndarray:
    """Damped-dynamics (FIRE-like velocity quench) relaxation; good enough for an MD start."""
    x = positions.copy()
    v = np.zeros_like(x)
    dt = 0.5
    for _ in range(steps):
        _, f = calc(x)
        if np.abs(f).max() < 0.5:  # kcal/mol/Å
            break
        a = f / masses[:, None] * KCAL_PER_MOL_IN_AMU_A2_FS2
        v = v + a * dt
        if np.sum(v * f) < 0.0:  # Moving uphill: stop.
            v[:] = 0.0
        x = x + v * dt
    return x


def _atomic_write_npz(path: str, **arrays) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def run_molecule(molecule: str, out_dir: str, num_frames: int = NUM_FRAMES) -> str:
    """Runs (or resumes) the MD of one molecule and writes ``out_dir/md17_<molecule>.npz``."""
    final_path = os.path.join(out_dir, f"md17_{molecule}.npz")
    if os.path.exists(final_path):
        return final_path
    partial_dir = os.path.join(out_dir, ".partial")
    os.makedirs(partial_dir, exist_ok=True)
    partial_path = os.path.join(partial_dir, f"{molecule}.npz")

    z, x0, masses = initial_structure(MOLECULES[molecule])
    calc = GFN2(z, x0)
    kt = KB_KCAL_PER_MOL_K * TEMPERATURE_K
    # Velocity std per component: sqrt(kT / m) in Å/fs.
    v_std = np.sqrt(kt * KCAL_PER_MOL_IN_AMU_A2_FS2 / masses)[:, None]

    if os.path.exists(partial_path):
        state = np.load(partial_path, allow_pickle=False)
        R, E, F = list(state["R"]), list(state["E"]), list(state["F"])
        x, v = state["x"], state["v"]
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(str(state["rng"]))
        step = int(state["step"])
    else:
        rng = np.random.default_rng([SEED, sorted(MOLECULES).index(molecule)])
        x = relax(calc, x0, masses)
        v = rng.normal(size=x.shape) * v_std
        R, E, F, step = [], [], [], 0

    dt = TIME_STEP_FS
    c1 = np.exp(-FRICTION_PER_FS * dt)
    c2 = np.sqrt(1.0 - c1 * c1)
    inv_m = KCAL_PER_MOL_IN_AMU_A2_FS2 / masses[:, None]
    energy, forces = calc(x)
    total_steps = EQUILIBRATION_STEPS + num_frames * SAVE_EVERY
    bar = tqdm.tqdm(total=num_frames, initial=len(R), desc=molecule, unit="frame", file=sys.stderr)
    while len(R) < num_frames:
        # BAOAB: half kick, half drift, Ornstein-Uhlenbeck, half drift, new force, half kick.
        v = v + 0.5 * dt * forces * inv_m
        x = x + 0.5 * dt * v
        v = c1 * v + c2 * v_std * rng.normal(size=v.shape)
        x = x + 0.5 * dt * v
        energy, forces = calc(x)
        v = v + 0.5 * dt * forces * inv_m
        step += 1
        if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
            raise RuntimeError(f"{molecule}: non-finite GFN2 energy/forces at MD step {step}")
        if step > EQUILIBRATION_STEPS and (step - EQUILIBRATION_STEPS) % SAVE_EVERY == 0:
            R.append(x.copy())
            E.append([energy])
            F.append(forces.copy())
            bar.update(1)
            if len(R) % CHECKPOINT_EVERY == 0 and len(R) < num_frames:
                _atomic_write_npz(
                    partial_path, R=np.array(R), E=np.array(E), F=np.array(F), x=x, v=v,
                    step=step, rng=json.dumps(rng.bit_generator.state),
                )
        assert step <= total_steps
    bar.close()

    R_arr, E_arr, F_arr = np.array(R), np.array(E), np.array(F)
    md5 = hashlib.md5(R_arr.tobytes() + E_arr.tobytes() + F_arr.tobytes()).hexdigest()
    _atomic_write_npz(
        final_path,
        R=R_arr, z=z.astype(np.uint8), E=E_arr, F=F_arr,
        name=np.array(f"{molecule} (GFN2-xTB stand-in, not DFT MD17)"),
        type=np.array("d"), theory=np.array(THEORY), md5=np.array(md5),
        r_unit=np.array("Ang"), e_unit=np.array("kcal/mol"),
    )
    if os.path.exists(partial_path):
        os.remove(partial_path)
    return final_path


README = """# GFN2-xTB MD17-format trajectories (NOT the DFT MD17)

Made by `python -m data_pipelines.md17_gfn2` (see that module for the recipe). These files have the
file layout of the sGDML MD17 release (`md17_<molecule>.npz`: `R` [n, N, 3] Å float64, `z` [N],
`E` [n, 1] kcal/mol, `F` [n, N, 3] kcal/mol/Å, 0-d string metadata) and the same 8 molecules and
temperature (500 K), so that MD17 fine-tuning runs out of the box (`md17/gfn2_<molecule>`).

What they are **not**: the DFT MD17 (PBE+vdW-TS, Chmiela et al. 2017). Energies and forces come from
the semi-empirical GFN2-xTB method (tblite {tblite}); the trajectories are short ({frames} frames,
one every {every_fs:g} fs after {equil_fs:g} fs of equilibration, i.e. {span_ps:g} ps per molecule)
Langevin NVT runs started from an RDKit + GFN2 geometry. Errors measured on them are **not
comparable** with published MD17 numbers; use them to check that the pipeline works and learns.
Only the 950 / 50 / rest split fits (9,500 training frames need the real files). Each MD step
reused the previous step's wavefunction as the SCC guess, so a fresh GFN2 calculation on a stored
frame reproduces its forces to about 2e-3 kcal/mol/Å (the SCC convergence tolerance).

Per molecule (energies in kcal/mol, forces in kcal/mol/Å):

{table}
"""


def write_readme_and_metadata(out_dir: str) -> None:
    """Writes README.md and metadata.json describing the finished files in ``out_dir``."""
    rows = ["| file | atoms | frames | mean E | std E | mean abs F |", "|---|---|---|---|---|---|"]
    meta = {
        "method": THEORY,
        "tblite_version": "0.8.0",
        "temperature_K": TEMPERATURE_K,
        "time_step_fs": TIME_STEP_FS,
        "friction_per_fs": FRICTION_PER_FS,
        "equilibration_steps": EQUILIBRATION_STEPS,
        "save_every_steps": SAVE_EVERY,
        "seed": SEED,
        "smiles": MOLECULES,
        "energy_unit": "kcal/mol",
        "force_unit": "kcal/mol/Angstrom",
        "position_unit": "Angstrom",
        "files": {},
    }
    for molecule in MOLECULES:
        path = os.path.join(out_dir, f"md17_{molecule}.npz")
        if not os.path.exists(path):
            continue
        d = np.load(path)
        E, F = d["E"][:, 0], d["F"]
        meta["files"][os.path.basename(path)] = {
            "frames": int(len(E)), "atoms": int(len(d["z"])), "md5": str(d["md5"]),
            "energy_mean": float(E.mean()), "energy_std": float(E.std()),
        }
        rows.append(f"| {os.path.basename(path)} | {len(d['z'])} | {len(E)} | {E.mean():.1f} | "
                    f"{E.std():.2f} | {np.abs(F).mean():.2f} |")
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(README.format(
            tblite="0.8.0", frames=NUM_FRAMES, every_fs=SAVE_EVERY * TIME_STEP_FS,
            equil_fs=EQUILIBRATION_STEPS * TIME_STEP_FS,
            span_ps=NUM_FRAMES * SAVE_EVERY * TIME_STEP_FS / 1000, table="\n".join(rows),
        ))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(__file__), "md17_gfn2_data"))
    parser.add_argument("--molecules", nargs="*", default=list(MOLECULES))
    parser.add_argument("--num_frames", type=int, default=NUM_FRAMES)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for molecule in args.molecules:
        if molecule not in MOLECULES:
            parser.error(f"unknown molecule {molecule!r}; known: {sorted(MOLECULES)}")
        t0 = time.time()
        path = run_molecule(molecule, args.out_dir, args.num_frames)
        print(f"{molecule}: {path} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    write_readme_and_metadata(args.out_dir)


if __name__ == "__main__":
    main()
