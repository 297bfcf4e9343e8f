"""The QM9 builder (from qm9pack): counts, splits, dtypes, units, torsion metadata, bad input."""

import json
import os

import numpy as np
import pytest

from data_pipelines import qm9pack_source
from mspec.data import datasets


def test_fortran_style_numbers_parse():
    np.testing.assert_allclose(
        qm9pack_source.parse_numbers("[[0.,1.E-3],[2.5,-7.E-6]]"), [0.0, 1e-3, 2.5, -7e-6]
    )


def _row(**overrides):
    row = {
        "Index": "1", "N_atoms": "2", "Elements": "['C','H']", "SMILES": "C",
        "XYZ_Ang": "[[0.,0.,0.],[1.09,0.,0.]]",
    }
    row.update({col: "1." for _, col, _, _ in qm9pack_source.TARGETS})
    row.update(overrides)
    return row


def test_bad_records_name_the_record_and_fault():
    with pytest.raises(qm9pack_source.QM9SourceError, match="f.csv:7.*N_atoms=3 disagrees"):
        qm9pack_source.parse_row(_row(N_atoms="3"), "f.csv:7")
    with pytest.raises(qm9pack_source.QM9SourceError, match="unsupported element.*Si"):
        qm9pack_source.parse_row(_row(Elements="['Si','H']"), "f.csv:8")
    rec = qm9pack_source.parse_row(_row(HOMO_au="-0.5"), "f.csv:9")
    assert rec["targets"][qm9pack_source.TARGET_NAMES.index("homo")] == pytest.approx(
        -0.5 * qm9pack_source.HARTREE_TO_EV
    )


def test_split_is_the_seed1_permutation():
    train, val, test = qm9pack_source.split_indices()
    assert (len(train), len(val), len(test)) == (110_000, 10_000, 10_831)
    perm = np.random.default_rng(1).permutation(130_831)
    np.testing.assert_array_equal(np.concatenate([train, val, test]), perm)


def test_sample_dataset_contents(qm9_sample_dir):
    builder = datasets.get_builder("qm9/sample", qm9_sample_dir, build=False)
    sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert sizes == {"train": 1600, "validation": 200, "test": 200}
    train = datasets.open_split(builder, "train")
    ex = train[0]
    assert ex["atomic_numbers"].dtype == np.int32 and ex["positions"].dtype == np.float32
    assert ex["positions"].shape == (len(ex["atomic_numbers"]), 3)
    assert ex["targets"].dtype == np.float64 and ex["targets"].shape == (15,)
    # Split order = seed-1 permutation order; pyg_idx / index tie back to qm9pack.
    full_train = qm9pack_source.split_indices()[0]
    got = [int(train[i]["pyg_idx"]) for i in range(5)]
    np.testing.assert_array_equal(got, full_train[:5])
    first = next(qm9pack_source.read_qm9pack(limit=full_train[0] + 1) for _ in [0])
    records = list(first)
    ref = records[full_train[0]]
    assert ref["index"] == int(ex["index"])
    np.testing.assert_allclose(ex["positions"], ref["positions"], atol=1e-6)
    np.testing.assert_array_equal(ex["targets"], ref["targets"])  # exact float64
    # Energies are in eV (U0 of a QM9 molecule is thousands of eV below zero).
    u0 = ex["targets"][qm9pack_source.TARGET_NAMES.index("U0")]
    assert -30000 < u0 < -1000
    # Torsion metadata is consistent with its status.
    meta = builder.info.metadata
    assert meta["coord_noise_fallback"] == sum(
        v for k, v in meta["torsion_status_counts"].items() if k != "ok"
    )
    for i in range(50):
        e = train[i]
        t = len(e["torsions"])
        assert e["torsion_moving"].size == t * len(e["atomic_numbers"])
        assert (t > 0) == (e["torsion_status"] == b"ok")
    report = json.load(open(os.path.join(builder.data_dir, "build_report.json")))
    assert report["coord_noise_fallback"] == meta["coord_noise_fallback"]


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(datasets.DatasetError, match="not prepared"):
        datasets.get_builder("qm9/sample", str(tmp_path), build=False)
    with pytest.raises(datasets.DatasetError, match="unknown dataset"):
        datasets.get_builder("qm10/full", str(tmp_path))
    with pytest.raises(datasets.DatasetError, match="unknown config"):
        datasets.get_builder("qm9/tiny", str(tmp_path))


def test_builders_are_found_through_their_entry_points(monkeypatch, tmp_path):
    """setup.py announces every builder in data_pipelines/; the library imports none by name."""
    import ast
    import pathlib

    setup_py = pathlib.Path(__file__).resolve().parents[1] / "setup.py"
    call = next(n for n in ast.walk(ast.parse(setup_py.read_text())) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    announced = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "entry_points"))
    names = {line.split("=")[0].strip() for line in announced[datasets.ENTRY_POINT_GROUP]}
    assert names == {"qm9", "qm9s", "pcqm4mv2", "md17", "qm9_synthetic_spectra"}
    assert names <= set(datasets.known_datasets()), "reinstall: pip install -e ."
    from data_pipelines.qm9 import QM9

    assert datasets._builder_class("qm9") is QM9
    # A builder registered at run time wins over the installed one of that name.
    monkeypatch.setattr(datasets, "_registered", {})
    datasets.register_builder("qm9", QM9)
    assert datasets._builder_class("qm9") is QM9 and "qm9" in datasets.known_datasets()
    # With nothing installed, the error says how to install.
    monkeypatch.setattr(datasets, "_registered", {})
    monkeypatch.setattr(datasets, "_entry_points", dict)
    with pytest.raises(datasets.DatasetError, match="no dataset builders are installed.*pip install -e"):
        datasets.get_builder("qm9/sample", str(tmp_path))


def test_corrupt_dataset_directory_is_a_clear_error(qm9_sample_dir, tmp_path):
    import shutil

    src = os.path.join(qm9_sample_dir, "qm9")
    broken = tmp_path / "data"
    shutil.copytree(src, broken / "qm9")
    from data_pipelines.qm9 import QM9

    version_dir = broken / "qm9" / "sample" / str(QM9.VERSION)
    record = version_dir / "qm9-train.array_record-00000-of-00001"
    record.write_bytes(b"")  # truncated record file
    with pytest.raises(datasets.DatasetError, match="qm9-train.array_record.*missing or empty"):
        datasets.get_builder("qm9/sample", str(broken), build=False)
    record.write_bytes(b"\x00garbage" * 100)  # corrupt record file
    builder = datasets.get_builder("qm9/sample", str(broken), build=False)
    with pytest.raises(datasets.DatasetError, match="cannot read split 'train'"):
        datasets.open_split(builder, "train")
    (version_dir / "dataset_info.json").write_text("{not json")
    with pytest.raises(datasets.DatasetError, match="corrupt"):
        datasets.get_builder("qm9/sample", str(broken), build=False)


def test_split_slices_select_a_prefix_of_the_permutation(qm9_sample_dir):
    b = datasets.get_builder("qm9/sample", qm9_sample_dir)
    full = datasets.open_split(b, "train")
    head = datasets.open_split(b, "train[:25]")
    assert len(head) == 25
    assert [int(head[i]["pyg_idx"]) for i in range(25)] == [int(full[i]["pyg_idx"]) for i in range(25)]
    with pytest.raises(datasets.DatasetError, match="split 'tran\\[:25\\]' not in dataset"):
        datasets.open_split(b, "tran[:25]")
    with pytest.raises(datasets.DatasetError, match="bad split 'train\\[:abc\\]'"):
        datasets.open_split(b, "train[:abc]")
