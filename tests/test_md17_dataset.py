"""The MD17 / rMD17 / GFN2 builder: contents, units, splits, clear errors on bad files; the shipped
GFN2-xTB stand-in files; exact resume of the GFN2 trajectory generator."""

import json
import os
import shutil

import numpy as np
import pytest

from data_pipelines import md17, md17_gfn2
from data_pipelines.fixtures import md17 as fixture
from mspec.data import datasets


@pytest.fixture(scope="module")
def npz_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("md17_npz"))
    paths = fixture.write(d)
    assert all(os.path.isfile(p) for p in paths)
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_md17_contents_units_and_random_splits(npz_dir, data_dir):
    builder = datasets.get_builder("md17/ethanol", data_dir, manual_dir=npz_dir)
    sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert sizes == {"train_950": 950, "validation_50": 50, "test_950": fixture.NUM_FRAMES - 1000}
    R, E, F = fixture.trajectory()
    perm = np.random.default_rng(1).permutation(fixture.NUM_FRAMES)
    for split, idx in (("train_950", perm[:950]), ("validation_50", perm[950:1000]), ("test_950", perm[1000:])):
        src = datasets.open_split(builder, split)
        frames = [src[i]["frame"] for i in range(len(src))]
        np.testing.assert_array_equal(frames, idx)
    ex = datasets.open_split(builder, "test_950")[3]
    f = ex["frame"]
    np.testing.assert_array_equal(ex["atomic_numbers"], fixture.ETHANOL_Z)
    np.testing.assert_allclose(ex["positions"], R[f], rtol=1e-6)  # Å, float32
    assert ex["energy"] == E[f]  # kcal/mol, float64, unconverted
    np.testing.assert_allclose(ex["forces"], F[f], rtol=1e-6)  # kcal/mol/Å
    # Ethanol has 2 rotatable torsions (C-C and C-O) for Frad noise; same for every frame.
    assert ex["torsions"].shape == (2, 4)
    meta = dict(builder.info.metadata)
    assert meta["num_frames"] == fixture.NUM_FRAMES and meta["energy_unit"] == "kcal/mol"


def test_rmd17_official_splits(npz_dir, data_dir):
    builder = datasets.get_builder("md17/rmd17_ethanol", data_dir, manual_dir=npz_dir)
    for k in (1, 5):
        train = np.loadtxt(os.path.join(npz_dir, "splits", f"index_train_0{k}.csv"), dtype=int)
        test = np.loadtxt(os.path.join(npz_dir, "splits", f"index_test_0{k}.csv"), dtype=int)
        for split, idx in ((f"train_rmd17_0{k}", train[:950]), (f"validation_rmd17_0{k}", train[950:]),
                           (f"test_rmd17_0{k}", test)):
            src = datasets.open_split(builder, split)
            np.testing.assert_array_equal([src[i]["frame"] for i in range(len(src))], idx)


def test_missing_file_names_the_file_and_the_public_release(tmp_path):
    with pytest.raises(md17.MD17SourceError, match=r"md17_aspirin\.npz not found.*sgdml\.org"):
        datasets.get_builder("md17/aspirin", str(tmp_path / "tfds"), manual_dir=str(tmp_path))
    with pytest.raises(md17.MD17SourceError, match=r"rmd17_toluene\.npz not found.*figshare"):
        datasets.get_builder("md17/rmd17_toluene", str(tmp_path / "tfds"), manual_dir=str(tmp_path))
    # Nothing half-built is left that would look complete.
    with pytest.raises(datasets.DatasetError, match="not prepared"):
        datasets.get_builder("md17/aspirin", str(tmp_path / "tfds"), build=False)


def _bad_copy(npz_dir, tmp_path, **changes):
    d = dict(np.load(os.path.join(npz_dir, "md17_ethanol.npz")))
    d.update(changes)
    path = str(tmp_path / "md17_ethanol.npz")
    np.savez(path, **d)
    return path


def test_bad_files_give_clear_errors(npz_dir, tmp_path):
    good = os.path.join(npz_dir, "md17_ethanol.npz")
    truncated = str(tmp_path / "trunc.npz")
    with open(good, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(md17.MD17SourceError, match="trunc.npz: unreadable npz"):
        md17.read_md17(truncated)
    R = np.load(good)["R"].copy()
    R[7, 2, 1] = np.nan
    with pytest.raises(md17.MD17SourceError, match="non-finite positions in frame 7"):
        md17.read_md17(_bad_copy(npz_dir, tmp_path, R=R))
    F = np.load(good)["F"][:, :5]
    with pytest.raises(md17.MD17SourceError, match=r"forces have shape \(1100, 5, 3\)"):
        md17.read_md17(_bad_copy(npz_dir, tmp_path, F=F))
    E = np.load(good)["E"][:-1]
    with pytest.raises(md17.MD17SourceError, match="energies have shape"):
        md17.read_md17(_bad_copy(npz_dir, tmp_path, E=E))
    d = dict(np.load(good))
    del d["F"]
    np.savez(str(tmp_path / "nof.npz"), **d)
    with pytest.raises(md17.MD17SourceError, match=r"missing key\(s\) \['F'\]"):
        md17.read_md17(str(tmp_path / "nof.npz"))
    with pytest.raises(md17.MD17SourceError, match="too few"):
        md17.random_splits(1000)


GFN2_FILES = sorted(
    f"md17_{md17.MD17_FILE_STEMS[m]}.npz" for m in md17.MOLECULES
)


@pytest.mark.parametrize("name", GFN2_FILES)
def test_shipped_gfn2_files_have_the_md17_layout(name):
    path = os.path.join(md17.GFN2_DIR, name)
    if not os.path.isfile(path):
        pytest.fail(f"{path} missing: run python -m data_pipelines.md17_gfn2")
    d = np.load(path)
    n, N = d["R"].shape[:2]
    assert d["R"].dtype == np.float64 and d["F"].shape == (n, N, 3) and d["E"].shape == (n, 1)
    assert n == md17_gfn2.NUM_FRAMES and "GFN2" in str(d["theory"]) and "NOT" in str(d["theory"])
    z = d["z"].astype(int)
    heavy = z > 1
    assert heavy[: heavy.sum()].all()  # heavy atoms first, as in MD17
    smiles_atoms = {"aspirin": 21, "benzene2017": 12, "ethanol": 9, "malonaldehyde": 9,
                    "naphthalene": 18, "salicylic": 16, "toluene": 15, "uracil": 12}
    assert N == smiles_atoms[name[5:-4]]
    # Bonds stay intact over the 500 K trajectory: nearest-neighbour distances stay physical.
    dist = np.linalg.norm(d["R"][:, :, None] - d["R"][:, None], axis=-1) + 10 * np.eye(N)
    assert 0.8 < dist.min() and dist.min(axis=2).max() < 1.8


def test_gfn2_file_matches_a_fresh_gfn2_calculation():
    pytest.importorskip("tblite")
    path = os.path.join(md17.GFN2_DIR, "md17_ethanol.npz")
    if not os.path.isfile(path):
        pytest.fail(f"{path} missing")
    d = np.load(path)
    for frame in (0, 500):
        calc = md17_gfn2.GFN2(d["z"].astype(int), d["R"][frame])
        e, f = calc(d["R"][frame])
        # The stored values were computed with the previous MD step's wavefunction as the SCC
        # guess: they agree with a fresh calculation to the SCC convergence tolerance.
        assert e == pytest.approx(d["E"][frame, 0], abs=1e-4)
        np.testing.assert_allclose(f, d["F"][frame], rtol=0, atol=5e-3)


def test_gfn2_readme_and_metadata_label_the_data():
    with open(os.path.join(md17.GFN2_DIR, "README.md")) as f:
        text = f.read()
    assert "not the dft md17" in text.lower()
    with open(os.path.join(md17.GFN2_DIR, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["method"].startswith("GFN2-xTB") and meta["temperature_K"] == 500


def test_gfn2_generator_resumes_after_a_kill(tmp_path, monkeypatch):
    pytest.importorskip("tblite")
    monkeypatch.setattr(md17_gfn2, "EQUILIBRATION_STEPS", 10)
    monkeypatch.setattr(md17_gfn2, "SAVE_EVERY", 2)
    monkeypatch.setattr(md17_gfn2, "CHECKPOINT_EVERY", 5)
    # Skip the relaxation, so energy calls are: 1 initial + 10 equilibration + 2 per frame.
    monkeypatch.setattr(md17_gfn2, "relax", lambda calc, x, masses: x)
    ref = md17_gfn2.run_molecule("ethanol", str(tmp_path / "ref"), num_frames=12)

    calls = {"n": 0}
    original = md17_gfn2.GFN2.__call__

    def dying(self, positions):
        calls["n"] += 1
        if calls["n"] > 26:  # after the frame-5 and before the frame-10 checkpoint
            raise KeyboardInterrupt
        return original(self, positions)

    monkeypatch.setattr(md17_gfn2.GFN2, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        md17_gfn2.run_molecule("ethanol", str(tmp_path / "killed"), num_frames=12)
    assert not os.path.exists(tmp_path / "killed" / "md17_ethanol.npz")
    assert len(np.load(tmp_path / "killed" / ".partial" / "ethanol.npz")["R"]) == 5
    monkeypatch.setattr(md17_gfn2.GFN2, "__call__", original)
    resumed = md17_gfn2.run_molecule("ethanol", str(tmp_path / "killed"), num_frames=12)
    a, b = np.load(ref), np.load(resumed)
    # Frames before the checkpoint agree to round-off (two runs differ in the last bit already:
    # tblite is not bitwise reproducible). After it, the SCC of the first resumed step starts
    # without the previous step's wavefunction as its guess, so the trajectory continues within
    # the SCC convergence tolerance (~1e-7 Å here).
    np.testing.assert_allclose(b["R"][:5], a["R"][:5], rtol=0, atol=1e-12)
    np.testing.assert_allclose(b["R"], a["R"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(b["E"], a["E"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(b["F"], a["F"], rtol=0, atol=1e-3)
    assert not os.path.exists(tmp_path / "killed" / ".partial" / "ethanol.npz")
    shutil.rmtree(tmp_path / "killed")
