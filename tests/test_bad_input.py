"""Bad input in every raw format: a clear error naming the file, the record and the fault (or a
counted skip where that is the documented policy), and no dataset that looks complete."""

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from data_pipelines import pcqm4mv2_source, qm9_raw, torch_pickle
from data_pipelines.fixtures import pcqm4mv2 as pcqm_fixture
from data_pipelines.fixtures import qm9_pyg, qm9_xyz, torch_pt
from data_pipelines.fixtures import qm9s as qm9s_fixture
from data_pipelines.qm9pack_source import QM9SourceError
from data_pipelines.qm9s_source import QM9SSourceError
from mspec.data import datasets


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixtures")
    qm9_xyz.write(str(root / "xyz"))
    qm9_pyg.write(str(root / "pyg"))
    qm9s_fixture.write(str(root / "qm9s"))
    pcqm_fixture.write(str(root / "pcqm"))
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


# ---- QM9 xyz tarball -------------------------------------------------------------------------

def _rewrite_member(directory, member, edit):
    path = os.path.join(directory, qm9_raw.XYZ_TARBALL)
    with tarfile.open(path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    files[member] = edit(files[member].decode()).encode()
    with tarfile.open(path, "w:bz2") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("edit, fault", [
    (lambda t: "14" + t[2:], "atom count 14 disagrees"),                 # 15 atoms in the file
    (lambda t: "16" + t[2:], "atom count 16 disagrees"),
    (lambda t: t.replace("\nO\t", "\nSi\t", 1), r"unsupported element.*Si"),
    (lambda t: t.replace("\nC\t", "\nC\tnan", 1), "NaN or inf|cannot parse"),
    (lambda t: t.replace("gdb 81\t", "gdb 81\t1.0\t", 1), "15 properties"),
])
def test_xyz_member_faults_name_the_member(fixtures, tmp_path, edit, fault):
    d = _copy(fixtures / "xyz", tmp_path / "x")
    _rewrite_member(d, "dsgdb9nsd_000081.xyz", edit)
    with pytest.raises(QM9SourceError, match=rf"dsgdb9nsd_000081.xyz.*({fault})"):
        qm9_raw.read_xyz_tarball(d, expect_full=False)


def test_truncated_tarball(fixtures, tmp_path):
    d = _copy(fixtures / "xyz", tmp_path / "x")
    path = os.path.join(d, qm9_raw.XYZ_TARBALL)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(QM9SourceError, match=r"dsgdb9nsd.xyz.tar.bz2: truncated or corrupt"):
        qm9_raw.read_xyz_tarball(d, expect_full=False)


def test_uncharacterized_header_shift_is_detected(fixtures, tmp_path):
    d = _copy(fixtures / "xyz", tmp_path / "x")
    path = os.path.join(d, qm9_raw.UNCHARACTERIZED)
    text = open(path).read().split("\n")
    open(path, "w").write("\n".join(text[:2] + [" an extra header line"] + text[2:]))
    with pytest.raises(QM9SourceError, match="uncharacterized.txt:10: expected a row"):
        qm9_raw.read_xyz_tarball(d, expect_full=False)


# ---- QM9 PyG layout --------------------------------------------------------------------------

def test_pyg_csv_shorter_than_sdf(fixtures, tmp_path):
    d = _copy(fixtures / "pyg", tmp_path / "p")
    path = os.path.join(d, qm9_raw.PYG_CSV)
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:-1]) + "\n")
    with pytest.raises(QM9SourceError, match=r"gdb9.sdf has 10 molecules but .*9 rows"):
        list(qm9_raw.read_pyg_raw(d, expect_full=False))


def test_pyg_unparsable_molblock(fixtures, tmp_path):
    d = _copy(fixtures / "pyg", tmp_path / "p")
    path = os.path.join(d, qm9_raw.PYG_SDF)
    blocks = open(path).read().split("$$$$\n")
    blocks[2] = "gdb_57\n  garbage\n\n  not a counts line\nM  END\n"
    open(path, "w").write("$$$$\n".join(blocks))
    with pytest.raises(QM9SourceError, match=r"gdb9.sdf:molecule 3 \(gdb_57\): RDKit cannot parse"):
        list(qm9_raw.read_pyg_raw(d, expect_full=False))


def test_pyg_truncated_sdf(fixtures, tmp_path):
    d = _copy(fixtures / "pyg", tmp_path / "p")
    path = os.path.join(d, qm9_raw.PYG_SDF)
    text = open(path).read()
    open(path, "w").write(text[: len(text) - 300])
    with pytest.raises(QM9SourceError, match=r"gdb9.sdf: does not end with"):
        list(qm9_raw.read_pyg_raw(d, expect_full=False))


# ---- QM9S ------------------------------------------------------------------------------------

def _edit_stick_line(directory, line_no, edit):
    path = os.path.join(directory, "sticks.jsonl")
    lines = open(path).read().splitlines()
    rec = json.loads(lines[line_no - 1])
    edit(rec)
    lines[line_no - 1] = json.dumps(rec)
    open(path, "w").write("\n".join(lines) + "\n")


@pytest.mark.parametrize("edit, fault", [
    (lambda r: r["ir_intensity_km_mol"].__setitem__(0, float("nan")), "ir_intensity_km_mol contains NaN"),
    (lambda r: r["raman_activity_a4_amu"].__setitem__(1, -2.0), "raman_activity_a4_amu has a negative"),
    (lambda r: r["uv_osc_strength"].pop(), "uv_energy_ev has 6 entries but uv_osc_strength has 5"),
])
def test_bad_sticks_name_file_and_line(fixtures, tmp_path, edit, fault):
    d = _copy(fixtures / "qm9s" / "gfn2", tmp_path / "g")
    _edit_stick_line(d, 3, edit)
    with pytest.raises(QM9SSourceError, match=rf"sticks.jsonl:3: {fault}"):
        datasets.get_builder("qm9s/gfn2", str(tmp_path / "tfds"), source_dir=d, num_workers=1)


def _rewrite_pt(path, **changes):
    obj = torch_pickle.load(path, mmap=False)
    arrays, slices = torch_pickle.pyg_collated(obj)
    arrays.update(changes)
    conv = {k: (torch_pt.Tensor(np.asarray(v)) if isinstance(v, np.ndarray) else v)
            for k, v in arrays.items()}
    torch_pt.save((conv, {k: torch_pt.Tensor(v) for k, v in slices.items()},
                   torch_pt.InMemoryClass), path)
    return arrays


def test_pt_wrong_length_nan_negative_and_atoms(fixtures, tmp_path):
    pt_rel = os.path.join("processed", "data_with_uv_ir_raman.pt")
    cases = []
    base = torch_pickle.pyg_collated(torch_pickle.load(
        str(fixtures / "qm9s" / "release_pt" / pt_rel), mmap=False))[0]
    ir = np.array(base["ir"])
    ir[4, 100] = np.nan
    cases.append(({"ir": ir}, r"graph 4 \(gdb_\d+\): ir spectrum has NaN/inf at point 100"))
    uv = np.array(base["uv"])
    uv[2, 5] = -1.0
    cases.append(({"uv": uv}, r"graph 2 \(gdb_\d+\): uv spectrum has a negative intensity"))
    cases.append(({"raman": np.array(base["raman"])[:, :3500]},
                  r"graph \d \(gdb_\d+\): raman spectrum has 3500 points, expected 3501"))
    z = np.array(base["z"])
    z[0] = 7 if z[0] != 7 else 6
    cases.append(({"z": z}, r"graph 0 \(gdb_55\): atoms .* disagree with QM9 molecule 55"))
    for k, (change, fault) in enumerate(cases):
        d = _copy(fixtures / "qm9s" / "release_pt", tmp_path / f"r{k}")
        _rewrite_pt(os.path.join(d, pt_rel), **change)
        data_dir = str(tmp_path / f"tfds{k}")
        with pytest.raises(QM9SSourceError, match=fault):
            datasets.get_builder("qm9s/release", data_dir, source_dir=d, num_workers=1)
        # An interrupted build leaves nothing that looks like a prepared dataset.
        with pytest.raises(datasets.DatasetError, match="not prepared"):
            datasets.get_builder("qm9s/release", data_dir, build=False)


def test_truncated_pt(fixtures, tmp_path):
    d = _copy(fixtures / "qm9s" / "release_pt", tmp_path / "r")
    path = os.path.join(d, "processed", "data_with_uv_ir_raman.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 5000])
    with pytest.raises(QM9SSourceError, match=r"data_with_uv_ir_raman.pt: not a readable torch zip"):
        datasets.get_builder("qm9s/release", str(tmp_path / "tfds"), source_dir=d)


def test_pt_with_foreign_code_is_refused(tmp_path):
    import pickle
    import zipfile

    path = str(tmp_path / "evil.pt")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(os.system, protocol=2))
    with pytest.raises(torch_pickle.TorchFileError, match="refusing to unpickle posix.system"):
        torch_pickle.load(path)


@pytest.mark.parametrize("kind, edit, fault", [
    ("ir", lambda v: v[:-1], r"ir_boraden.csv:line 4: ir spectrum has 3500 points"),
    ("uv", lambda v: v[:10] + ["nan"] + v[11:], r"uv_boraden.csv:line 4: uv spectrum has NaN/inf at point 10"),
    ("raman", lambda v: ["-0.5"] + v[1:], r"raman_boraden.csv:line 4: raman spectrum has a negative"),
    ("uv", lambda v: v[:3] + ["abc"] + v[4:], r"uv_boraden.csv:line 4: non-numeric"),
])
def test_bad_csv_rows(fixtures, tmp_path, kind, edit, fault):
    d = _copy(fixtures / "qm9s" / "release_csv", tmp_path / "c")
    path = os.path.join(d, f"{kind}_boraden.csv")
    lines = open(path).read().splitlines()
    parts = lines[3].split(",")
    lines[3] = ",".join([parts[0]] + edit(parts[1:]))
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(QM9SSourceError, match=fault):
        datasets.get_builder("qm9s/release", str(tmp_path / "tfds"), source_dir=d)
    assert not [p for p in os.listdir(tmp_path / "tfds") if p.startswith("qm9s_staging")]


def test_csv_truncated_file(fixtures, tmp_path):
    d = _copy(fixtures / "qm9s" / "release_csv", tmp_path / "c")
    path = os.path.join(d, "raman_boraden.csv")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:-2]) + "\n")
    with pytest.raises(QM9SSourceError, match=r"raman_boraden.csv ends at row 6 but"):
        datasets.get_builder("qm9s/release", str(tmp_path / "tfds"), source_dir=d)


# ---- PCQM4Mv2 --------------------------------------------------------------------------------

def test_pcqm_truncated_csv(fixtures, tmp_path):
    d = _copy(fixtures / "pcqm", tmp_path / "p")
    path = os.path.join(d, "data.csv.gz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 40])
    with pytest.raises(pcqm4mv2_source.PCQMSourceError, match=r"data.csv.gz: (truncated|idx)"):
        datasets.get_builder("pcqm4mv2/sdf", str(tmp_path / "tfds"), source_dir=d, num_workers=1)


def test_pcqm_truncated_sdf(fixtures, tmp_path):
    d = _copy(fixtures / "pcqm", tmp_path / "p")
    path = os.path.join(d, "pcqm4m-v2-train.sdf")
    text = open(path).read()
    open(path, "w").write(text[: text.rfind("$$$$") - 200])
    with pytest.raises(pcqm4mv2_source.PCQMSourceError,
                       match=r"pcqm4m-v2-train.sdf: molecule 9 is not terminated"):
        datasets.get_builder("pcqm4mv2/sdf", str(tmp_path / "tfds"), source_dir=d, num_workers=1)
    with pytest.raises(datasets.DatasetError, match="not prepared"):
        datasets.get_builder("pcqm4mv2/sdf", str(tmp_path / "tfds"), build=False)


def test_pcqm_sdf_shorter_than_split_dict(fixtures, tmp_path):
    d = _copy(fixtures / "pcqm", tmp_path / "p")
    path = os.path.join(d, "pcqm4m-v2-train.sdf")
    blocks = open(path).read().split("$$$$\n")
    open(path, "w").write("$$$$\n".join(blocks[:-2]) + "$$$$\n")
    with pytest.raises(pcqm4mv2_source.PCQMSourceError, match=r"9 molecules but .*split_dict.pt lists 10"):
        datasets.get_builder("pcqm4mv2/sdf", str(tmp_path / "tfds"), source_dir=d, num_workers=1)


def test_pcqm_corrupt_split_dict(fixtures, tmp_path):
    d = _copy(fixtures / "pcqm", tmp_path / "p")
    open(os.path.join(d, "split_dict.pt"), "wb").write(b"PK\x03\x04garbage")
    with pytest.raises(pcqm4mv2_source.PCQMSourceError, match=r"split_dict.pt: not a readable torch zip"):
        datasets.get_builder("pcqm4mv2/sdf", str(tmp_path / "tfds"), source_dir=d, num_workers=1)
