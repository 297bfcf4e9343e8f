"""Pre-training end to end: one compile, logs, checkpoints, exact resume after a kill,
data-parallel equality, overfitting one batch, the learning-rate schedule, config errors."""

import glob
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import pretrain_coord, pretrain_frad
from mspec import graph, models
from mspec.data import datasets, pipeline
from mspec.training import loop, metrics, schedules, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **overrides):
    c = pretrain_frad.get_config("tiny")
    c.data.data_dir = data_dir
    c.data.eval_max_molecules = 40
    c.total_steps = 200
    c.update_from_flattened_dict(overrides)
    return c


def test_tiny_pretraining_end_to_end(qm9_sample_dir, tmp_path):
    c = tiny_config(qm9_sample_dir, stop_after_step=6, log_every=3, eval_every=6, checkpoint_every=3)
    summary = loop.train_and_evaluate(c, str(tmp_path))
    assert summary["compilations"] == 1
    assert summary["final_step"] == 6
    assert math.isfinite(summary["eval/denoising_mse"])
    rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 6]
    assert all(0 < r["train/node_fill"] <= 1 for r in rows if "train/node_fill" in r)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [3, 6]
    assert "eval/denoising_mse" in ea.Tags()["scalars"]


def _losses_by_step(workdir):
    out = {}
    for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]  # later (resumed) entries override earlier ones
    return out


def test_exact_resume_after_kill(qm9_sample_dir, tmp_path):
    common = dict(log_every=1, checkpoint_every=4, eval_every=1000)
    ref_dir, killed_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    loop.train_and_evaluate(tiny_config(qm9_sample_dir, stop_after_step=8, **common), ref_dir)

    # Run the same job in a subprocess and SIGKILL it right after its step-4 checkpoint.
    args = [
        sys.executable, "-m", "experiments.pretrain",
        "--config", "experiments/configs/pretrain_frad.py:tiny", "--workdir", killed_dir,
        f"--config.data.data_dir={qm9_sample_dir}", "--config.data.eval_max_molecules=40",
        "--config.total_steps=200", "--config.stop_after_step=40",
        "--config.log_every=1", "--config.checkpoint_every=4", "--config.eval_every=1000",
    ]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(jax.device_count()), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while not os.path.isdir(os.path.join(killed_dir, "checkpoints", "4")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)

    summary = loop.train_and_evaluate(tiny_config(qm9_sample_dir, stop_after_step=8, **common), killed_dir)
    assert summary["start_step"] == 4
    ref, resumed = _losses_by_step(ref_dir), _losses_by_step(killed_dir)
    for step in range(5, 9):
        assert resumed[step] == ref[step], (step, resumed[step], ref[step])


def _device_batches(qm9_sample_dir, n_dev, budget):
    builder = datasets.get_builder("qm9/sample", qm9_sample_dir, build=False)
    source = datasets.open_split(builder, "train")
    feat = pipeline.Featurizer(radius=5.5, max_z=100)
    ds = pipeline.make_grain_dataset(source, feat, seed=0, shuffle=False, repeat=False)
    it = pipeline.PackedBatchIterator(ds, budget, num_devices=n_dev)
    batch = next(it)
    it.close()
    return batch


def test_data_parallel_equals_single_device(qm9_sample_dir):
    assert jax.device_count() == 4
    c = tiny_config(qm9_sample_dir)
    model = models.get_model(c.model)
    budget = graph.Budget(n_node=97, n_edge=1800, n_graph=7, max_torsions=8)
    batch = _device_batches(qm9_sample_dir, 4, budget)
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        trainer = train.Trainer(c, model, mesh)
        state = trainer.init_state(jax.random.key(0), graph.pack([], budget))
        gbatch = trainer.global_batch(batch)
        loss_and_grads = jax.jit(jax.value_and_grad(trainer._loss, has_aux=True))
        (loss, _), grads = loss_and_grads(
            state["params"], jax.random.key(5), gbatch, tuple(jnp.zeros(()) for _ in range(3))
        )
        results.append((float(loss), jax.device_get(grads)))
    (l4, g4), (l1, g1) = results
    assert l4 == pytest.approx(l1, rel=1e-6)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_loss_decreases_when_overfitting_one_batch(qm9_sample_dir):
    c = tiny_config(qm9_sample_dir)
    c.noise.type = "coord"
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    trainer = train.Trainer(c, models.get_model(c.model), mesh)
    budget = graph.Budget(n_node=97, n_edge=1800, n_graph=7, max_torsions=8)
    batch = trainer.global_batch(_device_batches(qm9_sample_dir, 1, budget))
    params = trainer.init_state(jax.random.key(0), graph.pack([], budget))["params"]
    tx = optax.adam(2e-3)
    opt = tx.init(params)
    stats = tuple(jnp.zeros(()) for _ in range(3))

    @jax.jit
    def step(params, opt):
        (loss, _), g = jax.value_and_grad(trainer._loss, has_aux=True)(
            params, jax.random.key(1), batch, stats  # same noise every step: a fixed target
        )
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for _ in range(60):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_frad_cosine_schedule_matches_the_official_formula():
    lr, w, t = 4e-4, 10_000, 400_000
    sched = schedules.frad_cosine_schedule(lr, w, t)
    denom = 1 + math.cos(math.pi * (w - 1) / t)
    expect = {
        0: lr / w,
        9_999: lr,
        10_000: lr * (1 + math.cos(math.pi * 10_000 / t)) / denom,
        200_000: lr * (1 + math.cos(math.pi * 0.5)) / denom,
        399_999: lr * (1 + math.cos(math.pi * 399_999 / t)) / denom,
    }
    for s, v in expect.items():
        assert float(sched(s)) == pytest.approx(v, rel=1e-5, abs=1e-12), s


def test_configs_build_and_reject_unknown_variants():
    for module in (pretrain_frad, pretrain_coord):
        for variant in (None, "tiny"):
            c = module.get_config(variant)
            train.check_config(c)
        with pytest.raises(ValueError, match="unknown variant"):
            module.get_config("huge")
    assert pretrain_coord.get_config().noise.type == "coord"
    assert pretrain_frad.get_config().noise.type == "frad"


def test_unknown_config_key_on_the_command_line_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain",
         "--config", "experiments/configs/pretrain_frad.py:tiny", "--workdir", str(tmp_path),
         "--config.optim.lrr=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "lrr" in proc.stderr and 'Did you mean "lr"' in proc.stderr
    assert not glob.glob(str(tmp_path / "checkpoints" / "*"))
