"""Converted torch checkpoints as mspec checkpoints: ``experiments.convert`` writes directories that
fine-tuning (``--config.init.checkpoint``) and ``experiments.evaluate`` read (mspec.io.export)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from data_pipelines.fixtures import torch_pt
from mspec.io import export, torch_et, torch_pickle
from mspec.models import Model
from mspec.training import restore

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_et")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def golden(name: str) -> str:
    return os.path.join(GOLDEN, name)


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_convert_cli_writes_a_checkpoint_that_initialises_fine_tuning(tmp_path):
    out = tmp_path / "frad_torch"
    run = subprocess.run(
        [sys.executable, "-m", "experiments.convert", "--from", "frad",
         "--ckpt", golden("frad.ckpt"), "--out", str(out), "--check", golden("frad.npz")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "--config.model.interlayer_norm=shared_noaffine" in run.stdout
    assert "parity with" in run.stdout and ": ok" in run.stdout
    config = json.load(open(out / "config.json"))
    assert config["model"]["interlayer_norm"] == "shared_noaffine"
    assert config["converted_from"]["variant"] == "frad"
    assert config["converted_from"]["hyper_parameters"]["num_heads"] == 8
    converted = torch_et.convert(golden("frad.ckpt"), "frad")

    # What experiments.finetune does with --config.init.checkpoint=DIR: a fresh model of the
    # printed configuration gets the representation and noise head.
    model = Model(**{k: v for k, v in config["model"].items() if k != "heads"},
                  heads=tuple(config["model"]["heads"]))
    batch = dict(atomic_numbers=np.ones(2, np.int32), positions=np.zeros((2, 3), np.float32),
                 node_mask=np.ones(2, bool), senders=np.zeros(1, np.int32),
                 receivers=np.zeros(1, np.int32), edge_mask=np.ones(1, bool))
    fresh = jax.jit(model.init)(jax.random.key(0), batch)["params"]
    params, report = restore.restore_subtrees(fresh, str(out), ("representation", "noise_head"))
    assert report.step == 0 and set(report.restored) == {"representation", "noise_head"}
    assert_same_tree(params["representation"], converted.params["representation"])
    assert_same_tree(params["noise_head"], converted.params["noise_head"])
    step_dir, _ = restore.find_checkpoint(str(out))
    for ours, theirs in zip(restore.load_normalizer(step_dir), converted.normalizer):
        np.testing.assert_array_equal(ours, theirs)

    # Never over an existing directory.
    with pytest.raises(torch_et.ConversionError, match="exists and is not empty"):
        export.write_pretrained(converted, str(out))


def _with_stats(tmp_path, atomref=None) -> str:
    state = dict(torch_pickle.load(golden("frad.state_dict.pt"), mmap=False))
    state["mean"] = np.array(-0.25, np.float32)
    state["std"] = np.array(0.5, np.float32)
    if atomref is not None:
        state["prior_model.atomref.weight"] = atomref
        state["prior_model.initial_atomref"] = atomref
    path = str(tmp_path / "stats.pt")
    torch_pt.save({k: torch_pt.Tensor(v) for k, v in state.items()}, path)
    return path


def test_fine_tuning_workdir_evaluates_with_the_checkpoints_own_statistics(qm9_sample_dir, tmp_path):
    from experiments.configs import finetune_qm9
    from mspec.training import finetune

    converted = torch_et.convert(_with_stats(tmp_path), "frad",
                                 {"num_heads": 8, "output_model": "Scalar"})
    config = finetune_qm9.get_config("tiny,target=homo")
    config.data.data_dir = qm9_sample_dir
    out = export.write_finetune_workdir(converted, str(tmp_path / "homo"), config)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["model"]["interlayer_norm"] == "shared_noaffine"
    assert saved["target"]["fixed_standardizer"] == {"mean": -0.25, "std": 0.5}

    results = finetune.evaluate_workdir(out, which=("best",), roles=("test",))
    assert results["standardizer"] == {"mean": -0.25, "std": 0.5}
    assert results["best"]["step"] == 0 and np.isfinite(results["best"]["test"]["mae"])


def test_atomrefs_become_the_learnable_prior_and_the_label_convention_is_inferred(tmp_path):
    from experiments.configs import finetune_qm9
    from mspec.training import targets

    qm9_refs = np.zeros((100, 1), np.float32)
    qm9_refs[[1, 6, 7, 8, 9], 0] = targets.QM9_ATOMREF_EV["U0"]
    trained = qm9_refs.copy()
    trained[6, 0] += 0.05  # a trained table: converted as it is, into params["prior"]
    config = finetune_qm9.get_config("U0")
    full = torch_et.convert(_with_stats(tmp_path, trained), "frad", {"num_heads": 8})
    assert full.model["prior"] == "atomref"
    np.testing.assert_array_equal(full.params["prior"]["atomref"], trained[:, 0])
    # Total-energy references inside the model: the labels are used as they are.
    assert export._atomref_setting(full, config) is False
    # Frad's pre-trained path: a small learned correction on labels with QM9's references removed.
    correction = np.zeros((100, 1), np.float32)
    correction[[1, 6], 0] = [0.02, -0.3]
    small = torch_et.convert(_with_stats(tmp_path, correction), "frad", {"num_heads": 8})
    assert export._atomref_setting(small, config) is True
    # Neither: refused, and nothing is written.
    odd = qm9_refs * 0.5
    bad = torch_et.convert(_with_stats(tmp_path, odd), "frad", {"num_heads": 8})
    with pytest.raises(torch_et.ConversionError, match="cannot tell which labels"):
        export.write_finetune_workdir(bad, str(tmp_path / "u0"), config)
    assert not os.path.exists(tmp_path / "u0")


def test_a_converted_prior_is_evaluated_as_torch_reads_out(qm9_sample_dir, tmp_path):
    """E = std sum_i h_i + sum_i atomref[z_i] + mean, with the trained table as the model's prior."""
    from experiments.configs import finetune_qm9
    from mspec.training import finetune, targets

    table = np.zeros((100, 1), np.float32)
    table[[1, 6, 7, 8, 9], 0] = targets.QM9_ATOMREF_EV["U0"]
    table[6, 0] += 0.05
    converted = torch_et.convert(_with_stats(tmp_path, table), "frad",
                                 {"num_heads": 8, "output_model": "Scalar"})
    config = finetune_qm9.get_config("tiny,target=U0")
    config.data.data_dir = qm9_sample_dir
    out = export.write_finetune_workdir(converted, str(tmp_path / "u0"), config)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["model"]["prior"] == "atomref" and saved["target"]["atomref"] is False
    setup = finetune.build(ml_collections.ConfigDict(saved))
    params = jax.tree.map(np.asarray, converted.params)
    with_prior = finetune.predict(setup, params, "test", limit=8)["y_pred"]
    no_prior = finetune.predict(setup, {**params, "prior": {"atomref": np.zeros(100, np.float32)}},
                                "test", limit=8)["y_pred"]
    atom_sums = [table[np.asarray(setup.sources["test"][i]["atomic_numbers"]), 0].sum(dtype=np.float64)
                 for i in range(8)]
    np.testing.assert_allclose(with_prior - no_prior, atom_sums, rtol=1e-6)


def test_a_failed_conversion_leaves_no_output_directory(tmp_path, monkeypatch):
    converted = torch_et.convert(golden("frad.state_dict.pt"), "frad", {"num_heads": 8})

    def fail(directory, state, config):
        os.makedirs(directory)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_save", fail)
    with pytest.raises(OSError, match="No space left"):
        export.write_pretrained(converted, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []  # neither out/ nor a staging directory
