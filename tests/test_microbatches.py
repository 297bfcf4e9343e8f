"""Gradient accumulation over micro-batches (config.microbatches): the same loss and gradients as
one batch holding every sub-batch, one compilation, exact resume, clear errors."""

import math

import jax
import numpy as np
import pytest

from mspec import graph, models
from mspec.data import datasets, pipeline
from mspec.training import loop, metrics, train
from tests.test_train import tiny_config


def _molecules(qm9_sample_dir, n):
    builder = datasets.get_builder("qm9/sample", qm9_sample_dir, build=False)
    source = datasets.open_split(builder, "train")
    feat = pipeline.Featurizer(radius=5.5, max_z=100)
    return [feat(source[i]) for i in range(n)]


def test_microbatched_gradients_equal_one_batch(qm9_sample_dir):
    # Zero noise and an unnormalised target: the loss is the mean squared predicted noise over the
    # real atoms, identical whichever way the molecules are grouped, so the sub-batch weighting
    # (by real-atom share, not a plain mean of the sub-batch losses) is what is tested.
    mols = _molecules(qm9_sample_dir, 8)
    sizes = [len(m["atomic_numbers"]) for m in mols]
    assert len(set(sizes)) > 1  # uneven sub-batches, or the weighting would not matter
    budget = graph.Budget(n_node=200, n_edge=4000, n_graph=9, max_torsions=8)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    stats = tuple(np.zeros(()) for _ in range(3))
    results = []
    for k, local in [
        (1, graph.stack([graph.pack(mols[0:4], budget), graph.pack(mols[4:8], budget)])),
        (
            2,
            train.stack_microbatches(
                [
                    graph.stack([graph.pack(mols[0:1], budget), graph.pack(mols[4:7], budget)]),
                    graph.stack([graph.pack(mols[1:4], budget), graph.pack(mols[7:8], budget)]),
                ]
            ),
        ),
    ]:
        c = tiny_config(qm9_sample_dir, microbatches=k)
        c.noise.type = "coord"
        c.noise.tau = 0.0
        c.loss.target_normalization = "none"
        trainer = train.Trainer(c, models.get_model(c.model), mesh)
        params = trainer.init_state(jax.random.key(0), graph.pack([], budget))["params"]
        fn = jax.jit(trainer.loss_and_grads)
        (loss, (mse, _)), grads = fn(params, jax.random.key(3), trainer.global_batch(local, microbatched=k > 1), stats)
        results.append((float(loss), float(mse), jax.device_get(grads)))
    (l1, m1, g1), (l2, m2, g2) = results
    assert l1 > 0
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert m2 == pytest.approx(m1, rel=1e-5)
    # Float rounding differs with the grouping (sums over other atoms, other kernel blocks) and the
    # whitened vector norm amplifies it where a small model's vectors are nearly planar, so the
    # absolute tolerance is relative to each gradient's scale; a wrong sub-batch weighting moves
    # gradients by a sizeable fraction of it.
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


def _losses(workdir):
    return {r["step"]: r["train/loss"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl") if "train/loss" in r}


def test_microbatched_training_compiles_once_and_resumes_exactly(qm9_sample_dir, tmp_path):
    common = dict(microbatches=2, log_every=1, checkpoint_every=2, eval_every=1000)
    straight = loop.train_and_evaluate(
        tiny_config(qm9_sample_dir, stop_after_step=4, **common), str(tmp_path / "straight")
    )
    assert straight["compilations"] == 1 and straight["final_step"] == 4
    assert all(math.isfinite(v) for v in _losses(tmp_path / "straight").values())

    loop.train_and_evaluate(tiny_config(qm9_sample_dir, stop_after_step=2, **common), str(tmp_path / "split"))
    resumed = loop.train_and_evaluate(
        tiny_config(qm9_sample_dir, stop_after_step=4, **common), str(tmp_path / "split")
    )
    assert resumed["start_step"] == 2
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert [b[s] for s in (3, 4)] == [a[s] for s in (3, 4)]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(microbatches=-1), "microbatches must be an integer >= 1, or 0 for automatic"),
        (dict(microbatches=2, **{"loss.target_normalization": "running"}), "target_normalization='tau'"),
    ],
)
def test_bad_microbatch_settings_are_clear_errors(overrides, message):
    c = tiny_config("/nonexistent", **overrides)
    with pytest.raises(ValueError, match=message):
        train.check_config(c)


def test_molspectra_rejects_microbatches():
    from experiments.configs import pretrain_molspectra
    from mspec.training import molspectra

    c = pretrain_molspectra.get_config("tiny")
    c.microbatches = 2
    # check() reads only the config; skip building the SpecFormer for it.
    trainer = molspectra.MolSpectraTrainer.__new__(molspectra.MolSpectraTrainer)
    trainer.config = c
    with pytest.raises(ValueError, match="denoising pre-training only"):
        trainer.check()


@pytest.mark.parametrize(
    "batch_size, devices, platform, expected",
    [
        (128, 1, "cpu", 4),  # 32 molecules per sub-batch
        (70, 1, "cpu", 3),  # the Frad config: sub-batches of ~24
        (32, 1, "cpu", 1),
        (16, 1, "cpu", 1),
        (128, 4, "cpu", 1),  # 32 per device already
        (256, 4, "cpu", 2),
        (128, 1, "gpu", 1),
        (4096, 8, "tpu", 1),
    ],
)
def test_auto_microbatches(batch_size, devices, platform, expected):
    k = train.auto_microbatches(batch_size, devices, platform)
    assert k == expected
    assert math.ceil(math.ceil(batch_size / devices) / k) <= train.AUTO_CPU_SUBBATCH_MOLECULES or platform != "cpu"


def test_automatic_microbatches_resolve_from_the_config():
    from experiments.configs import pretrain_frad, pretrain_molspectra

    c = pretrain_frad.get_config()
    assert c.microbatches == 0  # automatic is the default for denoising pre-training
    expected = train.auto_microbatches(c.batch_size, jax.device_count(), jax.devices()[0].platform)
    assert train.microbatches(c) == expected
    c.loss.target_normalization = "running"  # needs whole batches
    assert train.microbatches(c) == 1
    assert pretrain_molspectra.get_config().microbatches == 1  # contrastive loss: whole batches


def test_automatic_microbatches_in_a_training_run(qm9_sample_dir, tmp_path):
    # 36 molecules per device: on CPU, two sub-batches of <= 32 (18 each).
    batch_size = 36 * jax.device_count()
    c = tiny_config(qm9_sample_dir, microbatches=0, batch_size=batch_size, stop_after_step=1,
                    log_every=1, eval_every=1000, checkpoint_every=1000)
    summary = loop.train_and_evaluate(c, str(tmp_path))
    assert summary["final_step"] == 1 and summary["compilations"] == 1
    assert summary["microbatches"] == 2
    assert all(math.isfinite(v) for v in _losses(tmp_path).values())
