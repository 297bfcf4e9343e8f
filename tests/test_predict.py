"""experiments.predict and mspec.inference on a tiny QM9 U0 model fine-tuned here (standardised,
with atom references): predictions equal experiments.evaluate's, embeddings are the encoder's,
bad molecules are reported by record and counted, CSV and NPZ outputs, pre-training workdirs give
embeddings only, and the model is read only when intact."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines.spectra import inputs
from experiments import predict
from experiments.configs import finetune_qm9, pretrain_frad
from mspec import graph, inference, models
from mspec.training import checkpoint, finetune, loop, run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TEST = 40  # test-split molecules compared with the evaluation


@pytest.fixture(scope="module")
def u0(qm9_sample_dir, tmp_path_factory):
    """``(workdir, config)``: QM9 U0, standardised and with the QM9 atom references (both parts
    of the de-standardisation), 3 training steps, then evaluated (results.json)."""
    c = finetune_qm9.get_config("tiny,target=U0")
    c.target.standardize = True
    assert c.target.atomref
    c.data.data_dir = qm9_sample_dir
    c.total_steps = c.eval_every = c.checkpoint_every = c.log_every = 3
    c.data.eval_max_molecules = 8
    c.evaluate.checkpoints = ("last",)
    c.evaluate.validation_max_molecules = 8
    workdir = str(tmp_path_factory.mktemp("ft_u0") / "run")
    loop.train_and_evaluate(c, workdir)
    return workdir, c


@pytest.fixture(scope="module")
def evaluated(u0):
    """The first test-split molecules and experiments.evaluate's predictions for them (eV)."""
    workdir, c = u0
    setup = finetune.build(c)
    model = inference.load(workdir)
    ev = finetune.predict(setup, model.params, "test", limit=N_TEST)
    examples = [setup.sources["test"][k] for k in range(N_TEST)]
    return model, examples, ev["y_pred"]


def _inputs(examples):
    return [inputs.MoleculeInput(int(ex["index"]), "", ex["atomic_numbers"], ex["positions"],
                                 where=f"test molecule {k}") for k, ex in enumerate(examples)]


# Per-molecule predictions depend on the batch layout beyond float32 round-off: the whitened
# vector norms (EqLN) of this barely trained model amplify it (nearly rank-deficient vector
# features; also with EqLN in float64), so the same molecule packed into another budget moves by
# up to 0.011 eV (measured). Every pipeline fault this guards against (atom references, the
# standardiser's mean or std, molecules or atoms swapped) moves it by > 1 eV.
ATOL_EV = 0.05


def test_predictions_and_embeddings_equal_the_evaluation_and_the_model(evaluated):
    model, examples, y_eval = evaluated
    p = predict.predict(model, _inputs(examples), embeddings="atom", batch_size=8, progress=False)
    assert p.units == {"U0": "meV"} and p.compilations == 1 and not p.skipped
    # Total energies (about -1e4 eV): atom references, the standardiser's mean and std all enter.
    np.testing.assert_allclose(p.arrays["U0"] / 1000.0, y_eval, rtol=0, atol=ATOL_EV)

    n = p.arrays["n_atoms"]
    assert list(n) == [len(ex["atomic_numbers"]) for ex in examples]
    hidden = model.config.model.hidden
    atom, mol = p.arrays["embedding_atom"], p.arrays["embedding_molecule"]
    assert atom.shape == (n.sum(), hidden) and mol.shape == (N_TEST, hidden)
    np.testing.assert_array_equal(p.arrays["atomic_numbers"],
                                  np.concatenate([ex["atomic_numbers"] for ex in examples]))
    # The encoder's output for single molecules, through the model itself (one budget, one jit).
    apply = jax.jit(models.get_model(model.config.model).apply)
    most = int(n.max())
    budget = graph.Budget(n_node=most + 1, n_edge=most + 1 + most * (most - 1), n_graph=2, max_torsions=1)
    for k in (0, 17, N_TEST - 1):
        rows = slice(p.arrays["atom_start"][k], p.arrays["atom_start"][k] + n[k])
        np.testing.assert_allclose(mol[k], atom[rows].mean(axis=0), rtol=0, atol=1e-12)
        feat = inference.featurize(model, examples[k]["atomic_numbers"], examples[k]["positions"])
        out = apply({"params": model.params}, graph.pack([feat], budget))
        np.testing.assert_allclose(atom[rows], np.asarray(out["node_features"])[: n[k]], rtol=0, atol=1e-4)
    assert np.abs(mol).max() > 0.1  # not zeros


def test_qm9_indices_predict_like_the_evaluation_and_missing_ones_are_skipped(evaluated, tmp_path, capsys):
    model, examples, y_eval = evaluated
    picked = [3, 11]
    indices = [int(examples[k]["index"]) for k in picked]
    out = str(tmp_path / "qm9.npz")
    p = predict.run(model.workdir, "qm9-index", f"{indices[0]},999999,{indices[1]}", out, progress=False)
    np.testing.assert_allclose(p.arrays["U0"] / 1000.0, y_eval[picked], rtol=0, atol=ATOL_EV)
    saved = np.load(out)
    assert list(saved["record"]) == [f"qm9 index {i}" for i in indices]
    assert list(saved["skipped_record"]) == ["qm9 index 999999"]
    assert "not in qm9pack" in saved["skipped_reason"][0] and str(saved["unit_U0"]) == "meV"
    err = capsys.readouterr().err
    assert "skipped qm9 index 999999: not in qm9pack" in err
    assert f"predicted 2 of 3 molecules -> {out}; skipped 1" in err


XYZ = """3
water
O 0.0 0.0 0.0
H 0.96 0.0 0.0
H -0.24 0.93 0.0
3
unknown element
O 0.0 0.0 0.0
Q 0.96 0.0 0.0
H -0.24 0.93 0.0

2
hydrogen chloride
H 0.0 0.0 0.0
Cl 1.27 0.0 0.0
2
coordinates in nm
H 0.0 0.0 0.0
H 0.074 0.0 0.0
5
methane
C 0.0 0.0 0.0
H 0.63 0.63 0.63
H -0.63 -0.63 0.63
H -0.63 0.63 -0.63
H 0.63 -0.63 -0.63
"""


def test_bad_molecules_are_reported_by_record_and_counted(u0, tmp_path, capsys):
    workdir, _ = u0
    path = tmp_path / "mols.xyz"
    path.write_text(XYZ)
    out = str(tmp_path / "pred.csv")
    p = predict.run(workdir, "xyz", str(path), out, progress=False)
    err = capsys.readouterr().err
    assert f"skipped {path}:record 2 (line 6): cannot parse atom lines: KeyError('Q')" in err
    assert (f"skipped {path}:record 3 (line 12): element Cl (Z=17) is not in the model's training "
            "data (H, C, N, O, F)") in err
    assert f"skipped {path}:record 4 (line 16): atoms 1 and 2 are 0.074 Å apart" in err
    assert f"predicted 2 of 5 molecules -> {out}; skipped 3" in err
    with open(out) as f:
        rows = f.read().splitlines()
    assert rows[0] == "record,name,n_atoms,U0 (meV)"
    assert [r.split(",")[:3] for r in rows[1:]] == [
        [f"{path}:record 1 (line 1)", "water", "3"], [f"{path}:record 5 (line 20)", "methane", "5"]]
    np.testing.assert_array_equal([float(r.split(",")[3]) for r in rows[1:]], p.arrays["U0"])

    # SMILES: an unparseable one, a charged one; NPZ with molecule embeddings.
    out = str(tmp_path / "pred.npz")
    p = predict.run(workdir, "smiles", ["CCO", "C1CC(", "[NH4+]", "c1ccncc1"], out,
                    embeddings="molecule", progress=False)
    err = capsys.readouterr().err
    assert "skipped --smiles:record 2: invalid SMILES 'C1CC('" in err
    assert "skipped --smiles:record 3: net charge +1: the model was trained on neutral molecules" in err
    assert f"predicted 2 of 4 molecules -> {out}; skipped 2" in err
    saved = np.load(out)
    assert list(saved["record"]) == ["--smiles:record 1", "--smiles:record 4"]
    assert list(saved["name"]) == ["CCO", "c1ccncc1"]
    assert list(saved["skipped_record"]) == ["--smiles:record 2", "--smiles:record 3"]
    assert saved["embedding_molecule"].shape == (2, p.arrays["embedding_molecule"].shape[1])
    assert "embedding_atom" not in saved and saved["U0"].shape == (2,)
    assert "step 3" in str(saved["model"])


def _pretraining_workdir(path, encoder: inference.TrainedModel) -> str:
    """A pre-training workdir as experiments.pretrain leaves it (config.json, checkpoints/0),
    holding ``encoder``'s representation and noise head."""
    c = pretrain_frad.get_config("tiny")
    c.model = encoder.config.model
    config_json = json.loads(c.to_json_best_effort())
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_json, f)
    params = {k: encoder.params[k] for k in ("representation", "noise_head")}
    ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
    ckpt.save(0, {"params": params, "step": np.int32(0)}, config_json, {"next_index": 0})
    ckpt.close()
    return str(path)


def test_a_pretraining_workdir_gives_embeddings_only(evaluated, tmp_path):
    model, _, _ = evaluated
    pre = _pretraining_workdir(tmp_path / "frad", model)
    out = str(tmp_path / "emb.npz")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.predict", f"--workdir={pre}", "--smiles=CCO", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "MSPEC_MALLOC_TUNING": "0"})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("predict: error: ") and "is not a fine-tuned model (config.task 'denoise'" in last
    assert "use --embeddings molecule (or atom)" in last and not os.path.exists(out)

    smiles = ["CCO", "c1ccccc1"]
    p = predict.run(pre, "smiles", smiles, out, embeddings="atom", progress=False)
    saved = np.load(out)
    hidden = model.config.model.hidden
    assert saved["embedding_molecule"].shape == (2, hidden)
    assert saved["embedding_atom"].shape == (9 + 12, hidden) and p.units == {}
    assert not {"U0", "energy", "forces"} & set(saved.files)
    # The encoder alone gives the fine-tuned model's representation (same encoder weights).
    full = predict.run(model.workdir, "smiles", smiles, str(tmp_path / "ft.npz"), embeddings="atom",
                       progress=False)
    np.testing.assert_allclose(saved["embedding_atom"], full.arrays["embedding_atom"], rtol=0, atol=1e-5)


def test_the_standardiser_is_refit_when_results_json_is_missing(u0, tmp_path):
    workdir, c = u0
    with open(os.path.join(workdir, "results.json")) as f:
        recorded = json.load(f)["standardizer"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), fresh)
    refit = inference.standardizer_of(str(fresh), inference.read_config(str(fresh)))
    assert (refit.mean, refit.std) == (recorded["mean"], recorded["std"])
    assert recorded["std"] != 1.0


def test_damaged_or_missing_checkpoints_are_errors(u0, tmp_path):
    workdir, _ = u0
    damaged = str(tmp_path / "damaged")
    shutil.copytree(workdir, damaged)
    path = os.path.join(damaged, "checkpoints", "3", "checksum", "metadata")
    with open(path) as f:
        stored = json.load(f)
    key = next(k for k in stored["leaves"] if k.startswith("['params']"))
    stored["leaves"][key] = "00000000"
    with open(path, "w") as f:
        json.dump(stored, f)
    with pytest.raises(checkpoint.CheckpointError, match=r"checksum mismatch in 1 array"):
        inference.load(damaged, "last")
    shutil.rmtree(os.path.join(damaged, "best"))
    with pytest.raises(inference.ModelError, match="no best checkpoint"):
        inference.load(damaged, "best")
    with pytest.raises(FileNotFoundError, match="not a workdir of experiments.finetune"):
        inference.load(str(tmp_path))
    with pytest.raises(run_config.ConfigError, match="--embeddings atom needs --out FILE.npz"):
        predict.run(workdir, "smiles", ["C"], str(tmp_path / "x.csv"), embeddings="atom")
