"""MolSpectra stage 2: restoring stage 1, spectra in the batch, end-to-end training and resume."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import synthetic_spectra
from experiments.configs import pretrain_coord, pretrain_molspectra
from mspec import graph, models
from mspec.data import datasets, pipeline
from mspec.training import checkpoint, loop, metrics, molspectra, restore, train

LENGTHS = dict(uv=701, ir=3501, raman=3501)
SMALL_BUDGET = graph.Budget(
    n_node=40, n_edge=1200, n_graph=3, max_torsions=8, spectra=tuple(LENGTHS.items())
)


@pytest.fixture(scope="module")
def spectra_data_dir(qm9_sample_dir):
    """The data directory, with `qm9_synthetic_spectra/sample` built from `qm9/sample`."""
    datasets.get_builder("qm9_synthetic_spectra/sample", qm9_sample_dir)
    return qm9_sample_dir



def _tiny_synthetic():
    """The `tiny` stage-2 config on the synthetic spectra (learnable retrieval, built in seconds)."""
    c = pretrain_molspectra.get_config("tiny")
    c.data.dataset = "qm9_synthetic_spectra/sample"
    return c

def write_stage1_checkpoint(directory, seed=123, real_init=False, **model_overrides):
    """A stage-1 (Coord, tiny) checkpoint laid out as train.py writes it, with a non-trivial
    normaliser state. Weights: N(0, 1) drawn on the host (no compilation; fine for restore
    tests), or the model's real initialisation (``real_init``; for training from it)."""
    c = pretrain_coord.get_config("tiny")
    for k, v in model_overrides.items():
        c.model[k] = v
    trainer = train.Trainer(c, models.get_model(c.model), train.make_mesh())
    dummy = graph.pack([], SMALL_BUDGET)
    if real_init:
        params = trainer.init_state(jax.random.key(seed), dummy)["params"]
    else:
        shapes = jax.eval_shape(trainer.model.init, jax.random.key(0), dummy)["params"]
        rng = np.random.default_rng(seed)
        params = jax.tree.map(
            lambda s: jnp.asarray(rng.normal(size=s.shape).astype(s.dtype)), shapes
        )
    state = {
        "params": params,
        "opt": trainer.tx.init(params),
        "step": jnp.asarray(7, jnp.int32),
        "normalizer": (jnp.full(3, 2.0), jnp.full(3, 9.0), jnp.asarray(4.0)),
    }
    ckpt = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"))
    ckpt.save(7, state, {"model": c.model.to_dict()}, {"next_index": 0})
    ckpt.close()
    return jax.device_get(state)


def stage2_trainer(**init_from):
    c = _tiny_synthetic()
    c.loss.target_normalization = "running"
    for k, v in init_from.items():
        c.init_from[k] = v
    return molspectra.MolSpectraTrainer(
        c, models.get_model(c.model), train.make_mesh(), spectrum_lengths=LENGTHS
    )


@pytest.fixture(scope="module")
def fresh_stage2_state():
    return stage2_trainer().init_state(jax.random.key(0), graph.pack([], SMALL_BUDGET))


def test_stage2_restores_encoder_and_noise_head_bit_identically(tmp_path, fresh_stage2_state):
    s1 = write_stage1_checkpoint(str(tmp_path / "s1"))
    trainer = stage2_trainer(checkpoint=str(tmp_path / "s1"))
    fresh = fresh_stage2_state
    state = jax.device_get(trainer.start_from_pretrained(fresh))
    fresh = jax.device_get(fresh)
    assert sorted(state["params"]) == ["noise_head", "representation", "specformer"]
    for name in ("representation", "noise_head"):
        for a, b in zip(
            jax.tree.leaves(state["params"][name]), jax.tree.leaves(s1["params"][name])
        ):
            np.testing.assert_array_equal(a, b)
    # The encoder really was overwritten (a fresh init differs), SpecFormer was not touched.
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(fresh["params"]["representation"]),
            jax.tree.leaves(s1["params"]["representation"]),
        )
    )
    for a, b in zip(
        jax.tree.leaves(state["params"]["specformer"]),
        jax.tree.leaves(fresh["params"]["specformer"]),
    ):
        np.testing.assert_array_equal(a, b)
    # "running" target normalisation continues stage 1's accumulated statistics (quirk Q8).
    for a, b in zip(state["normalizer"], s1["normalizer"]):
        np.testing.assert_array_equal(a, b)


def test_stage2_restore_fails_loudly_on_mismatch(tmp_path, fresh_stage2_state):
    write_stage1_checkpoint(str(tmp_path / "narrow"), hidden=32)
    trainer = stage2_trainer(checkpoint=str(tmp_path / "narrow"))
    fresh = fresh_stage2_state
    with pytest.raises(restore.RestoreError, match=r"shape mismatch in representation.*64.*32"):
        trainer.start_from_pretrained(fresh)

    write_stage1_checkpoint(str(tmp_path / "nonoise"), heads=("scalar",))
    trainer = stage2_trainer(checkpoint=str(tmp_path / "nonoise"))
    with pytest.raises(restore.RestoreError, match="has no params subtree 'noise_head'"):
        trainer.start_from_pretrained(fresh)

    trainer = stage2_trainer(
        checkpoint=str(tmp_path / "nonoise"), subtrees=("representation", "scalar_head")
    )
    with pytest.raises(
        restore.RestoreError, match="model has no parameter subtree 'scalar_head'"
    ):
        trainer.start_from_pretrained(fresh)

    trainer = stage2_trainer(checkpoint=str(tmp_path / "missing"))
    with pytest.raises(restore.RestoreError, match="does not exist"):
        trainer.start_from_pretrained(fresh)


def test_spectra_ride_in_the_batch_and_bad_records_are_named(spectra_data_dir):
    builder = datasets.get_builder("qm9_synthetic_spectra/sample", spectra_data_dir, build=False)
    source = datasets.open_split(builder, "train")
    lengths = molspectra.spectrum_lengths(_tiny_synthetic(), builder)
    assert lengths == LENGTHS
    feat = pipeline.Featurizer(
        radius=5.5, max_z=100, dataset="synthetic", spectra=tuple(lengths.items())
    )
    mols = [feat(source[i]) for i in range(2)]
    batch = graph.pack(mols, SMALL_BUDGET)
    np.testing.assert_array_equal(batch["spectrum_ir"][0], source[0]["ir"])
    np.testing.assert_array_equal(batch["spectrum_uv"][1], source[1]["uv"])
    assert not batch["spectrum_raman"][2].any()  # the padding slot
    # The synthetic spectra are the documented deterministic function of the molecule.
    expected = synthetic_spectra.synthetic_spectra(
        source[0]["atomic_numbers"], source[0]["positions"]
    )
    np.testing.assert_allclose(source[0]["raman"], expected["raman"], rtol=1e-6)

    ex = dict(source[0])
    del ex["uv"]
    with pytest.raises(pipeline.BadRecordError, match=r"record \d+: no spectrum 'uv'"):
        feat(ex)
    ex = dict(source[0], ir=np.zeros(3500, np.float32))
    with pytest.raises(pipeline.BadRecordError, match=r"spectrum 'ir' has shape \(3500,\)"):
        feat(ex)
    ex = dict(source[0], raman=np.full(3501, np.nan, np.float32))
    with pytest.raises(pipeline.BadRecordError, match="'raman' is not finite"):
        feat(ex)

    c = _tiny_synthetic()
    c.spectra.types = ("ir", "nmr")
    with pytest.raises(ValueError, match="declares 'nmr'"):
        molspectra.spectrum_lengths(c, builder)


def test_configs_build_and_modalities_come_from_the_config():
    assert pretrain_molspectra.get_config().data.dataset == "qm9s/gfn2"  # the shipped spectra
    for variant in (None, "tiny"):
        c = pretrain_molspectra.get_config(variant)
        t = molspectra.MolSpectraTrainer(
            c, models.get_model(c.model), train.make_mesh(), spectrum_lengths=LENGTHS
        )
        assert [s.name for s in t.spectrum_specs] == ["uv", "ir", "raman"]
    assert [s.num_patches for s in t.spectrum_specs] == [27, 27, 27]  # tiny's coarse patches
    c = pretrain_molspectra.get_config()
    c.spectra.types = ("ir", "raman")  # the paper's "without UV-Vis" ablation
    t = molspectra.MolSpectraTrainer(
        c, models.get_model(c.model), train.make_mesh(), spectrum_lengths=LENGTHS
    )
    assert [(s.name, s.num_patches, s.num_masked) for s in t.spectrum_specs] == [
        ("ir", 139, 14),
        ("raman", 139, 14),
    ]
    with pytest.raises(ValueError, match="unknown variant"):
        pretrain_molspectra.get_config("huge")
    c = _tiny_synthetic()
    c.specformer.embed_dim = 32
    with pytest.raises(ValueError, match="must equal the ET width"):
        molspectra.MolSpectraTrainer(
            c, models.get_model(c.model), train.make_mesh(), spectrum_lengths=LENGTHS
        ).check()


def test_objective_is_the_same_on_one_and_four_devices(spectra_data_dir):
    """BatchNorm statistics and InfoNCE negatives span the global batch, whatever the mesh."""
    assert jax.device_count() == 4
    builder = datasets.get_builder("qm9_synthetic_spectra/sample", spectra_data_dir, build=False)
    source = datasets.open_split(builder, "train")
    feat = pipeline.Featurizer(radius=5.5, max_z=100, spectra=tuple(LENGTHS.items()))
    budget = graph.Budget(
        n_node=97, n_edge=1800, n_graph=5, max_torsions=8, spectra=tuple(LENGTHS.items())
    )
    ds = pipeline.make_grain_dataset(source, feat, seed=0, shuffle=False, repeat=False)
    it = pipeline.PackedBatchIterator(ds, budget, num_devices=4)
    local = next(it)
    it.close()
    results, state = [], None
    for devices in (jax.devices(), jax.devices()[:1]):
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        c = _tiny_synthetic()
        trainer = molspectra.MolSpectraTrainer(
            c, models.get_model(c.model), mesh, spectrum_lengths=LENGTHS
        )
        if state is None:
            state = trainer.init_state(jax.random.key(0), graph.pack([], budget))
        state = jax.device_put(jax.device_get(state), trainer.replicated)  # same values, this mesh

        def objective(params, batch, _t=trainer, _s=state):
            loss, (m, _, bs, _) = _t._objective(
                params,
                _s["batch_stats"],
                jax.random.key(3),
                batch,
                tuple(jnp.zeros(()) for _ in range(3)),
                True,
            )
            return loss, (m, bs)

        (loss, (m, bs)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
            state["params"], trainer.global_batch(local)
        )
        results.append((float(loss), jax.device_get(m), jax.device_get(bs), jax.device_get(grads)))
    (l4, m4, bs4, g4), (l1, m1, bs1, g1) = results
    assert l4 == pytest.approx(l1, rel=1e-5)
    for k in ("contrastive", "mpr", "denoising_mse"):
        assert float(m4[k]) == pytest.approx(float(m1[k]), rel=1e-5), k
    for a, b in zip(jax.tree.leaves(bs4), jax.tree.leaves(bs1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def _train_rows(workdir):
    rows = {}
    for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if "train/loss" in r:
            rows[r["step"]] = r
    return rows


def test_stage2_tiny_end_to_end_retrieval_beats_chance_and_resumes_exactly(
    spectra_data_dir, tmp_path
):
    write_stage1_checkpoint(str(tmp_path / "stage1"), real_init=True)
    c = _tiny_synthetic()
    c.data.data_dir = spectra_data_dir
    c.init_from.checkpoint = str(tmp_path / "stage1")
    # Retrieval on training molecules (64 of them, in batches of ~13 real molecules).
    c.data.eval_split = "train"
    c.data.eval_max_molecules = 64
    c.batch_size = 16
    c.total_steps = 60
    c.log_every = 1
    c.eval_every = 30
    c.checkpoint_every = 30
    full = str(tmp_path / "full")
    summary = loop.train_and_evaluate(c, full)
    assert summary["compilations"] == 1 and summary["final_step"] == 60

    # Retrieval: far above chance after 60 steps.
    assert summary["eval/retrieval_top1"] > 2.5 * summary["eval/retrieval_chance_top1"], summary
    assert summary["eval/retrieval_top5"] > summary["eval/retrieval_chance_top5"] + 0.15, summary
    rows = _train_rows(full)
    first = np.mean([rows[s]["train/contrastive"] for s in range(1, 11)])
    last = np.mean([rows[s]["train/contrastive"] for s in range(51, 61)])
    assert last < first - 0.2, (first, last)
    for term in (
        "train/mpr_uv",
        "train/mpr_ir",
        "train/mpr_raman",
        "train/denoising_mse",
        "train/retrieval_top1",
    ):
        assert term in rows[60]

    # Pictures: one PNG per type and evaluation, also in TensorBoard.
    pngs = sorted(os.listdir(os.path.join(full, "reconstructions")))
    assert pngs == [f"step_000000{s}_{t}.png" for s in (30, 60) for t in ("ir", "raman", "uv")]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(os.path.join(full, "tensorboard"))
    ea.Reload()
    assert {"reconstruction/uv", "reconstruction/ir", "reconstruction/raman"} <= set(
        ea.Tags()["images"]
    )
    assert [e.step for e in ea.Scalars("eval/retrieval_top1")] == [30, 60]

    # Resume from the step-30 checkpoint (BatchNorm statistics included): identical steps 31-60.
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(
        os.path.join(full, "checkpoints", "30"), os.path.join(resumed, "checkpoints", "30")
    )
    summary2 = loop.train_and_evaluate(c, resumed)
    assert summary2["start_step"] == 30
    a, b = _train_rows(full), _train_rows(resumed)
    for step in range(31, 61):
        assert a[step]["train/loss"] == b[step]["train/loss"], step
    assert summary2["eval/retrieval_top1"] == summary["eval/retrieval_top1"]
    assert summary2["eval/mpr"] == summary["eval/mpr"]


def test_learnable_temperature_is_a_parameter():
    c = _tiny_synthetic()
    c.loss.contrastive.learnable_temperature = True
    c.loss.contrastive.temperature = 0.2
    trainer = molspectra.MolSpectraTrainer(
        c, models.get_model(c.model), train.make_mesh(), spectrum_lengths=LENGTHS
    )
    shapes = jax.eval_shape(trainer.init_state, jax.random.key(0), graph.pack([], SMALL_BUDGET))
    assert shapes["params"]["contrastive"]["log_temperature"].shape == ()
    assert "contrastive" in shapes["opt"][0].mu  # optimised like every other parameter
    params = {"contrastive": {"log_temperature": jnp.log(0.2)}}
    assert float(trainer.temperature(params)) == pytest.approx(0.2)
    assert float(trainer.temperature({})) == pytest.approx(0.2)  # fixed when not learnable
