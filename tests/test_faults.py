"""Fault injection on the training state (docs/reliability.md): kills at chosen moments (mid-step,
inside a checkpoint save, between the best and the periodic fine-tuning checkpoint, a SIGTERM)
followed by a resume that reproduces the uninterrupted run's metrics bitwise; divergence at a
checkpoint step that is not a log step; a save failing on a read-only directory; a torn metrics
line; damaged checkpoints; a resumed config that changes what is trained; config values checked
before any work. Dataset faults are in tests/test_faults_datasets.py.

Subprocess runs go through tests/fault_worker.py, which patches one moment of the real entry
point to send the signal.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from experiments.configs import finetune_qm9, pretrain_coord, pretrain_frad
from mspec import models
from mspec.training import checkpoint, finetune, loop, metrics, run_config, stopping, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small, fast pre-training run: log every step, checkpoint every 3.
TINY = {
    "model.hidden": 32, "model.num_layers": 1, "batch_size": 8, "data.eval_max_molecules": 16,
    "total_steps": 100, "log_every": 1, "checkpoint_every": 3, "eval_every": 1000,
    "keep_checkpoints": 5,
}


def _apply(c, data_dir, overrides):
    c.data.data_dir = data_dir
    c.update_from_flattened_dict(overrides)
    return c


def tiny_pretrain(data_dir, module=pretrain_frad, **overrides):
    return _apply(module.get_config("tiny"), data_dir, {**TINY, **overrides})


def _flags(data_dir, overrides):
    return [f"--config.data.data_dir={data_dir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]


def run_with_fault(fault, module, config_path, workdir, data_dir, overrides):
    """Runs ``module`` in a subprocess with ``fault`` (tests/fault_worker.py); returns it done."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(jax.device_count()))
    args = [sys.executable, "-m", "tests.fault_worker", fault, module, "--config", config_path,
            "--workdir", workdir, "--checkpoint_every_minutes=0", *_flags(data_dir, overrides)]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def records(workdir) -> list[dict]:
    return metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def by_step(workdir, key) -> dict[int, float]:
    rows = [r for r in records(workdir) if key in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"{key} recorded twice for a step: {steps}"
    return {r["step"]: r[key] for r in rows}


def tensorboard_steps(workdir, tag) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(os.path.join(workdir, "tensorboard"))
    ea.Reload()
    return [e.step for e in ea.Scalars(tag)]


@pytest.fixture(scope="module")
def pretrain_reference(qm9_sample_dir, tmp_path_factory):
    """The uninterrupted run the interrupted ones must reproduce: 9 steps, validation at 9."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    loop.train_and_evaluate(tiny_pretrain(qm9_sample_dir, stop_after_step=9), workdir)
    return workdir


# --------------------------------------------------------------------------------------------------
# Kills and signals, then an exact resume
# --------------------------------------------------------------------------------------------------


def _patch_update(monkeypatch, after):
    """Each jitted update's result goes through ``after(new_step, (state, measurements))``."""
    post_init = train.Trainer.__post_init__

    def patched(self):
        post_init(self)
        update = self.update_fn

        def update_fn(state, batch):
            new_step = int(state["step"]) + 1  # read before the state is donated
            return after(new_step, update(state, batch))

        self.update_fn = update_fn

    monkeypatch.setattr(train.Trainer, "__post_init__", patched)


def _signal_during(monkeypatch, step, signum):
    """The update of ``step`` sends ``signum`` to this process while it computes."""

    def after(new_step, out):
        if new_step == step:
            os.kill(os.getpid(), signum)
        return out

    _patch_update(monkeypatch, after)


def _complete_steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_sigterm_then_kills_mid_step_and_inside_a_save_resume_bitwise(
    qm9_sample_dir, pretrain_reference, tmp_path, monkeypatch, capsys
):
    workdir = str(tmp_path / "run")
    # 1. A preemption notice during step 2 (not a checkpoint step): checkpoint 2, then stop.
    with monkeypatch.context() as m:
        _signal_during(m, 2, signal.SIGTERM)
        with pytest.raises(stopping.Stopped) as e:
            loop.train_and_evaluate(tiny_pretrain(qm9_sample_dir, stop_after_step=9), workdir)
    assert e.value.exit_code == 128 + signal.SIGTERM and e.value.step == 2
    assert "no checkpoint yet" in capsys.readouterr().err
    assert _complete_steps(workdir) == [2]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored

    def run(fault):
        latest = _complete_steps(workdir)[-1]
        p = run_with_fault(fault, "experiments.pretrain", "experiments/configs/pretrain_frad.py:tiny",
                           workdir, qm9_sample_dir, TINY | {"stop_after_step": 9})
        assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
        assert f"resumed from step {latest}" in p.stderr, p.stderr[-3000:]

    # 2. SIGKILL while step 5 computes. 3. SIGKILL inside the save of step 6, between writing
    # its files and the rename that completes it (orbax finishes saves in the background, so
    # this may come during a later step).
    run("kill_mid_step@5")
    run("kill_in_save@6")
    assert "6.orbax-checkpoint-tmp" in os.listdir(os.path.join(workdir, "checkpoints"))
    latest = _complete_steps(workdir)[-1]
    # 4. The last resume finishes; every step's record equals the uninterrupted run's.
    summary = loop.train_and_evaluate(tiny_pretrain(qm9_sample_dir, stop_after_step=9), workdir)
    assert summary["start_step"] == latest < 6
    for key in ("train/loss", "train/grad_norm", "train/param_norm"):
        ref, got = by_step(pretrain_reference, key), by_step(workdir, key)
        assert sorted(got) == list(range(1, 10)) and got == ref, key
    assert by_step(workdir, "eval/denoising_mse") == by_step(pretrain_reference, "eval/denoising_mse")
    assert tensorboard_steps(workdir, "train/loss") == list(range(1, 10))


def test_finetuning_kill_between_the_best_and_the_periodic_checkpoint(qm9_sample_dir, tmp_path):
    """best/4 is written, the process dies before checkpoints/4: the re-run replays steps 3-4,
    keeps best/4 (no StepAlreadyExistsError) and reproduces the uninterrupted run bitwise."""
    flags = {
        "model.hidden": 32, "model.num_layers": 1, "batch_size": 8, "data.train_split": "train[:200]",
        "data.eval_max_molecules": 16, "total_steps": 100, "stop_after_step": 6, "log_every": 1,
        "eval_every": 4, "checkpoint_every": 2,
    }
    ref, workdir = str(tmp_path / "ref"), str(tmp_path / "run")
    config = lambda: _apply(finetune_qm9.get_config("tiny"), qm9_sample_dir, flags)  # noqa: E731
    loop.train_and_evaluate(config(), ref)
    p = run_with_fault("kill_before_save@4", "experiments.finetune",
                       "experiments/configs/finetune_qm9.py:tiny", workdir, qm9_sample_dir, flags)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert os.listdir(os.path.join(workdir, "best")) == ["4"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    summary = loop.train_and_evaluate(config(), workdir)
    assert summary["start_step"] == 2 and summary["final_step"] == 6
    for key in ("train/loss", "eval/metric"):
        assert by_step(workdir, key) == by_step(ref, key), key


# --------------------------------------------------------------------------------------------------
# Divergence, failing saves, torn metrics, damaged checkpoints
# --------------------------------------------------------------------------------------------------


def _nan_after(monkeypatch, step):
    """The updates from ``step`` on return NaN parameters (a divergence)."""

    def after(new_step, out):
        state, m = out
        if new_step >= step:
            state = {**state, "params": jax.tree.map(lambda p: p * float("nan"), state["params"])}
        return state, m

    _patch_update(monkeypatch, after)


def test_a_diverged_state_is_never_saved_and_the_message_names_the_real_checkpoint(
    qm9_sample_dir, tmp_path, monkeypatch
):
    # Checkpoints every 3 steps, logs every 4: NaN from step 5 reaches the step-6 save first.
    _nan_after(monkeypatch, 5)
    c = tiny_pretrain(qm9_sample_dir, log_every=4, checkpoint_every=3, keep_checkpoints=1, stop_after_step=12)
    with pytest.raises(FloatingPointError) as e:
        loop.train_and_evaluate(c, str(tmp_path))
    msg = str(e.value)
    assert "non-finite values in the train state at step 6" in msg and "not saved" in msg, msg
    assert f"the latest complete checkpoint is step 3 ({tmp_path}/checkpoints/3)" in msg, msg
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]  # keep-1 kept the good one


def test_a_failing_background_save_stops_the_run_at_once_with_one_line(
    qm9_sample_dir, tmp_path, monkeypatch
):
    import errno

    from orbax.checkpoint._src.path import async_path

    async def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(async_path, "rename", read_only)
    c = tiny_pretrain(qm9_sample_dir, checkpoint_every=3, stop_after_step=12)
    with pytest.raises(checkpoint.CheckpointError) as e:
        loop.train_and_evaluate(c, str(tmp_path / "run"))
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint step 3 could not be written" in msg, msg
    assert "Read-only file system" in msg and "no checkpoint has been written" in msg, msg
    # The per-step poll reports the failure by itself, without waiting for another save.
    ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
    ck.save(1, {"a": jax.numpy.ones(3)}, {}, {})
    deadline = time.time() + 30
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint step 1 could not be written"):
        while time.time() < deadline:
            ck.poll()
            time.sleep(0.01)
    ck.close(quiet=True)


def test_a_torn_metrics_line_and_repeated_steps_are_repaired_on_resume(
    qm9_sample_dir, pretrain_reference, tmp_path
):
    workdir = str(tmp_path)
    loop.train_and_evaluate(tiny_pretrain(qm9_sample_dir, stop_after_step=6), workdir)
    # As if the step-6 save had not completed and the run had gone on to step 7 and died writing
    # step 8's line on a full disk: records 4-7 (in metrics.jsonl and TensorBoard) that the
    # resumed run repeats, then a torn line.
    import shutil

    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"step": 7, "train/loss": 123.0}) + "\n" + '{"step": 8, "train/lo')
    summary = loop.train_and_evaluate(tiny_pretrain(qm9_sample_dir, stop_after_step=9), workdir)
    assert summary["start_step"] == 3
    assert by_step(workdir, "train/loss") == by_step(pretrain_reference, "train/loss")
    assert tensorboard_steps(workdir, "train/loss") == list(range(1, 10))
    # A damaged line that is not the last one is named, with its line number.
    with open(path, "a") as f:
        f.write("garbage\n{}\n")
    with pytest.raises(metrics.MetricsFileError, match=r"metrics.jsonl line \d+: not a metrics record"):
        metrics.read_jsonl(path)


def _damage_data_files(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            if os.sep + "d" in root:  # the array data files
                path = os.path.join(root, name)
                data = bytearray(open(path, "rb").read())
                data[len(data) // 2] ^= 0x10
                open(path, "wb").write(bytes(data))


def test_damaged_latest_checkpoints_fall_back_to_the_newest_intact_one(
    qm9_sample_dir, pretrain_reference, tmp_path, capsys
):
    workdir = str(tmp_path)
    loop.train_and_evaluate(tiny_pretrain(qm9_sample_dir, stop_after_step=9), workdir)
    ck = os.path.join(workdir, "checkpoints")
    with open(os.path.join(ck, "9", "config", "metadata"), "w") as f:
        f.write('{"seed": 1, "mod')  # garbled metadata
    _damage_data_files(os.path.join(ck, "6"))  # bit flips in the array data
    capsys.readouterr()
    summary = loop.train_and_evaluate(tiny_pretrain(qm9_sample_dir, stop_after_step=9), workdir)
    err = capsys.readouterr().err
    assert summary["start_step"] == 3
    assert f"checkpoint step 9 is damaged ({ck}/9/config/metadata: JSONDecodeError" in err, err
    assert f"checkpoint step 6 is damaged ({ck}/6/state" in err, err
    assert sorted(os.listdir(ck + ".corrupt")) == ["6", "9"]  # kept for inspection
    assert by_step(workdir, "train/loss") == by_step(pretrain_reference, "train/loss")


def test_checksums_detect_changed_array_values(qm9_sample_dir, tmp_path):
    """A change the storage format cannot see (here: the stored checksum of one array no longer
    matches its data) is detected at restore and named."""
    loop.train_and_evaluate(tiny_pretrain(qm9_sample_dir, stop_after_step=3), str(tmp_path))
    path = tmp_path / "checkpoints" / "3" / "checksum" / "metadata"
    stored = json.loads(path.read_text())
    leaf = sorted(stored["leaves"])[0]
    stored["leaves"][leaf] = "%08x" % (int(stored["leaves"][leaf], 16) ^ 1)
    path.write_text(json.dumps(stored))
    c = tiny_pretrain(qm9_sample_dir, stop_after_step=3)
    mesh = train.make_mesh()
    from mspec import graph

    trainer = train.Trainer(c, models.get_model(c.model), mesh)
    budget = graph.Budget(n_node=97, n_edge=1800, n_graph=7, max_torsions=8)
    ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    abstract = checkpoint.abstract_like(trainer.init_state(jax.random.key(0), graph.pack([], budget)))
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3 is damaged: .*checksum mismatch in 1 array"):
        ck.restore(abstract)
    ck.close()


# --------------------------------------------------------------------------------------------------
# Config: changes on resume, values before any work
# --------------------------------------------------------------------------------------------------


def test_resuming_with_a_config_that_changes_what_is_trained_is_refused(qm9_sample_dir, tmp_path):
    workdir = str(tmp_path)
    loop.train_and_evaluate(tiny_pretrain(qm9_sample_dir, stop_after_step=3), workdir)
    coord = tiny_pretrain(qm9_sample_dir, module=pretrain_coord, stop_after_step=6)
    with pytest.raises(run_config.ConfigError) as e:
        loop.train_and_evaluate(coord, workdir)
    msg = str(e.value)
    assert "refusing to resume" in msg and "noise.type ('frad' -> 'coord')" in msg, msg
    assert "--allow_config_change=noise.type" in msg
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["noise"]["type"] == "frad"  # not relabelled
    bigger = tiny_pretrain(qm9_sample_dir, **{"model.hidden": 64})
    with pytest.raises(run_config.ConfigError, match=r"different model config: model.hidden \(32 -> 64\); use a new --workdir"):
        loop.train_and_evaluate(bigger, workdir)
    # Safe keys differ freely; an explicit override continues and records the change.
    longer = tiny_pretrain(qm9_sample_dir, stop_after_step=4, total_steps=200, log_every=2)
    with pytest.raises(run_config.ConfigError, match=r"total_steps \(100 -> 200\)"):
        loop.train_and_evaluate(longer, workdir)
    assert loop.train_and_evaluate(longer, workdir, allow_config_change=("total_steps",))["final_step"] == 4
    change = json.loads((tmp_path / "config_changes.jsonl").read_text())
    assert change == {"step": 3, "changes": {"total_steps": [100, 200]}}


@pytest.mark.parametrize("key,value,message", [
    ("log_every", 0, "config.log_every must be an integer >= 1, got 0"),
    ("checkpoint_every", 0, "config.checkpoint_every must be an integer >= 1"),
    ("keep_checkpoints", 0, "config.keep_checkpoints must be an integer >= 1"),
    ("noise.tau", float("nan"), "config.noise.tau must be a finite number > 0"),
    ("noise.sigma_deg", -2.0, "config.noise.sigma_deg must be a finite number > 0"),
    ("optim.lr", -1e-4, "config.optim.lr must be a finite number > 0"),
])
def test_bad_config_values_fail_before_any_work_naming_the_key(tmp_path, key, value, message):
    c = tiny_pretrain(str(tmp_path / "no_data_here"), **{key: value})
    with pytest.raises(run_config.ConfigError, match=message.replace(".", r"\.")):
        loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    f = _apply(finetune_qm9.get_config("tiny"), str(tmp_path), {key: value})
    with pytest.raises(run_config.ConfigError, match=message.replace(".", r"\.")):
        finetune.check_config(f)


def test_stop_signals_are_turned_into_a_request_once():
    with stopping.StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.signum == signal.SIGTERM
        # The second one would act as usual: the handler is back to the default.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) != signals._handle


def test_evaluating_a_run_in_progress_leaves_its_unfinished_save_alone(tmp_path):
    """experiments.evaluate opens the run's checkpoint directories read-only: a writer's manager
    deletes unfinished save directories when it opens (in the background), which would destroy
    the save in progress (the running job's next save check then stops it)."""
    import numpy as np

    from mspec.training import checkpoint

    def run_dir(name: str) -> tuple[str, str]:
        directory = str(tmp_path / name / "checkpoints")
        writer = checkpoint.Checkpointer(directory, keep=2, async_save=False)
        writer.save(1, {"params": {"w": np.ones(3, np.float32)}}, {}, {})
        writer.close()
        in_progress = os.path.join(directory, "2.orbax-checkpoint-tmp")  # orbax's naming
        os.makedirs(os.path.join(in_progress, "state"))
        return directory, in_progress

    # What the read-only mode prevents: a second writer's manager removes the unfinished save.
    directory, in_progress = run_dir("writer")
    start = time.monotonic()
    checkpoint.Checkpointer(directory, keep=1, async_save=False).close()
    while os.path.exists(in_progress) and time.monotonic() - start < 20:
        time.sleep(0.05)
    assert not os.path.exists(in_progress)
    latency = time.monotonic() - start

    directory, in_progress = run_dir("reader")
    reader = checkpoint.Checkpointer(directory, keep=1, async_save=False, read_only=True)
    assert reader.latest_step() == 1
    with pytest.raises(checkpoint.CheckpointError, match="opened read-only"):
        reader.save(3, {"params": {}}, {}, {})
    reader.close()
    time.sleep(max(1.0, 3 * latency))  # well past the time the writer took to remove it
    assert os.path.isdir(in_progress)
