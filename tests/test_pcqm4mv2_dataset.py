"""PCQM4Mv2 3D builder from fixtures: counts, dtypes, units, splits, counted skips, both layouts
agree, torsions, and an exact result after a build killed mid-way is resumed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipelines import pcqm4mv2, pcqm4mv2_source
from data_pipelines.fixtures import pcqm4mv2 as fixture
from mspec.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("pcqm_src")
    fixture.write(str(d))
    return str(d)


def _all(builder):
    out = {}
    for split in ("train", "validation", "test"):
        src = datasets.open_split(builder, split)
        out[split] = [src[i] for i in range(len(src))]
    return out


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("pcqm_tfds"))
    return {cfg: datasets.get_builder(f"pcqm4mv2/{cfg}", data_dir, source_dir=source,
                                      num_workers=1, chunk_size=3) for cfg in ("sdf", "xyz")}


def test_counts_splits_skips_and_report(built):
    for cfg, reason in (("sdf", "rdkit_cannot_parse"), ("xyz", "atom_count_mismatch")):
        b = built[cfg]
        assert {k: v.num_examples for k, v in b.info.splits.items()} == {
            "train": 7, "validation": 1, "test": 1}
        meta = b.info.metadata
        assert meta["num_molecules"] == 9 and meta["skipped"] == 1
        assert meta["skip_reasons"] == {reason: 1}
        report = json.load(open(os.path.join(b.data_dir, "build_report.json")))
        assert [s["idx"] for s in report["skipped_molecules"]] == [fixture.BROKEN]
        assert reason in report["skipped_molecules"][0]["reason"]
        # Split = seed-1 permutation of the 9 kept molecules in file order.
        kept = [i for i in range(10) if i != fixture.BROKEN]
        perm = np.random.default_rng(1).permutation(9)
        rows = _all(b)
        assert [int(e["index"]) for e in rows["validation"]] == [kept[perm[0]]]
        assert [int(e["index"]) for e in rows["test"]] == [kept[perm[1]]]
        assert [int(e["index"]) for e in rows["train"]] == [kept[p] for p in perm[2:]]
        assert not os.path.exists(b.staging_dir)  # staging removed after success


def test_features_units_and_charges(built):
    rows = {int(e["index"]): e for s in _all(built["sdf"]).values() for e in s}
    for i, e in rows.items():
        assert e["atomic_numbers"].dtype == np.int32 and e["positions"].dtype == np.float32
        assert e["homolumogap"] == pytest.approx(fixture.GAPS[i], abs=0)  # eV, exact float64
        assert e["smiles"].decode() == fixture.SMILES[i]
        ref = fixture.molecule(i)
        assert len(e["atomic_numbers"]) == ref.GetNumAtoms()  # explicit H kept
        np.testing.assert_allclose(e["positions"], ref.GetConformer().GetPositions(), atol=5.1e-5)
        t = len(e["torsions"])
        assert e["torsion_moving"].size == t * len(e["atomic_numbers"])
        assert (t > 0) == (e["torsion_status"] == b"ok")
    assert rows[3]["formal_charge"] == 1  # tyramine cation
    assert rows[1]["formal_charge"] == 0  # zwitterion
    assert {5, 14, 35, 17, 16}.issubset({int(z) for e in rows.values() for z in e["atomic_numbers"]})
    assert rows[2]["torsion_status"] == b"no_rotatable_torsion"  # indole


def test_sdf_and_xyz_layouts_agree(built):
    a = {int(e["index"]): e for s in _all(built["sdf"]).values() for e in s}
    b = {int(e["index"]): e for s in _all(built["xyz"]).values() for e in s}
    assert sorted(a) == sorted(b)
    for i in a:
        np.testing.assert_array_equal(a[i]["atomic_numbers"], b[i]["atomic_numbers"])
        np.testing.assert_allclose(a[i]["positions"], b[i]["positions"], atol=1e-4)
        np.testing.assert_array_equal(a[i]["torsions"], b[i]["torsions"])
        assert a[i]["formal_charge"] == b[i]["formal_charge"]


def test_split_dict_is_read_without_torch(source):
    split = pcqm4mv2_source.read_split_dict(os.path.join(source, "split_dict.pt"))
    np.testing.assert_array_equal(split["train"], np.arange(10))
    assert split["test-challenge"].tolist() == [12]
    assert "torch" not in sys.modules


def test_killed_build_resumes_to_the_same_dataset(source, built, tmp_path, capfd):
    data_dir = str(tmp_path / "tfds")
    cmd = [sys.executable, "-m", "data_pipelines.pcqm4mv2", "--config", "sdf", "--source_dir",
           source, "--data_dir", data_dir, "--num_workers", "1", "--chunk_size", "2"]
    env = dict(os.environ, **{pcqm4mv2._DELAY_ENV: "30"})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    staging = os.path.join(data_dir, "pcqm4mv2_staging", "sdf")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
                os.path.isdir(staging) and any(f.endswith(".npz") and not ".tmp" in f
                                               for f in os.listdir(staging))):
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted(f for f in os.listdir(staging) if f.startswith("chunk_") and ".tmp" not in f)
    assert 1 <= len(done) < 5, done  # killed after the first chunk, before the last
    builder = pcqm4mv2.PCQM4Mv2(config="sdf", data_dir=data_dir, source_dir=source,
                                num_workers=1, chunk_size=2, file_format="array_record")
    assert not builder.is_prepared()  # nothing that looks complete
    capfd.readouterr()
    builder.download_and_prepare()
    assert f"resumed, {len(done)} of 5 chunks were already staged" in capfd.readouterr().err
    fresh, ref = _all(builder), _all(built["sdf"])
    for split in ref:
        assert [int(e["index"]) for e in fresh[split]] == [int(e["index"]) for e in ref[split]]
        for x, y in zip(fresh[split], ref[split]):
            np.testing.assert_array_equal(x["positions"], y["positions"])
            np.testing.assert_array_equal(x["torsion_moving"], y["torsion_moving"])


def test_process_pool_gives_the_same_dataset(source, built, tmp_path):
    b = datasets.get_builder("pcqm4mv2/sdf", str(tmp_path), source_dir=source, num_workers=2,
                             chunk_size=2)
    fresh, ref = _all(b), _all(built["sdf"])
    for split in ref:
        assert [int(e["index"]) for e in fresh[split]] == [int(e["index"]) for e in ref[split]]
        for x, y in zip(fresh[split], ref[split]):
            np.testing.assert_array_equal(x["positions"], y["positions"])
            np.testing.assert_array_equal(x["torsions"], y["torsions"])


def test_missing_files_name_the_release(tmp_path):
    with pytest.raises(pcqm4mv2_source.PCQMSourceError, match="data.csv.gz.*ogb"):
        datasets.get_builder("pcqm4mv2/sdf", str(tmp_path / "d"), source_dir=str(tmp_path))
