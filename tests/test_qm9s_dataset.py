"""QM9S builder: gfn2 stick spectra and the real-release layouts (.pt both PyG layouts, CSV), built
from fixtures; spectra parity with the broadening formula, the QM9 join, splits, metadata."""

import gzip
import json

import numpy as np
import pytest

from data_pipelines import qm9pack_source, torch_pickle
from data_pipelines.fixtures import _qm9_molecules, qm9s as qm9s_fixture
from data_pipelines.qm9s_source import QM9SSourceError
from mspec.data import datasets


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("qm9s")
    qm9s_fixture.write(str(root / "src"))
    out = {}
    for key, cfg, sub in (("gfn2", "gfn2", "gfn2"), ("pt", "release", "release_pt"),
                          ("legacy", "release", "release_pt_legacy"),
                          ("csv", "release", "release_csv")):
        b = datasets.get_builder(f"qm9s/{cfg}", str(root / f"tfds_{key}"),
                                 source_dir=str(root / "src" / sub), num_workers=1)
        out[key] = (b, {s: datasets.open_split(b, s) for s in ("train", "validation", "test")})
    out["root"] = root
    return out


def _rows(split):
    return [split[i] for i in range(len(split))]


def test_gfn2_counts_dtypes_and_metadata(built):
    builder, splits = built["gfn2"]
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 6, "validation": 1, "test": 1}
    ex = splits["train"][0]
    assert ex["uv"].shape == (701,) and ex["ir"].shape == (3501,) and ex["raman"].shape == (3501,)
    assert ex["uv"].dtype == ex["ir"].dtype == ex["raman"].dtype == np.float32
    assert ex["positions"].dtype == np.float32 and ex["targets"].shape == (15,)
    meta = builder.info.metadata
    assert meta["grids"]["uv"] == {"first": 1.0, "last": 15.0, "points": 701, "unit": "eV"}
    assert meta["grids"]["ir"]["points"] == 3501 and meta["grids"]["ir"]["first"] == 500.0
    assert "fixture" in meta["level_of_theory"]
    assert meta["normalised"] is False and meta["skipped_not_in_qm9"] == 0
    indices = sorted(int(e["index"]) for s in splits.values() for e in _rows(s))
    assert indices == sorted(_qm9_molecules.CHARACTERISED)


def test_gfn2_spectra_equal_broadened_sticks_and_qm9_geometry(built):
    _, splits = built["gfn2"]
    sticks = {r.qm9_index: r for r in qm9s_fixture.stick_records()}
    rows = _qm9_molecules.qm9pack_rows()
    for ex in _rows(splits["train"]):
        rec = sticks[int(ex["index"])]
        # Reference: peak-height Lorentzian (HWHM 8 cm^-1) written out in numpy.
        grid = np.arange(500.0, 4001.0)
        d = grid[:, None] - rec.vib_freq_cm1[None, :]
        ir = (64.0 / (d**2 + 64.0)) @ rec.ir_intensity_km_mol
        np.testing.assert_allclose(ex["ir"], ir, rtol=1e-5)
        uv_grid = np.linspace(1.0, 15.0, 701)
        uv = np.exp(-0.5 * ((uv_grid[:, None] - rec.uv_energy_ev) / 0.2) ** 2) @ rec.uv_osc_strength
        np.testing.assert_allclose(ex["uv"], uv, rtol=1e-5, atol=1e-7)
        # 3D positions are the QM9 B3LYP geometry joined by index, not the stick file's geometry.
        ref = qm9pack_source.parse_row(rows[int(ex["index"])], "qm9pack")
        np.testing.assert_allclose(ex["positions"], ref["positions"], atol=1e-6)
        np.testing.assert_array_equal(ex["targets"], ref["targets"])


def test_all_release_layouts_agree(built):
    ref = {int(e["index"]): e for s in built["gfn2"][1].values() for e in _rows(s)}
    for key in ("pt", "legacy", "csv"):
        builder, splits = built[key]
        assert builder.info.metadata["num_molecules"] == 8
        for split in ("train", "validation", "test"):
            for a, b in zip(_rows(splits[split]), _rows(built["gfn2"][1][split])):
                assert int(a["index"]) == int(b["index"])  # same split order
        for e in (e for s in splits.values() for e in _rows(s)):
            for k in ("uv", "ir", "raman"):
                np.testing.assert_array_equal(e[k], ref[int(e["index"])][k])
            np.testing.assert_array_equal(e["torsions"], ref[int(e["index"])]["torsions"])


def test_pt_reader_pyg_layout(built):
    path = built["root"] / "src" / "release_pt" / "processed" / "data_with_uv_ir_raman.pt"
    arrays, slices = torch_pickle.pyg_collated(torch_pickle.load(str(path)))
    assert arrays["uv"].shape == (8, 701) and arrays["uv"].dtype == np.float32
    ei = torch_pickle.graph_item(arrays, slices, "edge_index", 1)
    z = torch_pickle.graph_item(arrays, slices, "z", 1)
    assert ei.shape[0] == 2 and ei.max() == len(z) - 1  # graph-local indices
    assert torch_pickle.graph_item(arrays, slices, "name", 3).startswith("gdb_")
    import sys
    assert "torch" not in sys.modules


def test_builder_names_are_registered(tmp_path):
    with pytest.raises(datasets.DatasetError, match="unknown config"):
        datasets.get_builder("qm9s/b3lyp", str(tmp_path))
    with pytest.raises(QM9SSourceError, match="no stick-spectra file"):
        datasets.get_builder("qm9s/gfn2", str(tmp_path), source_dir=str(tmp_path))
    with pytest.raises(QM9SSourceError, match="data_with_uv_ir_raman.pt.*boraden"):
        datasets.get_builder("qm9s/release", str(tmp_path), source_dir=str(tmp_path))



def test_gfn2_rebuilds_when_the_stick_file_changes(tmp_path):
    """A prepared gfn2 dataset built from an older stick file is rebuilt, not served stale."""
    import gzip
    import json

    qm9s_fixture.write(str(tmp_path / "src"))
    src = tmp_path / "src" / "gfn2"
    stick_file = next(p for p in src.iterdir() if p.name.startswith("sticks.jsonl"))
    raw = stick_file.read_bytes()
    text = gzip.decompress(raw).decode() if stick_file.name.endswith(".gz") else raw.decode()
    data_dir = str(tmp_path / "tfds")

    def total_ir(builder):
        return sum(float(np.sum(e["ir"])) for s in ("train", "validation", "test")
                   for e in _rows(datasets.open_split(builder, s)))

    b = datasets.get_builder("qm9s/gfn2", data_dir, source_dir=str(src), num_workers=1)
    assert b.info.metadata["source_records_sha256"] and not b.source_changed()
    before = total_ir(b)
    # A new release of the stick file: every IR intensity doubled.
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for r in records:
        r["ir_intensity_km_mol"] = [2 * x for x in r["ir_intensity_km_mol"]]
    new = "".join(json.dumps(r) + "\n" for r in records).encode()
    stick_file.write_bytes(gzip.compress(new) if stick_file.name.endswith(".gz") else new)
    with pytest.raises(datasets.DatasetError, match="other source files"):
        datasets.get_builder("qm9s/gfn2", data_dir, build=False, source_dir=str(src))
    b = datasets.get_builder("qm9s/gfn2", data_dir, source_dir=str(src), num_workers=1)
    assert not b.source_changed()
    np.testing.assert_allclose(total_ir(b), 2 * before, rtol=1e-5)
    # The stick file replaced by a truncated gzip after the build: the rebuild's error names it.
    stick_file.unlink()
    (src / "sticks.jsonl.gz").write_bytes(gzip.compress(new)[:-40])
    assert b.source_changed()
    with pytest.raises(Exception, match=r"sticks\.jsonl\.gz: corrupt or truncated"):
        datasets.get_builder("qm9s/gfn2", data_dir, source_dir=str(src), num_workers=1)


def test_gfn2_versions_read_a_prefix_of_the_stick_file(tmp_path, monkeypatch):
    """An older gfn2 version is the stick file's first molecules (the file only grows by
    appending), built beside the current version; unknown versions and a file shorter than the
    version are one-line errors."""
    from data_pipelines import qm9s
    from data_pipelines.qm9s_source import read_sticks

    monkeypatch.setitem(qm9s.GFN2_MOLECULES, "1.0.0", 5)
    qm9s_fixture.write(str(tmp_path / "src"))
    src = str(tmp_path / "src" / "gfn2")
    file_order = [r.qm9_index for r in read_sticks(src)[0]]
    data_dir = str(tmp_path / "tfds")

    def indices(builder):
        return sorted(int(e["index"]) for s in builder.info.splits
                      for e in _rows(datasets.open_split(builder, s)))

    old = datasets.get_builder("qm9s/gfn2:1.0.0", data_dir, source_dir=src, num_workers=1)
    new = datasets.get_builder("qm9s/gfn2", data_dir, source_dir=src, num_workers=1)
    assert str(old.version) == "1.0.0" and str(new.version) == qm9s.GFN2_VERSION == "2.0.0"
    assert old.data_dir != new.data_dir
    assert indices(old) == sorted(file_order[:5])
    assert indices(new) == sorted(file_order) and len(file_order) == 8
    assert old.info.metadata["num_molecules"] == 5
    # The version also follows the config name without one ("qm9s:1.0.0" is the default config).
    assert str(datasets.get_builder("qm9s:1.0.0", data_dir, source_dir=src).version) == "1.0.0"
    with pytest.raises(datasets.DatasetError, match=r"no version '3.0.0'; versions: 2.0.0, 1.0.0"):
        datasets.get_builder("qm9s/gfn2_qm9train:3.0.0", data_dir, source_dir=src)
    # A change after the first 5 records (as the file grows by appending) leaves version 1.0.0
    # as built; a change inside them, or a dataset built before the per-version hash (it
    # recorded the whole file's), is a changed source.
    stick_file = qm9s.find_stick_file(src)
    opener = gzip.open if stick_file.endswith(".gz") else open
    with opener(stick_file, "rt") as f:
        lines = [line for line in f if line.strip()]

    def rewrite(position):
        r = json.loads(lines[position])
        r["ir_intensity_km_mol"] = [2 * x for x in r["ir_intensity_km_mol"]]
        changed = lines[:position] + [json.dumps(r) + "\n"] + lines[position + 1:]
        with opener(stick_file, "wt") as f:
            f.writelines(changed)

    rewrite(6)
    assert not old.source_changed() and new.source_changed()
    meta = old.info.metadata
    meta["source_sha256"] = meta.pop("source_records_sha256")
    assert old.source_changed()
    meta["source_records_sha256"] = meta.pop("source_sha256")
    assert not old.source_changed()
    rewrite(2)
    assert old.source_changed()

    monkeypatch.setitem(qm9s.GFN2_MOLECULES, "1.0.0", 9)
    with pytest.raises(QM9SSourceError, match=r"first 9 molecules of the stick file, which holds only 8"):
        datasets.get_builder("qm9s/gfn2_qm9train:1.0.0", str(tmp_path / "tfds2"), source_dir=src,
                             num_workers=1)


def test_shipped_gfn2_dataset_builds_and_is_labelled(tmp_path):
    """The stick spectra shipped in the repository (the MolSpectra default data) build as
    `qm9s/gfn2`: at least 1,000 QM9 molecules, GFN2-xTB / sTDA level, valid spectra."""
    from data_pipelines import qm9s

    b = datasets.get_builder("qm9s/gfn2", str(tmp_path), num_workers=1)
    meta = b.info.metadata
    assert meta["source"] == qm9s.DEFAULT_GFN2_DIR and meta["skipped_not_in_qm9"] == 0
    assert "GFN2" in json.dumps(meta["level_of_theory"])
    sizes = {k: v.num_examples for k, v in b.info.splits.items()}
    assert sum(sizes.values()) >= 1000, sizes
    ex = datasets.open_split(b, "validation")[0]
    for name, n in (("uv", 701), ("ir", 3501), ("raman", 3501)):
        s = ex[name]
        assert s.shape == (n,) and np.all(np.isfinite(s)) and s.min() >= 0 and s.max() > 0


def test_gfn2_qm9train_keeps_only_qm9_training_split_molecules(tmp_path):
    """The study's stage-2 set never holds a QM9 validation/test molecule (fixture molecule 56
    is in QM9's validation split; the other 7 are training molecules)."""
    src = tmp_path / "src"
    qm9s_fixture.write(str(src))
    b = datasets.get_builder("qm9s/gfn2_qm9train", str(tmp_path / "tfds"),
                             source_dir=str(src / "gfn2"), num_workers=1)
    train_positions = set(qm9pack_source.split_indices()[0].tolist())
    rows = [ex for s in b.info.splits for ex in _rows(datasets.open_split(b, s))]
    assert sorted(int(ex["index"]) for ex in rows) == sorted(
        set(_qm9_molecules.CHARACTERISED) - {56})
    assert all(int(ex["pyg_idx"]) in train_positions for ex in rows)
    meta = b.info.metadata
    assert meta["excluded_qm9_validation_or_test"] == 1 and meta["num_molecules"] == 7
    # 7 molecules split 80/10/10 leave the test split empty: it is left out, and asking for it
    # names the split.
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 6, "validation": 1}
    with pytest.raises(datasets.DatasetError,
                       match=r"split 'test' of qm9s/gfn2_qm9train\S* is empty: its source is too small"):
        datasets.open_split(b, "test")
