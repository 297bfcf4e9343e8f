"""Dataset faults found by fault injection (issue 21), each on a corrupted or cut-down copy of the
shipped fixtures: a source too small for the split rule, a truncated .tar.bz2, a flipped bit in a
.pt file, stale PCQM4Mv2 staging after the source was fixed, MD17's build report, and TFDS's
misleading first-build messages."""

import io
import json
import logging
import os
import shutil
import tarfile
import zipfile

import numpy as np
import pytest

from data_pipelines import md17, pcqm4mv2_source, qm9_raw, torch_pickle
from data_pipelines.fixtures import md17 as md17_fixture
from data_pipelines.fixtures import pcqm4mv2 as pcqm_fixture
from data_pipelines.fixtures import write_all
from data_pipelines.qm9pack_source import QM9SourceError
from data_pipelines.qm9s_source import QM9SSourceError
from mspec.data import datasets

PT_REL = os.path.join("processed", "data_with_uv_ir_raman.pt")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Every fixture format, in ``<root>/<fixture module name>/``."""
    root = tmp_path_factory.mktemp("fixtures")
    write_all(str(root))
    return root


def _copy(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _splits(builder) -> dict:
    return {k: v.num_examples for k, v in builder.info.splits.items()}


def _report(builder) -> dict:
    with open(os.path.join(builder.data_dir, "build_report.json")) as f:
        return json.load(f)


# ---- a valid source smaller than the split rule expects --------------------------------------

def _keep_tar_members(directory: str, count: int) -> None:
    """Rewrites the xyz tarball with its first ``count`` members only (a valid, tiny release)."""
    path = os.path.join(directory, qm9_raw.XYZ_TARBALL)
    with tarfile.open(path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    with tarfile.open(path, "w:bz2") as tar:
        for name in sorted(files)[:count]:
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))


def test_tiny_qm9_source_builds_without_its_empty_split_and_names_it(fixtures, tmp_path, capfd,
                                                                     caplog):
    d = _copy(fixtures / "qm9_xyz", tmp_path / "x")
    _keep_tar_members(d, 4)  # indices 55-58; 58 is uncharacterised: 3 molecules, 80/10/10 %
    caplog.set_level(logging.WARNING)
    b = datasets.get_builder("qm9/xyz", str(tmp_path / "tfds"), source_dir=d, allow_partial=True,
                             num_workers=1)
    assert _splits(b) == {"train": 2, "test": 1}
    assert b.info.metadata["empty_splits"] == ["validation"]
    assert _report(b)["empty_splits"] == ["validation"]
    with pytest.raises(datasets.DatasetError,
                       match=r"split 'validation' of qm9/xyz\S* is empty: its source is too small"):
        datasets.open_split(b, "validation")
    assert len(datasets.open_split(b, "train")) == 2
    # First build: one honest line, none of TFDS's download wording or missing-file warnings.
    out, err = capfd.readouterr()
    assert "from local files (nothing is downloaded)" in err
    assert "split(s) validation would be empty" in err
    assert "Unknown size" not in out + err and "Downloading" not in out + err
    assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()]


def test_short_rmd17_split_file_leaves_the_empty_training_split_out(fixtures, tmp_path):
    d = _copy(fixtures / "md17", tmp_path / "m")
    path = os.path.join(d, "splits", "index_train_01.csv")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:40]) + "\n")  # <= 50: all of it is validation
    b = datasets.get_builder("md17/rmd17_ethanol", str(tmp_path / "tfds"), manual_dir=d)
    sizes = _splits(b)
    assert "train_rmd17_01" not in sizes and sizes["validation_rmd17_01"] == 40
    assert sizes["train_rmd17_02"] == 950  # the other splits are whole
    with pytest.raises(datasets.DatasetError, match=r"split 'train_rmd17_01' of md17/rmd17_ethanol"
                                                    r"\S* is empty"):
        datasets.open_split(b, "train_rmd17_01")
    report = _report(b)
    assert report["empty_splits"] == ["train_rmd17_01"]


def test_md17_writes_a_build_report(fixtures, tmp_path):
    b = datasets.get_builder("md17/ethanol", str(tmp_path / "tfds"),
                             manual_dir=str(fixtures / "md17"))
    report = _report(b)
    assert report["num_frames"] == md17_fixture.NUM_FRAMES
    assert report["source"].endswith("md17_ethanol.npz")
    assert report["split_sizes"] == _splits(b)
    assert report["torsion_status"] == "ok" and report["num_torsions"] == 2


def test_tiny_pcqm4mv2_source_leaves_the_empty_train_split_out(fixtures, tmp_path):
    d = _copy(fixtures / "pcqm4mv2", tmp_path / "p")
    os.remove(os.path.join(d, "split_dict.pt"))  # SDF entry i is idx i
    path = os.path.join(d, "pcqm4m-v2-train.sdf")
    blocks = open(path).read().split("$$$$\n")
    open(path, "w").write("$$$$\n".join(blocks[:2]) + "$$$$\n")  # 2 molecules: 1 + 1 + 0
    b = datasets.get_builder("pcqm4mv2/sdf", str(tmp_path / "tfds"), source_dir=d, num_workers=1)
    assert _splits(b) == {"validation": 1, "test": 1}
    with pytest.raises(datasets.DatasetError, match="split 'train' of pcqm4mv2/sdf"):
        datasets.open_split(b, "train")


# ---- truncated archive -----------------------------------------------------------------------

@pytest.mark.parametrize("cut", [4, 10])  # inside the bz2 stream trailer: every member is intact
def test_truncated_tarball_is_an_error_even_for_a_partial_source(fixtures, tmp_path, cut):
    d = _copy(fixtures / "qm9_xyz", tmp_path / "x")
    path = os.path.join(d, qm9_raw.XYZ_TARBALL)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-cut])
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(QM9SourceError, match=r"dsgdb9nsd.xyz.tar.bz2: truncated or corrupt"):
        datasets.get_builder("qm9/xyz", data_dir, source_dir=d, allow_partial=True,
                             num_workers=1)
    with pytest.raises(datasets.DatasetError, match="not prepared"):
        datasets.get_builder("qm9/xyz", data_dir, build=False)


# ---- a flipped bit inside a .pt file ---------------------------------------------------------

def _flip_bit_in_entry(path: str, entry_suffix: str, offset: int = 0) -> str:
    """Flips one bit ``offset`` bytes into the data of the zip entry ending in ``entry_suffix``
    (the zip directory and its CRC are left as written); returns the entry's name."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(entry_suffix))
    data = bytearray(open(path, "rb").read())
    header = info.header_offset
    start = (header + 30 + int.from_bytes(data[header + 26:header + 28], "little")
             + int.from_bytes(data[header + 28:header + 30], "little"))
    data[start + offset] ^= 0x10
    open(path, "wb").write(bytes(data))
    return info.filename


def _largest_storage(path: str) -> str:
    with zipfile.ZipFile(path) as z:
        return max((i for i in z.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size).filename


@pytest.mark.parametrize("mmap", [True, False])
def test_flipped_bit_in_a_pt_storage_is_detected(fixtures, tmp_path, mmap):
    path = str(tmp_path / "flipped.pt")
    shutil.copy(fixtures / "qm9s" / "release_pt" / PT_REL, path)
    entry = _flip_bit_in_entry(path, _largest_storage(path).split("/", 1)[1], offset=1001)
    with pytest.raises(torch_pickle.TorchFileError,
                       match=rf"flipped.pt: {entry}: CRC-32 mismatch"):
        torch_pickle.load(path, mmap=mmap)


def test_flipped_bit_in_the_pickle_of_a_pt_is_detected(fixtures, tmp_path):
    path = str(tmp_path / "flipped.pt")
    shutil.copy(fixtures / "qm9s" / "release_pt" / PT_REL, path)
    # Inside the last bytes of data.pkl (a pickle reader may never read up to its CRC check).
    with zipfile.ZipFile(path) as z:
        size = next(i.file_size for i in z.infolist() if i.filename.endswith("data.pkl"))
    entry = _flip_bit_in_entry(path, "data.pkl", offset=size - 3)
    with pytest.raises(torch_pickle.TorchFileError, match=rf"flipped.pt: {entry}: CRC-32 mismatch"):
        torch_pickle.load(path)


def test_flipped_bit_in_the_qm9s_release_fails_the_build(fixtures, tmp_path):
    d = _copy(fixtures / "qm9s" / "release_pt", tmp_path / "r")
    path = os.path.join(d, PT_REL)
    _flip_bit_in_entry(path, _largest_storage(path).split("/", 1)[1], offset=2001)
    with pytest.raises(QM9SSourceError, match=r"data_with_uv_ir_raman.pt: .*CRC-32 mismatch"):
        datasets.get_builder("qm9s/release", str(tmp_path / "tfds"), source_dir=d, num_workers=1)


# ---- PCQM4Mv2: a fixed source is not served from stale staged chunks ---------------------------

def _shift_first_atom(block: str, dx: float) -> str:
    lines = block.split("\n")
    atom = lines[4]  # title, program, comment, counts, then the first atom line
    lines[4] = f"{float(atom[:10]) + dx:10.4f}" + atom[10:]
    return "\n".join(lines)


def test_pcqm4mv2_rebuild_after_fixing_the_source_restages_changed_chunks(fixtures, tmp_path,
                                                                          capfd):
    good = _copy(fixtures / "pcqm4mv2", tmp_path / "p")
    sdf = os.path.join(good, "pcqm4m-v2-train.sdf")
    original = open(sdf).read()
    blocks = original.split("$$$$\n")
    # A bad download: molecule 0 has a wrong (but readable) coordinate, and the file is cut.
    broken = "$$$$\n".join([_shift_first_atom(blocks[0], 1.5)] + blocks[1:])
    open(sdf, "w").write(broken[: broken.rfind("$$$$") - 200])
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(pcqm4mv2_source.PCQMSourceError, match="is not terminated"):
        datasets.get_builder("pcqm4mv2/sdf", data_dir, source_dir=good, num_workers=1,
                             chunk_size=2)
    staging = os.path.join(data_dir, "pcqm4mv2_staging", "sdf")
    assert os.path.isfile(os.path.join(staging, "chunk_000000.npz"))  # molecule 0 was staged
    open(sdf, "w").write(original)  # the user fixes the file and re-runs
    capfd.readouterr()
    b = datasets.get_builder("pcqm4mv2/sdf", data_dir, source_dir=good, num_workers=1,
                             chunk_size=2)
    assert "were made from other input than the current source files" in capfd.readouterr().err
    rows = {int(e["index"]): e for split in b.info.splits
            for e in (lambda s: [s[i] for i in range(len(s))])(datasets.open_split(b, split))}
    np.testing.assert_allclose(rows[0]["positions"],
                               pcqm_fixture.molecule(0).GetConformer().GetPositions(), atol=5.1e-5)
    assert sorted(rows) == [i for i in range(10) if i != pcqm_fixture.BROKEN]


def test_a_second_build_of_one_dataset_waits_for_the_first(tmp_path, capsys):
    import threading
    import time

    order = []

    def second():
        with datasets._build_lock(str(tmp_path), "qm9/sample"):
            order.append("second builds")

    with datasets._build_lock(str(tmp_path), "qm9/sample"):
        other = threading.Thread(target=second)
        other.start()
        time.sleep(0.5)
        order.append("first done")
    other.join(10)
    assert order == ["first done", "second builds"]
    assert "'qm9/sample': another process is building it" in capsys.readouterr().err
