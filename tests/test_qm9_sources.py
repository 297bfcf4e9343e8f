"""The raw QM9 releases (xyz tarball, PyG layout) give the same molecules, order and targets as
qm9pack; built from fixtures generated from real qm9pack rows."""

import os

import numpy as np
import pytest
from rdkit import Chem

from data_pipelines import qm9_raw, qm9pack_source
from data_pipelines.fixtures import _qm9_molecules, qm9_pyg, qm9_xyz
from mspec.data import datasets


@pytest.fixture(scope="module")
def raw_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qm9raw")
    qm9_xyz.write(str(root / "xyz"))
    qm9_pyg.write(str(root / "pyg"))
    return {"xyz": str(root / "xyz"), "pyg": str(root / "pyg"), "root": root}


def _canonical(smiles):
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles), isomericSmiles=False)


def test_mathematica_numbers():
    assert qm9_raw.parse_float("2.77*^-4") == pytest.approx(2.77e-4, rel=0, abs=0)
    assert qm9_raw.parse_float("0.") == 0.0
    assert qm9_raw.parse_float("-7.E-6") == -7e-6


def test_fixture_uses_awkward_number_styles(raw_dirs):
    import tarfile

    with tarfile.open(f"{raw_dirs['xyz']}/{qm9_raw.XYZ_TARBALL}") as tar:
        text = "".join(tar.extractfile(m).read().decode() for m in tar.getmembers())
    assert "*^-" in text  # Mathematica-style exponents, as in the release


def test_all_sources_agree_with_qm9pack(raw_dirs):
    ref = {i: qm9pack_source.parse_row(r, f"qm9pack:{i}")
           for i, r in _qm9_molecules.qm9pack_rows().items()}
    xyz = qm9_raw.read_xyz_tarball(raw_dirs["xyz"], expect_full=False)
    pyg = list(qm9_raw.read_pyg_raw(raw_dirs["pyg"], expect_full=False))
    # Uncharacterised molecules (58, 61) are in the files but dropped; order = ascending index.
    assert [r["index"] for r in xyz] == [r["index"] for r in pyg] == sorted(ref)
    for a, b in zip(xyz, pyg):
        r = ref[a["index"]]
        np.testing.assert_array_equal(a["targets"], r["targets"])  # bit-identical
        np.testing.assert_array_equal(b["targets"], r["targets"])
        np.testing.assert_array_equal(a["atomic_numbers"], r["atomic_numbers"])
        np.testing.assert_array_equal(b["atomic_numbers"], r["atomic_numbers"])
        np.testing.assert_array_equal(a["positions"], r["positions"])  # 10 decimals: exact
        np.testing.assert_allclose(b["positions"], r["positions"], atol=5.1e-5)  # SDF: 4 decimals
        assert a["smiles"] == r["smiles"]
        assert _canonical(b["smiles"]) == _canonical(r["smiles"])


def test_builders_from_both_releases_agree(raw_dirs, tmp_path):
    built = {}
    for cfg in ("xyz", "pyg"):
        b = datasets.get_builder(f"qm9/{cfg}", str(tmp_path), source_dir=raw_dirs[cfg],
                                 allow_partial=True, num_workers=1)
        built[cfg] = {s: datasets.open_split(b, s) for s in ("train", "validation", "test")}
        assert {k: v.num_examples for k, v in b.info.splits.items()} == {
            "train": 6, "validation": 1, "test": 1}
    ref = {i: qm9pack_source.parse_row(r, f"qm9pack:{i}")
           for i, r in _qm9_molecules.qm9pack_rows().items()}
    for split in ("train", "validation", "test"):
        x, p = built["xyz"][split], built["pyg"][split]
        assert len(x) == len(p)
        for i in range(len(x)):
            assert int(x[i]["index"]) == int(p[i]["index"])
            assert x[i]["positions"].dtype == np.float32 and x[i]["targets"].dtype == np.float64
            np.testing.assert_array_equal(x[i]["targets"], p[i]["targets"])
            np.testing.assert_array_equal(x[i]["targets"], ref[int(x[i]["index"])]["targets"])
            np.testing.assert_allclose(x[i]["positions"], p[i]["positions"], atol=6e-5)
            np.testing.assert_array_equal(x[i]["torsions"], p[i]["torsions"])
    # Energies are stored in eV (converted from Hartree) like the qm9pack configs.
    u0 = built["xyz"]["train"][0]["targets"][qm9pack_source.TARGET_NAMES.index("U0")]
    assert -30000 < u0 < -1000


def test_missing_files_name_the_release(tmp_path):
    with pytest.raises(qm9pack_source.QM9SourceError, match="dsgdb9nsd.xyz.tar.bz2.*figshare"):
        qm9_raw.read_xyz_tarball(str(tmp_path))
    with pytest.raises(qm9pack_source.QM9SourceError, match="gdb9.sdf"):
        list(qm9_raw.read_pyg_raw(str(tmp_path)))


def test_full_release_expected_unless_partial(raw_dirs):
    with pytest.raises(qm9pack_source.QM9SourceError, match="lists 2 molecules, expected 3054"):
        qm9_raw.read_xyz_tarball(raw_dirs["xyz"])


def test_fixture_cli_writes_every_format(tmp_path, capsys):
    from data_pipelines import fixtures
    from data_pipelines.fixtures.__main__ import main

    assert main([str(tmp_path)]) == 0
    names = fixtures.available_modules()
    assert {"qm9_xyz", "qm9_pyg", "qm9s", "pcqm4mv2"} <= set(names)
    printed = capsys.readouterr().out
    for name in names:
        assert f"{name}:" in printed
        assert any(os.scandir(tmp_path / name))
    for line in printed.splitlines():
        if line.startswith("  "):
            assert os.path.isfile(line.strip()), line


def test_builders_write_the_label_order_the_library_reads():
    """Fine-tuning finds a QM9 target by its column in ``targets``; the builders write it."""
    from mspec.training import targets

    assert qm9pack_source.TARGET_NAMES == targets.QM9_LABEL_COLUMNS
    assert set(targets.QM9_TARGETS) <= set(targets.QM9_LABEL_COLUMNS)
