"""Fine-tuning: forces vs finite differences and rotations, restore from pre-training, targets and
units, schedules, a tiny QM9 run that learns, and exact resume of an MD17 run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.fixtures import md17 as md17_fixture
from experiments.configs import finetune_md17, finetune_qm9
from mspec import graph, models
from mspec.data import pipeline
from mspec.kernels import build
from mspec.training import (
    checkpoint, downstream, finetune, loop, restore, run_config, schedules, targets, train,
)


# --------------------------------------------------------------------------------------------------
# Forces
# --------------------------------------------------------------------------------------------------


def _md17_trainer(std=2.5):
    config = finetune_md17.get_config("tiny")
    return finetune.FinetuneTrainer(config, models.get_model(config.model), train.make_mesh(), std=std), config


def _device_batch(config, positions_list):
    feat = pipeline.Featurizer(radius=config.model.cutoff + config.data.skin, max_z=config.model.max_z)
    mols = [feat({"atomic_numbers": md17_fixture.ETHANOL_Z, "positions": p}) for p in positions_list]
    budget = graph.Budget(n_node=32, n_edge=256, n_graph=4, max_torsions=1)
    return {k: jnp.asarray(v) for k, v in graph.pack(mols, budget).items()}


def test_forces_equal_finite_differences_of_the_energy():
    trainer, config = _md17_trainer()
    R, _, _ = md17_fixture.trajectory(2, seed=3)
    with jax.enable_x64(True):
        batch = _device_batch(config, R)
        batch["positions"] = batch["positions"].astype(jnp.float64)
        params = trainer.model.init(jax.random.key(1), batch)["params"]
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        energy, forces, _ = jax.jit(trainer.energy_and_forces)(params, batch, batch["positions"])

        @jax.jit
        def total_energy(pos):
            e, _ = trainer.molecule_outputs(params, batch, pos)
            return jnp.sum(jnp.where(batch["graph_mask"], e, 0.0))

        def total(pos):
            return float(total_energy(pos))

        h = 1e-5
        rng = np.random.default_rng(0)
        real = np.flatnonzero(np.asarray(batch["node_mask"]))
        for atom in rng.choice(real, 5, replace=False):
            for axis in range(3):
                plus = batch["positions"].at[atom, axis].add(h)
                minus = batch["positions"].at[atom, axis].add(-h)
                fd = -(total(plus) - total(minus)) / (2 * h)
                np.testing.assert_allclose(float(forces[atom, axis]), fd, rtol=1e-5, atol=1e-7)
        energy, forces = np.asarray(energy), np.asarray(forces)
    # Padding atoms get exactly zero force; the two molecules' energies are separate.
    assert np.all(np.asarray(forces)[~np.asarray(batch["node_mask"])] == 0)
    assert energy.shape == (4,) and energy[2] == 0 and energy[3] == 0


def test_forces_rotate_with_the_molecule(monkeypatch):
    # As in test_et_model.test_e3_equivariance: the EqLN covariance regulariser is fixed in the lab
    # frame (as in the torch original), so the model is only approximately equivariant with it.
    # Without it, and in float64 (the whitening amplifies float32 round-off), forces rotate exactly.
    from mspec.models import et as et_lib

    monkeypatch.setattr(et_lib, "_EQLN_COV_EPS", 0.0)
    trainer, config = _md17_trainer()
    R, _, _ = md17_fixture.trajectory(1, seed=4)
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))
    rot = q * np.sign(np.linalg.det(q))  # proper rotation
    with jax.enable_x64(True):
        batch = _device_batch(config, R)
        batch["positions"] = batch["positions"].astype(jnp.float64)
        params = trainer.model.init(jax.random.key(2), batch)["params"]
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        step = jax.jit(trainer.energy_and_forces)
        e1, f1, _ = step(params, batch, batch["positions"])
        e2, f2, _ = step(params, batch, batch["positions"] @ jnp.asarray(rot.T))
        e1, f1, e2, f2 = (np.asarray(a) for a in (e1, f1, e2, f2))
    np.testing.assert_allclose(e2, e1, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(f2, f1 @ rot.T, rtol=0, atol=1e-8)
    assert np.abs(f1).max() > 1e-3  # not a trivially zero force field


# --------------------------------------------------------------------------------------------------
# Restore from pre-training
# --------------------------------------------------------------------------------------------------


def _fresh_params(config, seed):
    trainer = finetune.FinetuneTrainer(config, models.get_model(config.model), train.make_mesh())
    batch = _device_batch(config, md17_fixture.trajectory(1)[0])
    return trainer.model.init(jax.random.key(seed), batch)["params"]


def _write_stage2_checkpoint(directory, params, step=7):
    """A MolSpectra stage-2-like checkpoint: encoder, heads, and an extra spectrum encoder."""
    state = {
        "params": {**params, "specformer": {"embed": {"kernel": jnp.ones((3, 4))}}},
        "step": jnp.asarray(step),
        "normalizer": (jnp.zeros(3), jnp.ones(3), jnp.asarray(5.0)),
    }
    ck = checkpoint.Checkpointer(directory, async_save=False)
    ck.save(step, state, {"model": "x"}, {"next_index": 0})
    ck.close()


def test_restore_copies_exactly_the_requested_subtrees(tmp_path, capsys):
    config = finetune_md17.get_config("tiny,noisy")
    pretrained = _fresh_params(config, seed=11)
    _write_stage2_checkpoint(str(tmp_path / "pre" / "checkpoints"), pretrained)
    fresh = _fresh_params(config, seed=12)
    new, report = restore.restore_subtrees(fresh, str(tmp_path / "pre"), ("representation", "noise_head"))
    for name in ("representation", "noise_head"):
        for a, b in zip(jax.tree.leaves(new[name]), jax.tree.leaves(pretrained[name])):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))  # bit-identical
    for a, b in zip(jax.tree.leaves(new["scalar_head"]), jax.tree.leaves(fresh["scalar_head"])):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert report.step == 7 and set(report.restored) == {"representation", "noise_head"}
    assert set(report.fresh) == {"scalar_head"} and report.ignored == ["scalar_head", "specformer"]
    text = report.summary()
    assert "restored: representation" in text and "fresh:    scalar_head" in text and "specformer" in text


def test_restore_errors_are_explicit(tmp_path):
    config = finetune_md17.get_config("tiny,noisy")
    _write_stage2_checkpoint(str(tmp_path / "ck"), _fresh_params(config, 1))
    fresh = _fresh_params(config, 2)
    with pytest.raises(restore.RestoreError, match="no params subtree 'encoder'"):
        restore.restore_subtrees(fresh, str(tmp_path / "ck"), ("representation",), prefix="encoder")
    bigger = config.copy_and_resolve_references()
    bigger.model.hidden = 96
    with pytest.raises(restore.RestoreError, match="shape mismatch in representation"):
        restore.restore_subtrees(_fresh_params(bigger, 2), str(tmp_path / "ck"), ("representation",))
    with pytest.raises(restore.RestoreError, match="no finished checkpoint"):
        restore.restore_subtrees(fresh, str(tmp_path), ("representation",))
    with pytest.raises(restore.RestoreError, match="step 3 not in"):
        restore.restore_subtrees(fresh, str(tmp_path / "ck"), ("representation",), step=3)


# --------------------------------------------------------------------------------------------------
# Targets, units, schedules
# --------------------------------------------------------------------------------------------------


def test_standardisation_round_trips_and_uses_the_unbiased_std():
    y = np.random.default_rng(0).normal(3.0, 2.0, size=101)
    s = targets.Standardizer.fit(y)
    assert s.mean == pytest.approx(np.mean(y)) and s.std == pytest.approx(np.std(y, ddof=1))
    np.testing.assert_allclose(s.denormalize(s.normalize(y)), y, rtol=0, atol=1e-12)
    z = s.normalize(y)
    assert np.mean(z) == pytest.approx(0, abs=1e-12) and np.std(z, ddof=1) == pytest.approx(1)
    with pytest.raises(ValueError, match="std 0"):
        targets.Standardizer.fit(np.ones(5))


def test_unit_conversions_against_hand_computed_values():
    # 1 Hartree = 27.211386246 eV = 27211.386246 meV (CODATA 2018).
    homo_hartree = -0.25
    ev = homo_hartree * targets.HARTREE_TO_EV
    assert ev * downstream.QM9.report_factor("homo") == pytest.approx(-6802.8465615)
    for name in ("homo", "lumo", "gap", "zpve", "U0", "U", "H", "G"):
        assert downstream.QM9.report_unit(name) == "meV" and downstream.QM9.report_factor(name) == 1000
    for name, unit in (("mu", "D"), ("alpha", "a0^3"), ("r2", "a0^2"), ("cv", "cal/mol/K")):
        assert downstream.QM9.report_unit(name) == unit and downstream.QM9.report_factor(name) == 1
    assert downstream.MD17.report_unit("forces") == "kcal/mol/Å"
    # Methane U0 atom references: C + 4 H, in eV.
    assert targets.atomref_sum("U0", [6, 1, 1, 1, 1]) == pytest.approx(-1029.86312267 + 4 * -13.61312172)
    # The QM9 atomref table in Hartree (H: -0.500273) converts to PyG's eV value.
    assert -0.500273 * targets.HARTREE_TO_EV == pytest.approx(targets.QM9_ATOMREF_EV["U0"][0], abs=1e-5)
    # GFN2 data: Hartree -> kcal/mol and Hartree/bohr -> kcal/mol/Å.
    from data_pipelines import md17_gfn2

    assert md17_gfn2.HARTREE_IN_KCAL_PER_MOL == pytest.approx(627.5095, abs=1e-4)
    assert md17_gfn2.HARTREE_IN_KCAL_PER_MOL / md17_gfn2.BOHR_IN_ANGSTROM == pytest.approx(1185.8212, abs=1e-3)
    assert downstream.MD17.published("aspirin", 950)["Frad"] == 0.2087
    assert downstream.QM9.published("homo")["MolSpectra"] == 15.5


def test_every_finetuning_task_has_one_downstream_kind():
    from mspec.training import finetune, tasks

    assert set(downstream.KINDS) == set(finetune.TASKS) == {
        name for name, cls in tasks.TASKS.items() if cls is tasks.Finetuning}
    assert downstream.of("md17").forces and not downstream.of("qm9").forces
    assert downstream.MD17.properties("aspirin") == ("energy", "forces")
    assert downstream.QM9.properties("gap") == ("gap",)
    assert downstream.MD17.headline_unit("aspirin") == "kcal/mol/Å"
    assert downstream.QM9.headline_unit("gap") == "meV" and downstream.QM9.headline_factor("gap") == 1000
    assert downstream.get("denoise") is None
    with pytest.raises(ValueError, match="'denoise' is not a fine-tuning task"):
        downstream.of("denoise")


def test_cosine_restarts_matches_the_official_closed_form():
    f = schedules.cosine_restarts(4e-4, 10_000, 100_000, 2, 1e-7)
    assert float(f(0)) == pytest.approx(4e-4 / 10_000)
    assert float(f(9_999)) == pytest.approx(4e-4)
    assert float(f(10_000)) == pytest.approx(1e-7 + (4e-4 - 1e-7) * (1 + np.cos(0.1 * np.pi)) / 2, rel=1e-5)
    for start, length in ((100_000, 200_000), (300_000, 400_000)):
        assert float(f(start)) == pytest.approx(4e-4)  # restart
        assert float(f(start - 1)) == pytest.approx(1e-7, rel=1e-3)
        mid = start + length // 2
        assert float(f(mid)) == pytest.approx(1e-7 + (4e-4 - 1e-7) / 2, rel=1e-5)


def test_plateau_reduces_after_patience_and_respects_the_floor():
    p = schedules.Plateau(factor=0.5, patience=2, threshold=0.0, lr_min=1e-4, base_lr=1e-3)
    state = (1.0, np.inf, 0)
    trace = []
    for v in (1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95):
        state = p.update(*state, v)
        trace.append(state[0])
    # Reductions on the 3rd bad validation in a row; never below lr_min / base_lr = 0.1.
    assert trace == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125]
    state = (0.125, 0.9, 2)
    assert p.update(*state, 0.95)[0] == 0.1


def test_config_variants():
    for t in targets.QM9_TARGETS:
        c = finetune_qm9.get_config(t)
        assert c.target.name == t and c.batch_size == 128 and c.total_steps == 700_000
        assert c.loss.denoising_weight == 0.1 and c.noise.tau == 0.005
        assert c.target.atomref == (t in ("U0", "U", "H", "G"))
    c = finetune_md17.get_config("aspirin,real,train=9500")
    assert c.data.dataset == "md17/aspirin" and c.data.train_split == "train_9500"
    assert c.data.validation_split == "validation_500" and c.batch_size == 80
    assert finetune_md17.get_config("uracil").data.dataset == "md17/gfn2_uracil"
    assert finetune_md17.get_config("toluene,rmd17=2").data.test_split == "test_rmd17_02"
    with pytest.raises(ValueError, match="unknown QM9 variant"):
        finetune_qm9.get_config("homo2")
    with pytest.raises(ValueError, match="unknown config argument"):
        finetune_md17.get_config("aspirin,trian=950")


def test_message_passing_auto_is_the_fused_kernels_for_qm9_and_md17(capsys):
    for config in (finetune_qm9.get_config("tiny"), finetune_md17.get_config("aspirin"),
                   finetune_md17.get_config("tiny")):
        assert config.model.message_passing == "auto"
        assert finetune.message_passing_of(config) == "auto"
        assert "message passing: fused CPU kernels (model.message_passing='auto')" in capsys.readouterr().err
    md17 = finetune_md17.get_config("tiny")
    md17.model.message_passing = "fused"
    finetune.check_config(md17)  # training on forces with the kernels is allowed


@pytest.mark.skipif(not build.available(), reason="fused kernels unavailable here")
def test_md17_force_training_gradient_on_the_fused_kernels_equals_xla():
    # The loss differentiates the forces, so its parameter gradient is a second derivative of the
    # energy: on the fused path it runs the message kernel's second-order kernel and the EqLN
    # kernels' (the tiny config has per-layer vector norms) XLA second derivatives. Both float32
    # paths are compared with XLA ops in float64: the fused one must be as close as XLA's float32
    # (a whitened norm's weight gradient is ill-conditioned at initialisation: ~1e-2 for both).
    config = finetune_md17.get_config("tiny")
    R, _, _ = md17_fixture.trajectory(2, seed=4)
    batch = _device_batch(config, R)
    rng = np.random.default_rng(0)
    c_e = rng.standard_normal(4).astype(np.float32)
    c_f = rng.standard_normal(batch["positions"].shape).astype(np.float32)

    def grads(path, x64=False):
        config.model.message_passing = path
        trainer = finetune.FinetuneTrainer(config, models.get_model(config.model), train.make_mesh(), std=2.5)
        b = dict(batch)
        params = trainer.model.init(jax.random.key(1), b)["params"]
        if x64:
            params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
            b["positions"] = b["positions"].astype(jnp.float64)

        def loss(p):
            e, f, _ = trainer.energy_and_forces(p, b, b["positions"])
            return jnp.sum(e * c_e) + jnp.sum(f * c_f) + jnp.sum(f ** 2)

        return jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(params))

    xla32, fused32 = grads("xla"), grads("fused")
    with jax.enable_x64(True):
        exact = grads("xla", x64=True)
    nonzero = 0
    for (name, g64), (_, gx), (_, gf) in zip(exact, xla32, fused32):
        g64, gx, gf = (np.asarray(g, np.float64) for g in (g64, gx, gf))
        scale = np.abs(g64).max()
        if scale == 0:  # the first layer's vec_proj: its input vectors are 0
            assert not gf.any(), jax.tree_util.keystr(name)
            continue
        nonzero += 1
        err_xla, err_fused = np.abs(gx - g64).max() / scale, np.abs(gf - g64).max() / scale
        assert err_fused <= 2 * err_xla + 2e-5, (jax.tree_util.keystr(name), err_fused, err_xla)
    assert nonzero >= len(exact) - 2, (nonzero, len(exact))


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_tiny_qm9_run_beats_the_train_mean(qm9_sample_dir, tmp_path):
    c = finetune_qm9.get_config("tiny")
    c.data.data_dir = qm9_sample_dir
    summary = loop.train_and_evaluate(c, str(tmp_path))
    assert summary["compilations"] == 1
    res = summary["results"]
    for which in ("last", "best"):
        test = res[which]["test"]
        assert test["n"] == 200 and test["unit"] == "meV"
        assert test["mae"] < 0.6 * test["train_mean_mae"], test
    assert res["best"]["validation"]["mae"] <= res["last"]["validation"]["mae"] + 1e-9
    assert os.path.getsize(tmp_path / "parity_last.png") > 1000
    assert res["last"]["parity_plot"] == "parity_last.png"  # relative to the workdir
    assert os.path.isfile(tmp_path / "results.json")


def test_parity_plots_show_the_mae_in_each_panel():
    from mspec.training import evaluation

    pred = {"y_true": np.array([1.0, 2.0, 3.0]), "y_pred": np.array([1.5, 2.0, 3.0]),
            "ref": np.zeros(3), "f_true": np.ones((4, 3)), "f_pred": np.zeros((4, 3))}
    fig = evaluation.parity_figure("qm9", "homo", pred, "t")
    assert [t.get_text() for t in fig.axes[0].texts] == ["MAE 166.7 meV\n(n = 3)"]
    fig = evaluation.parity_figure("md17", "aspirin", pred, "t")
    assert [a.texts[0].get_text() for a in fig.axes] == [
        "MAE 0.1667 kcal/mol\n(n = 3)", "MAE 1 kcal/mol/Å\n(n = 12)"]


@pytest.fixture(scope="module")
def md17_fixture_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("md17_npz")
    md17_fixture.write(str(d))
    return str(d)


def _md17_tiny(md17_fixture_dir, data_dir, **overrides):
    c = finetune_md17.get_config("tiny,real,noisy")
    c.data.manual_dir = md17_fixture_dir
    c.data.data_dir = data_dir
    c.total_steps = 100
    c.eval_every = 3
    c.checkpoint_every = 3
    c.log_every = 1
    c.optim.schedule = "plateau"
    c.optim.plateau_patience = 0  # exercise the plateau state across the resume
    for k, v in overrides.items():
        c[k] = v
    return c


def test_abstract_state_is_the_layout_of_a_real_state(md17_fixture_dir, tmp_path):
    """A resume restores into ``checkpoint.abstract_state`` (no initialisation is run): it must be
    exactly the shapes, dtypes and shardings of a state the trainer makes."""
    setup = finetune.build(_md17_tiny(md17_fixture_dir, str(tmp_path / "tfds")))
    args = (jax.random.key(0), setup.dummy_batch())
    real = checkpoint.abstract_like(setup.trainer.init_state(*args))
    abstract = checkpoint.abstract_state(setup.trainer.init_state, setup.trainer.replicated, *args)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
        assert (a.shape, a.dtype) == (r.shape, r.dtype)
        assert a.sharding.is_equivalent_to(r.sharding, len(a.shape))


def test_md17_resume_is_exact(md17_fixture_dir, tmp_path):
    data_dir = str(tmp_path / "tfds")
    ref, resumed = str(tmp_path / "ref"), str(tmp_path / "resumed")
    loop.train_and_evaluate(_md17_tiny(md17_fixture_dir, data_dir, stop_after_step=6), ref)
    loop.train_and_evaluate(_md17_tiny(md17_fixture_dir, data_dir, stop_after_step=3), resumed)
    summary = loop.train_and_evaluate(_md17_tiny(md17_fixture_dir, data_dir, stop_after_step=6), resumed)
    assert summary["start_step"] == 3 and summary["final_step"] == 6

    def final_state(workdir):
        setup = finetune.build(_md17_tiny(md17_fixture_dir, data_dir))
        abstract = checkpoint.abstract_like(setup.trainer.init_state(jax.random.key(0), setup.dummy_batch()))
        ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
        step, state, _, data = ck.restore(abstract)
        ck.close()
        return step, jax.device_get(state), data

    s1, a, d1 = final_state(ref)
    s2, b, d2 = final_state(resumed)
    assert s1 == s2 == 6 and d1 == d2
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.isfinite(float(a["energy_ema"]))  # the energy-loss EMA is carried in the state


# A real kill between the best and the periodic checkpoint: tests/test_faults.py.


def test_evaluate_options_select_checkpoints_and_the_validation_subset(qm9_sample_dir, tmp_path):
    c = finetune_qm9.get_config("tiny")
    c.data.data_dir = qm9_sample_dir
    c.total_steps = 20
    c.eval_every = 10
    c.checkpoint_every = 10
    c.data.train_split = "train[:100]"
    c.evaluate.checkpoints = ("best",)
    c.evaluate.validation_max_molecules = 30
    res = loop.train_and_evaluate(c, str(tmp_path))["results"]
    assert "last" not in res and res["best"]["validation"]["n"] == 30
    assert res["best"]["test"]["n"] == 200 and res["split_sizes"]["train"] == 100
    c.evaluate.checkpoints = ("final",)
    with pytest.raises(ValueError, match="config.evaluate.checkpoints must name"):
        finetune.check_config(c)
