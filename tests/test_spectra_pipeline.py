"""Tests of the spectra pipeline (data_pipelines/spectra): GFN2-xTB vibrations, sTDA, driver."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("tblite")
pytest.importorskip("pyscf")

from data_pipelines.spectra import broadening, plot, stda, sticks, vibrations
from data_pipelines.spectra import run as spectra_run
from data_pipelines.spectra.compute import (
    MoleculeFailure,
    SpectraConfig,
    check_input,
    compute_record,
    level_of_theory,
)
from data_pipelines.spectra.inputs import MoleculeInput, from_smiles, read_smiles_file, read_xyz
from data_pipelines.spectra.xtb import FIELD_ACCURACY, GFN2

WATER_Z = np.array([8, 1, 1])
WATER_XYZ = np.array([[0.0, 0.0, 0.12], [0.0, 0.76, -0.48], [0.0, -0.76, -0.48]])  # Å
FORMALDEHYDE_Z = np.array([6, 8, 1, 1])
FORMALDEHYDE_XYZ = np.array([[0, 0, 0.53], [0, 0, -0.68], [0, 0.94, 1.11], [0, -0.94, 1.11]], float)


@pytest.fixture(scope="module")
def water_minimum():
    """GFN2 minimum of water, bohr."""
    calc = GFN2(WATER_Z, WATER_XYZ / vibrations.BOHR_ANGSTROM)
    pos, _, _ = vibrations.optimise(calc, WATER_XYZ / vibrations.BOHR_ANGSTROM, gtol=1e-6)
    return pos


def _rotation(seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


# ----------------------------------------------------------------------------- vibrations

def test_diatomic_frequency_and_ir_match_one_dimensional_formulas():
    """HF: normal-mode machinery (mass weighting, projection of 5 rigid modes, units) vs the
    textbook 1D formulas w = sqrt(k / mu) and I = 974.88 (dmu/dr)^2 / mu from energies/dipoles."""
    z = np.array([9, 1])
    # Tight SCF: with the default accuracy the dipole differences carry ~0.5 % noise.
    calc = GFN2(z, np.array([[0, 0, 0], [0, 0, 1.75]]), accuracy=FIELD_ACCURACY)
    pos, _, _ = vibrations.optimise(calc, np.array([[0, 0, 0], [0, 0, 1.75]]), gtol=1e-7)
    r0, h = pos[1, 2] - pos[0, 2], 1e-3

    def at(r):
        return calc.compute(np.array([[0, 0, 0], [0, 0, r]]))

    k = (at(r0 + h).energy - 2 * at(r0).energy + at(r0 - h).energy) / h**2
    dmu_dr = (at(r0 + h).dipole[2] - at(r0 - h).dipole[2]) / (2 * h)
    masses = vibrations.masses_of(z)
    mu_red = masses.prod() / masses.sum()
    hess, dmu = vibrations.hessian_and_dipole_derivatives(calc, np.array([[0, 0, 0], [0, 0, r0]]))
    freq, modes = vibrations.normal_modes(hess, np.array([[0, 0, 0], [0, 0, r0]]), masses)
    assert freq.shape == (1,)  # 3N - 5 for a linear molecule
    np.testing.assert_allclose(freq[0], np.sqrt(k / mu_red) * vibrations.AU_TO_CM1, rtol=1e-3)
    ir = vibrations.ir_intensities(dmu, modes, masses)
    np.testing.assert_allclose(ir[0], vibrations.IR_AU_TO_KM_MOL * dmu_dr**2 / mu_red, rtol=1e-3)


def test_unit_constants_match_quoted_values():
    # 1 e = 4.803204 D/Å and 42.2561 km/mol per (D/Å)^2/amu; 5140.487 cm^-1 per sqrt(Eh/bohr^2/amu).
    np.testing.assert_allclose(vibrations.IR_AU_TO_KM_MOL, 42.2561 * 4.803204**2, rtol=1e-4)
    np.testing.assert_allclose(vibrations.AU_TO_CM1, 5140.487, rtol=1e-6)


def test_water_spectrum_is_physical_and_rotation_invariant():
    spec = vibrations.vibrational_spectrum(WATER_Z, WATER_XYZ)
    assert spec.freq_cm1.shape == (3,)
    assert 1400 < spec.freq_cm1[0] < 1700 and 3400 < spec.freq_cm1[1] < spec.freq_cm1[2] < 3900
    assert np.all(spec.ir_km_mol > 0) and np.all(spec.raman_a4_amu > 0)
    rot = vibrations.vibrational_spectrum(WATER_Z, WATER_XYZ @ _rotation(3).T + 0.7)
    np.testing.assert_allclose(rot.freq_cm1, spec.freq_cm1, atol=1.0)
    np.testing.assert_allclose(rot.ir_km_mol, spec.ir_km_mol, rtol=0.02)
    np.testing.assert_allclose(rot.raman_a4_amu, spec.raman_a4_amu, rtol=0.02)


def test_raman_from_field_gradients_equals_brute_force_polarizability_differences(water_minimum):
    """d alpha/dx from 19 field-gradient single points == central differences of alpha(x)."""
    pos = water_minimum
    fast = vibrations.polarizability_derivatives(WATER_Z, pos)  # [9, 3, 3]
    h = 0.005
    brute = np.empty_like(fast)
    for k in range(pos.size):
        plus, minus = pos.reshape(-1).copy(), pos.reshape(-1).copy()
        plus[k] += h
        minus[k] -= h
        brute[k] = (vibrations.polarizability(WATER_Z, plus.reshape(-1, 3))
                    - vibrations.polarizability(WATER_Z, minus.reshape(-1, 3))) / (2 * h)
    np.testing.assert_allclose(fast, brute, atol=2e-3 * np.abs(brute).max())
    # and the resulting activities agree
    masses = vibrations.masses_of(WATER_Z)
    calc = GFN2(WATER_Z, pos)
    hess, _ = vibrations.hessian_and_dipole_derivatives(calc, pos)
    _, modes = vibrations.normal_modes(hess, pos, masses)
    np.testing.assert_allclose(vibrations.raman_activities(fast, modes, masses),
                               vibrations.raman_activities(brute, modes, masses), rtol=5e-3)


def test_dipole_derivatives_agree_with_field_gradients(water_minimum):
    """Sign convention check: d mu_i/dx (displaced dipoles) == -d g/dF_i (field gradients)."""
    pos = water_minimum
    # Tight SCF: the default accuracy leaves ~0.5 % noise in finite-difference dipoles.
    _, dmu = vibrations.hessian_and_dipole_derivatives(
        GFN2(WATER_Z, pos, accuracy=FIELD_ACCURACY), pos)
    f = 1e-3
    for i in range(3):
        e = np.zeros(3)
        e[i] = f
        gp = GFN2(WATER_Z, pos, field=e, accuracy=FIELD_ACCURACY).compute(pos).gradient
        gm = GFN2(WATER_Z, pos, field=-e, accuracy=FIELD_ACCURACY).compute(pos).gradient
        np.testing.assert_allclose(-(gp - gm).reshape(-1) / (2 * f), dmu[:, i],
                                   atol=2e-4 * np.abs(dmu).max())


# ----------------------------------------------------------------------------- sTDA

def _brute_force_stda(mf, a_x):
    """The sTDA equations with explicit loops over atoms and configurations (all CSFs)."""
    mol = mf.mol
    s = mol.intor("int1e_ovlp")
    w, v = np.linalg.eigh(s)
    c = (v * np.sqrt(w)) @ v.T @ mf.mo_coeff
    occ = np.nonzero(mf.mo_occ > 0)[0]
    vir = np.nonzero(mf.mo_occ == 0)[0]
    slices = mol.aoslice_by_atom()

    def q(a, p, r):
        p0, p1 = slices[a, 2], slices[a, 3]
        return float(c[p0:p1, p] @ c[p0:p1, r])

    xyz = mol.atom_coords()
    eta = [stda.HARDNESS_EH[int(zz)] for zz in mol.atom_charges()]
    al, be = 1.42 + 0.48 * a_x, 0.20 + 1.83 * a_x
    n = mol.natm
    gk, gj = np.empty((n, n)), np.empty((n, n))
    for a in range(n):
        for b in range(n):
            r = np.linalg.norm(xyz[a] - xyz[b])
            e = 0.5 * (eta[a] + eta[b])
            gk[a, b] = 1.0 / (r**al + e**-al) ** (1 / al)
            gj[a, b] = 1.0 / (r**be + (a_x * e) ** -be) ** (1 / be)
    csf = [(i, a) for i in occ for a in vir]
    amat = np.zeros((len(csf), len(csf)))
    for u, (i, a) in enumerate(csf):
        for t, (j, b) in enumerate(csf):
            val = 0.0
            for A in range(n):
                for B in range(n):
                    val += 2 * q(A, i, a) * gk[A, B] * q(B, j, b) - q(A, i, j) * gj[A, B] * q(B, a, b)
            amat[u, t] = val + (mf.mo_energy[a] - mf.mo_energy[i] if u == t else 0.0)
    omega, x = np.linalg.eigh(amat)
    with mol.with_common_orig(np.zeros(3)):
        r_ao = mol.intor("int1e_r")
    r_mo = np.einsum("xmn,mp,nq->xpq", r_ao, mf.mo_coeff, mf.mo_coeff)
    tdm = np.sqrt(2) * np.array([[sum(x[u, k] * r_mo[d, i, a] for u, (i, a) in enumerate(csf))
                                  for k in range(len(csf))] for d in range(3)])
    return omega * stda.HARTREE_EV, 2 / 3 * omega * (tdm**2).sum(0)


def test_stda_matches_explicit_equations_in_the_full_space():
    mf = stda.run_scf(WATER_Z, WATER_XYZ, basis="6-31g")
    ref_e, ref_f = _brute_force_stda(mf, 0.2)
    # A huge threshold puts every configuration in the primary space: same matrix as above.
    got = stda.stda(mf, 0.2, e_thr_ev=1e4)
    np.testing.assert_allclose(got.energy_ev, ref_e, atol=1e-8)
    np.testing.assert_allclose(got.osc_strength, ref_f, atol=1e-8)


def test_stda_close_to_full_tda_for_formaldehyde():
    from pyscf import tdscf

    mf = stda.run_scf(FORMALDEHYDE_Z, FORMALDEHYDE_XYZ)
    s = stda.stda(mf, 0.2, max_energy_ev=15.0)
    assert s.energy_ev.max() <= 15.0 and s.energy_ev.size > 10
    td = tdscf.TDA(mf)
    td.nstates = 4  # S1 (dark n->pi*) and the first bright state are among them
    td.verbose = 0
    td.kernel()
    e_full, f_full = td.e * stda.HARTREE_EV, td.oscillator_strength()
    # dark n -> pi* first, then the bright state; both within a few tenths of an eV
    assert s.osc_strength[0] < 1e-3 and f_full[0] < 1e-3
    assert abs(s.energy_ev[0] - e_full[0]) < 0.3
    bright_s = s.energy_ev[np.argmax(s.osc_strength > 0.05)]
    bright_full = e_full[np.argmax(f_full > 0.05)]
    assert abs(bright_s - bright_full) < 0.3


# ----------------------------------------------------------------------------- driver

def _smiles_inputs(smiles):
    return list(from_smiles(smiles, seed=0))


def test_compute_resumes_without_redoing_and_reports_bad_input(tmp_path):
    out = str(tmp_path / "run")
    config = SpectraConfig(skip_uv=True)
    first = spectra_run.compute(_smiles_inputs(["O", "C"]), out, config, {"t": 1}, progress=False)
    assert first["ok"] == 2 and first["failed"] == 0
    path = os.path.join(out, spectra_run.STICKS_FILE)
    with open(path, "rb") as f:
        before = f.read()
    with open(path, "ab") as f:  # a kill in the middle of an append
        f.write(b'{"qm9_index": 3, "smiles": "N", "atomic_numb')
    mols = _smiles_inputs(["O", "C", "N", "C1CC"])
    second = spectra_run.compute(mols, out, config, {"t": 1}, progress=False)
    assert (second["already_done"], second["todo"], second["ok"], second["failed"]) == (2, 2, 1, 1)
    with open(path, "rb") as f:
        after = f.read()
    assert after.startswith(before)  # finished records untouched, torn line gone
    recs = list(sticks.read(path))
    assert [r.qm9_index for r in recs] == [1, 2, 3] and recs[2].smiles == "N"
    assert recs[0].uv_energy_ev.size == 0 and recs[0].vib_freq_cm1.size == 3
    failures = spectra_run.read_failures(os.path.join(out, spectra_run.FAILURES_FILE))
    assert len(failures) == 1 and failures[0]["kind"] == "bad input"
    assert "invalid SMILES" in failures[0]["message"] and failures[0]["index"] == 4
    third = spectra_run.compute(mols, out, config, {"t": 1}, progress=False)
    assert third["todo"] == 0
    with pytest.raises(spectra_run.MetaMismatchError, match="level_of_theory"):
        spectra_run.compute(mols, out, SpectraConfig(), {"t": 1}, progress=False)


def test_invalid_smiles_failure_keeps_the_text_and_names_record_and_line(tmp_path):
    smi = tmp_path / "mols.smi"
    smi.write_text("# my molecules\n\nC1CC  ring never closed\n")
    out = str(tmp_path / "run")
    summary = spectra_run.compute(list(read_smiles_file(str(smi))), out,
                                  SpectraConfig(skip_uv=True), {"t": 1}, progress=False)
    assert summary["failed"] == 1
    (failure,) = spectra_run.read_failures(os.path.join(out, spectra_run.FAILURES_FILE))
    assert failure["smiles"] == "C1CC" and failure["index"] == 1
    assert "mols.smi:record 1 (line 3): invalid SMILES 'C1CC'" in failure["message"]


def test_changed_settings_name_only_the_keys_that_differ(tmp_path):
    out = str(tmp_path / "run")
    spectra_run.prepare_output(out, {"level_of_theory": level_of_theory(SpectraConfig()),
                                     "input": {"source": "a.smi", "seed": 0}})
    with pytest.raises(spectra_run.MetaMismatchError) as err:
        spectra_run.prepare_output(out, {"level_of_theory": level_of_theory(SpectraConfig()),
                                         "input": {"source": "a.smi", "seed": 1}})
    assert str(err.value).endswith("different input (seed: 0 -> 1); use another --out directory")
    with pytest.raises(spectra_run.MetaMismatchError) as err:
        spectra_run.prepare_output(out, {"level_of_theory": level_of_theory(
            SpectraConfig(uv_max_ev=10.0)), "input": {"source": "a.smi", "seed": 0}})
    message = str(err.value)
    assert "config.uv_max_ev: 15.0 -> 10.0" in message and "electronic: " in message
    assert "vibrational" not in message and "stored_decimals" not in message  # unchanged keys


def test_compute_exit_status_tells_a_partial_run(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["compute", "--smiles", "O,C1CC", "--out", out, "--skip-uv"]
    assert spectra_run.main(args) == spectra_run.EXIT_PARTIAL
    summary = json.loads(capsys.readouterr().out)
    assert (summary["requested"], summary["with_spectra"], summary["failed_total"]) == (2, 1, 1)
    # Re-running computes nothing and still reports the molecule without spectra...
    assert spectra_run.main(args) == spectra_run.EXIT_PARTIAL
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("1 of 2 requested molecules have spectra") and err.endswith("PARTIAL")
    # ... unless failures are accepted explicitly.
    assert spectra_run.main(args + ["--allow-failures"]) == 0
    # An error that stops the run is one line and exit status 1.
    assert spectra_run.main(["compute", "--smiles", "O", "--out", out, "--skip-uv"]) == 1
    assert "different input (smiles: 'O,C1CC' -> 'O')" in capsys.readouterr().err
    # The plot of a command-line molecule is not titled as a QM9 molecule.
    png = str(tmp_path / "water.png")
    plot.main(["--sticks", os.path.join(out, spectra_run.STICKS_FILE), "--out", png])
    assert "wrote " + png + ": command line SMILES record 1: O," in capsys.readouterr().out
    assert os.path.getsize(png) > 0


def test_plot_title_says_what_the_index_is():
    record = sticks.StickRecord(qm9_index=2, smiles="C", atomic_numbers=np.array([6, 1, 1, 1, 1]),
                                positions=np.zeros((5, 3)), vib_freq_cm1=np.zeros(0),
                                ir_intensity_km_mol=np.zeros(0), raman_activity_a4_amu=np.zeros(0),
                                uv_energy_ev=np.zeros(0), uv_osc_strength=np.zeros(0))
    assert plot.plot_title(record, {"input": {"source": "qm9pack 1.0.3"}}) == "QM9 2: C"
    assert plot.plot_title(record, {"input": {"source": "/data/mols.sdf"}}) == "mols.sdf record 2: C"
    assert plot.plot_title(record, None) == "record 2: C"


def test_parallel_workers_give_the_serial_results(tmp_path):
    config = SpectraConfig(skip_uv=True)
    mols = _smiles_inputs(["O", "C", "N"])
    spectra_run.compute(mols, str(tmp_path / "a"), config, {}, workers=1, progress=False)
    spectra_run.compute(mols, str(tmp_path / "b"), config, {}, workers=2, progress=False)
    a = {r.qm9_index: r for r in sticks.read(str(tmp_path / "a" / spectra_run.STICKS_FILE))}
    b = {r.qm9_index: r for r in sticks.read(str(tmp_path / "b" / spectra_run.STICKS_FILE))}
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for k, rec in a.items():
        np.testing.assert_allclose(rec.vib_freq_cm1, b[k].vib_freq_cm1, atol=1e-6)


def test_full_record_for_formaldehyde_round_trips(tmp_path):
    mol = MoleculeInput(7, "C=O", FORMALDEHYDE_Z, FORMALDEHYDE_XYZ)
    rec = compute_record(mol)
    assert rec.vib_freq_cm1.size == 6 and rec.uv_energy_ev.max() <= 15.0
    path = str(tmp_path / "s.jsonl")
    sticks.append(path, rec)
    back = next(sticks.read(path))
    np.testing.assert_allclose(back.raman_activity_a4_amu, rec.raman_activity_a4_amu)
    # the C=O stretch is the strongest IR band, between 1650 and 1950 cm^-1 at GFN2
    assert 1650 < back.vib_freq_cm1[np.argmax(back.ir_intensity_km_mol)] < 1950


def test_bad_inputs_get_clear_errors(tmp_path):
    xyz = tmp_path / "m.xyz"
    xyz.write_text("3\nclash\nO 0 0 0\nH 0 0 0.1\nH 0 0.8 -0.5\n3\ntruncated\nO 0 0 0\n")
    mols = list(read_xyz(str(xyz)))
    with pytest.raises(MoleculeFailure,
                       match=r"bad input: .*m\.xyz:record 1 \(line 1\): atoms 0 and 1 are 0\.100"):
        check_input(mols[0])
    with pytest.raises(MoleculeFailure,
                       match=r"m\.xyz:record 2 \(line 6\): file ends after 1 of 3 atom lines"):
        check_input(mols[1])
    radical = MoleculeInput(1, "[CH3]", np.array([6, 1, 1, 1]),
                            np.array([[0, 0, 0], [1.08, 0, 0], [-0.54, 0.93, 0], [-0.54, -0.93, 0]]))
    with pytest.raises(MoleculeFailure, match="odd number of electrons"):
        check_input(radical)


# ----------------------------------------------------------------------------- broadening

def test_broadening_line_shapes_and_grids():
    assert broadening.UV_GRID_EV.shape == (701,) and broadening.VIB_GRID_CM1.shape == (3501,)
    grid = np.arange(0.0, 2000.0, 0.5)
    lor = broadening.broaden([1000.0], [3.0], grid, "lorentzian", 8.0)
    assert lor[grid == 1000.0][0] == pytest.approx(3.0)  # peak height = intensity
    assert lor[grid == 1008.0][0] == pytest.approx(1.5)  # half maximum at x0 + HWHM
    gau = broadening.broaden([1000.0], [2.0], grid, "gaussian", 5.0)
    assert gau.sum() * 0.5 == pytest.approx(2.0 * 5.0 * np.sqrt(2 * np.pi), rel=1e-6)
    two = broadening.broaden([900.0, 1000.0], [1.0, 3.0], grid, "lorentzian", 8.0)
    np.testing.assert_allclose(two, broadening.broaden([900.0], [1.0], grid) + lor)
    with pytest.raises(ValueError, match="line width"):
        broadening.broaden([1.0], [1.0], grid, "gaussian", 0.0)


def test_failures_file_with_torn_line_is_repaired(tmp_path):
    path = tmp_path / "failures.jsonl"
    path.write_text(json.dumps({"index": 1, "kind": "bad input"}) + "\n" + '{"index": 2, "ki')
    assert [f["index"] for f in spectra_run.read_failures(str(path))] == [1]
    assert path.read_text().endswith("}\n")


# ----------------------------------------------------------------------------- inputs

def test_sdf_reader_keeps_3d_coordinates_and_rejects_2d(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from data_pipelines.spectra.inputs import read_sdf

    mol3d = next(iter(from_smiles(["CCO"], seed=1)))
    path = tmp_path / "m.sdf"
    writer = Chem.SDWriter(str(path))
    m = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.EmbedMolecule(m, randomSeed=1)
    conf = m.GetConformer()
    for i, p in enumerate(mol3d.positions):
        conf.SetAtomPosition(i, p.tolist())
    writer.write(m)
    flat = Chem.MolFromSmiles("CO")
    AllChem.Compute2DCoords(flat)
    writer.write(flat)
    writer.close()
    got = list(read_sdf(str(path)))
    np.testing.assert_allclose(got[0].positions, mol3d.positions, atol=1e-4)
    np.testing.assert_array_equal(got[0].numbers, mol3d.numbers)
    with pytest.raises(MoleculeFailure, match=r"m\.sdf:record 2: the record has no 3D coordinates"):
        check_input(got[1])


def test_qm9_inputs_by_index_and_sample_prefix():
    from data_pipelines.spectra.inputs import qm9_sample_positions, read_qm9

    mols = read_qm9(indices=[6, 1])
    assert [m.index for m in mols] == [6, 1]
    assert sorted(mols[0].numbers.tolist()) == [1, 1, 6, 8]  # formaldehyde
    np.testing.assert_array_equal(qm9_sample_positions(10, 0), qm9_sample_positions(50, 0)[:10])
    with pytest.raises(ValueError, match="not in qm9pack"):
        read_qm9(indices=[999_999])


def test_second_run_on_a_busy_directory_is_refused(tmp_path):
    import fcntl

    out = str(tmp_path / "busy")
    os.makedirs(out)
    with open(os.path.join(out, spectra_run.LOCK_FILE), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # stands in for a running process
        with pytest.raises(spectra_run.RunLockedError, match="in use by another run"):
            spectra_run.compute(_smiles_inputs(["O"]), out, SpectraConfig(skip_uv=True), {},
                                progress=False)
        with pytest.raises(spectra_run.RunLockedError):
            spectra_run.finalize(out)
    # released: the run goes ahead, and finalize writes a gzip copy that reads back the same
    spectra_run.compute(_smiles_inputs(["O"]), out, SpectraConfig(skip_uv=True), {},
                        progress=False)
    assert "1 molecules" in spectra_run.finalize(out)
    (a,), (b,) = (list(sticks.read(os.path.join(out, spectra_run.STICKS_FILE + ext)))
                  for ext in ("", ".gz"))
    np.testing.assert_array_equal(a.vib_freq_cm1, b.vib_freq_cm1)
