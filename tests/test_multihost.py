"""Multi-process training on one machine: 2 processes x 2 fake CPU devices over gloo vs 1 x 4.

Every run is a subprocess started through ``launch.sh`` (``cpu`` mode for 2 processes, ``local``
for 1) with a timeout. Compilations go to a persistent JAX cache (``$MSPEC_TEST_JAX_CACHE``,
default ``$TMPDIR/mspec_test_jax_cache``), so re-runs skip most compile time.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from mspec.training import distributed, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.sh")
HEARTBEAT_S = 10  # MSPEC_HEARTBEAT_TIMEOUT of the test runs: how fast a dead peer is noticed
RUN_TIMEOUT_S = 400  # per launch; generous because the test machine is shared

TINY = [
    "--config", "experiments/configs/pretrain_frad.py:tiny",
    "--config.model.hidden=32", "--config.model.num_layers=1", "--config.batch_size=8",
    "--config.data.eval_max_molecules=16", "--config.log_every=1",
    "--config.checkpoint_every=2", "--config.eval_every=1000", "--config.keep_checkpoints=10",
]


def _env(devices: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        PYTHON=sys.executable,  # launch.sh runs the workers with the interpreter running the tests
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        # These runs are a few tiny steps, so compilation dominates: LLVM -O0 compiles faster
        # (launch.sh passes XLA_FLAGS on), and each comparison is between runs of the same flags.
        XLA_FLAGS="--xla_backend_optimization_level=0",
        MSPEC_HEARTBEAT_TIMEOUT=str(HEARTBEAT_S),
        MSPEC_SHUTDOWN_TIMEOUT="60",
        MSPEC_INIT_TIMEOUT="120",
        JAX_COMPILATION_CACHE_DIR=os.environ.get(
            "MSPEC_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "mspec_test_jax_cache")
        ),
    )
    if devices is not None:
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    for k in [k for k in env if k.startswith("MSPEC_") and k.endswith(("PROCESS_ID", "PROCESSES"))]:
        del env[k]
    return env


def _launch(*args: str, devices: int | None = None) -> subprocess.CompletedProcess:
    """Runs ``launch.sh ARGS`` to completion; fails the test with its output on a non-zero exit."""
    proc = subprocess.run(
        [LAUNCH, *args], cwd=REPO, env=_env(devices), capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-6000:] + proc.stdout[-2000:]
    return proc


def _one_process(*module_args: str) -> subprocess.CompletedProcess:
    return _launch("local", *module_args, devices=4)


def _two_processes(*module_args: str) -> subprocess.CompletedProcess:
    return _launch("cpu", "--processes", "2", "--devices-per-process", "2", *module_args)


def _train_losses(workdir) -> dict[int, float]:
    out = {}
    for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Numerical equivalence
# --------------------------------------------------------------------------------------------------


def test_two_processes_give_the_losses_and_gradients_of_one(qm9_sample_dir, tmp_path):
    """Same global batch (4 device slots) -> same loss and gradients, for the first 2 batches."""
    one, two = str(tmp_path / "one.npz"), str(tmp_path / "two.npz")
    worker = ["tests.multihost_worker", "--data_dir", qm9_sample_dir, "--batches", "2"]
    _one_process(*worker, "--out", one)
    _two_processes(*worker, "--out", two)
    ref, got = np.load(one), np.load(two)
    assert sorted(ref.files) == sorted(got.files)
    grad_keys = [k for k in ref.files if k.startswith("grad/")]
    assert len(grad_keys) > 10
    for b in (0, 1):
        assert float(got[f"loss/{b}"]) == pytest.approx(float(ref[f"loss/{b}"]), rel=1e-6)
    assert float(ref["loss/0"]) != float(ref["loss/1"])  # two different batches were compared
    nonzero = [k for k in grad_keys if np.abs(ref[k]).max() > 0]
    assert len(nonzero) > len(grad_keys) // 2  # the comparison below is not vacuous
    for k in grad_keys:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_fine_tuning_in_two_processes_is_the_run_of_one(qm9_sample_dir, tmp_path):
    """The same loop and per-slot data streams as pre-training: QM9 fine-tuning with 2 processes
    x 2 devices trains on the same global batches as 1 x 4 (same losses), selects the same best
    checkpoint and evaluates the same test MAE (predictions gathered from both processes)."""
    runs = {}
    for name, launch in (("one", _one_process), ("two", _two_processes)):
        runs[name] = str(tmp_path / name)
        launch(
            "experiments.finetune", "--config", "experiments/configs/finetune_qm9.py:tiny",
            f"--config.data.data_dir={qm9_sample_dir}", "--config.model.hidden=32",
            "--config.model.num_layers=1", "--config.batch_size=8", "--config.total_steps=4",
            "--config.optim.warmup_steps=1", "--config.log_every=1", "--config.eval_every=2",
            "--config.checkpoint_every=2", "--config.data.eval_max_molecules=24",
            "--workdir", runs[name],
        )
    one, two = _train_losses(runs["one"]), _train_losses(runs["two"])
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    results = {}
    for name, workdir in runs.items():
        with open(os.path.join(workdir, "results.json")) as f:
            results[name] = json.load(f)
    for which in ("last", "best"):
        assert results["two"][which]["step"] == results["one"][which]["step"]
        for role in ("validation", "test"):
            a, b = results["one"][which][role], results["two"][which][role]
            assert b["n"] == a["n"] > 0 and b["mae"] == pytest.approx(a["mae"], rel=1e-5), (which, role)


# --------------------------------------------------------------------------------------------------
# Checkpoints across process counts, and a killed process
# --------------------------------------------------------------------------------------------------


def test_checkpoints_move_between_process_counts_and_survive_a_killed_process(
    qm9_sample_dir, tmp_path
):
    data = f"--config.data.data_dir={qm9_sample_dir}"
    ref, killed, from_one = (str(tmp_path / d) for d in ("ref", "killed", "from_one"))

    # Reference: 1 process x 4 devices, 8 uninterrupted steps.
    _one_process("experiments.pretrain", *TINY, data, "--config.stop_after_step=8", "--workdir", ref)
    ref_losses = _train_losses(ref)
    assert sorted(ref_losses) == list(range(1, 9))

    # 2 processes x 2 devices; SIGKILL process 1 right after the step-2 checkpoint is complete.
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [LAUNCH, "cpu", "--processes", "2", "--devices-per-process", "2",
             "experiments.pretrain", *TINY, data, "--config.stop_after_step=40",
             "--workdir", killed],
            cwd=REPO, env=_env(), stdout=log_file, stderr=subprocess.STDOUT, text=True,
        )
    try:
        deadline = time.time() + RUN_TIMEOUT_S
        while not os.path.isdir(os.path.join(killed, "checkpoints", "2")):
            assert proc.poll() is None, log_path.read_text()[-6000:]
            assert time.time() < deadline, "no step-2 checkpoint:\n" + log_path.read_text()[-6000:]
            time.sleep(0.05)
        pid1 = re.search(r"\[launch\] process 1 pid (\d+)", log_path.read_text())
        assert pid1, log_path.read_text()
        os.kill(int(pid1.group(1)), signal.SIGKILL)
        # The survivor must stop by itself within the heartbeat timeout (plus slack for a busy
        # machine); the launcher would kill it only after HEARTBEAT_S + 30 s, and says so.
        proc.wait(timeout=HEARTBEAT_S + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert proc.returncode != 0, log[-4000:]
    assert "[launch] process 1 exited with code -9" in log or "code 137" in log, log[-4000:]
    m = re.search(r"\[launch\] process 0 exited with code (\d+)", log)
    assert m and m.group(1) != "0", log[-4000:]
    assert "still running after" not in log, log[-4000:]  # it stopped by itself
    # How the survivor learns of it depends on timing: the distributed service's heartbeat, or,
    # when the peer dies during a collective (the per-step stop-signal check), that collective.
    assert ("JAX distributed service detected fatal errors" in log
            or re.search(r"Gloo \w+ failed: .*Connection (closed|reset) by peer", log)), log[-4000:]

    # The completed checkpoints are intact; the first steps matched the 1-process run.
    steps = sorted(int(s) for s in os.listdir(os.path.join(killed, "checkpoints")) if s.isdigit())
    assert steps and steps[0] == 2 and steps[-1] <= 6, steps
    two_losses = _train_losses(killed)
    for step in (1, 2):
        assert two_losses[step] == pytest.approx(ref_losses[step], rel=1e-6)

    # 2 processes -> 1 process: resume the killed run and continue for 2 steps.
    last = steps[-1]
    out = _one_process(
        "experiments.pretrain", *TINY, data, f"--config.stop_after_step={last + 2}",
        "--workdir", killed,
    )
    assert f"resumed from step {last}" in out.stderr, out.stderr[-3000:]
    resumed = _train_losses(killed)
    for step in (last + 1, last + 2):
        assert resumed[step] == pytest.approx(ref_losses[step], rel=1e-5), step

    # 1 process -> 2 processes: the reference run's step-2 checkpoint, continued for 2 steps.
    os.makedirs(os.path.join(from_one, "checkpoints"))
    shutil.copytree(os.path.join(ref, "checkpoints", "2"), os.path.join(from_one, "checkpoints", "2"))
    out = _two_processes(
        "experiments.pretrain", *TINY, data, "--config.stop_after_step=4", "--workdir", from_one
    )
    assert "resumed from step 2" in out.stderr, out.stderr[-3000:]
    continued = _train_losses(from_one)
    assert sorted(continued) == [3, 4]
    for step in (3, 4):
        assert continued[step] == pytest.approx(ref_losses[step], rel=1e-5), step


# --------------------------------------------------------------------------------------------------
# Failures before and during training
# --------------------------------------------------------------------------------------------------


def _join(process_id: int, port: int) -> subprocess.Popen:
    env = _env()
    env.update(
        MSPEC_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        MSPEC_NUM_PROCESSES="2",
        MSPEC_PROCESS_ID=str(process_id),
        MSPEC_INIT_TIMEOUT="5",
    )
    code = "from mspec.training import distributed; distributed.initialize()"
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )


def test_unreachable_coordinator_or_missing_peer_is_a_clear_error():
    # Process 1 with nobody listening at the coordinator address; process 0 with no peer.
    waiting_for_coordinator, waiting_for_peer = _join(1, _free_port()), _join(0, _free_port())
    _, err1 = waiting_for_coordinator.communicate(timeout=120)
    _, err0 = waiting_for_peer.communicate(timeout=120)
    assert waiting_for_coordinator.returncode == distributed.EXIT_PEER_FAILURE, err1[-2000:]
    assert "cannot reach the coordinator at 127.0.0.1:" in err1, err1[-2000:]
    assert waiting_for_peer.returncode == distributed.EXIT_PEER_FAILURE, err0[-2000:]
    assert "not all 2 processes joined the coordinator" in err0, err0[-2000:]


def test_an_exception_in_one_process_stops_the_other_with_its_message(qm9_sample_dir, tmp_path):
    proc = subprocess.run(
        [LAUNCH, "cpu", "--processes", "2", "tests.multihost_worker", "--data_dir",
         qm9_sample_dir, "--out", str(tmp_path / "x.npz"), "--fail_on_process", "1"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    log = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert "[p1] ValueError: deliberate failure in process 1" in log, log[-4000:]
    assert "[p0] mspec: process 1 failed: ValueError: deliberate failure" in log, log[-4000:]
    assert f"[launch] process 0 exited with code {distributed.EXIT_PEER_FAILURE}" in log, log[-4000:]
    assert "still running after" not in log
    assert not os.path.exists(tmp_path / "x.npz")


# --------------------------------------------------------------------------------------------------
# Configuration and launcher
# --------------------------------------------------------------------------------------------------


def test_settings_from_the_environment():
    s = distributed.Settings.from_env(
        {"MSPEC_COORDINATOR_ADDRESS": "10.0.0.1:1234", "MSPEC_NUM_PROCESSES": "4",
         "MSPEC_PROCESS_ID": "3", "MSPEC_HEARTBEAT_TIMEOUT": "15"}
    )
    s.validate()
    assert (s.mode, s.explicit, s.num_processes, s.process_id) == ("auto", True, 4, 3)
    assert (s.heartbeat_timeout, s.init_timeout) == (15, 300)
    assert distributed.Settings.from_env({"JAX_COORDINATOR_ADDRESS": "h:1"}).coordinator_address == "h:1"
    assert not distributed.Settings.from_env({}).explicit
    bad = [
        ({"MSPEC_NUM_PROCESSES": "2"}, "incomplete"),
        ({"MSPEC_COORDINATOR_ADDRESS": "h:1", "MSPEC_NUM_PROCESSES": "2", "MSPEC_PROCESS_ID": "2"},
         "must be in"),
        ({"MSPEC_COORDINATOR_ADDRESS": "h", "MSPEC_NUM_PROCESSES": "2", "MSPEC_PROCESS_ID": "0"},
         "host:port"),
    ]
    for env, msg in bad:
        with pytest.raises(ValueError, match=msg):
            distributed.Settings.from_env(env).validate()
    with pytest.raises(ValueError, match="not an integer"):
        distributed.Settings.from_env({"MSPEC_PROCESS_ID": "one"})
    with pytest.raises(ValueError, match="MSPEC_DISTRIBUTED"):
        distributed.Settings.from_env({"MSPEC_DISTRIBUTED": "yes"})


def _dry_run(*args: str, env: dict | None = None) -> list[list[str]]:
    proc = subprocess.run(
        [LAUNCH, "--dry-run", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, **(env or {})),
    )
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def test_launch_dry_run_prints_the_commands_of_every_mode():
    module = ["experiments.pretrain", "--config", "experiments/configs/pretrain_frad.py",
              "--workdir", "/shared/runs/it's a test"]

    (cmd,) = _dry_run("local", *module)
    assert cmd[1:] == ["-m", *module]
    assert _dry_run(*module) == [cmd]  # the mode defaults to local

    cmds = _dry_run("cpu", "--processes", "3", "--devices-per-process", "2", "--port", "4321", *module)
    assert len(cmds) == 3
    for i, c in enumerate(cmds):
        assert c[0] == "env" and "-u" in c and "XLA_FLAGS" in c
        for assignment in ("JAX_PLATFORMS=cpu", "JAX_NUM_CPU_DEVICES=2", "MSPEC_NUM_PROCESSES=3",
                           "MSPEC_COORDINATOR_ADDRESS=127.0.0.1:4321", f"MSPEC_PROCESS_ID={i}"):
            assert assignment in c, (assignment, c)
        assert c[-len(module) - 1:] == ["-m", *module]
    # Other XLA flags reach the processes; one that forces a device count is dropped.
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    for c in _dry_run("cpu", "--processes", "2", *module, env=flags):
        assert "XLA_FLAGS=--xla_backend_optimization_level=0" in c, c
    for c in _dry_run("cpu", "--processes", "2", *module,
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}):
        assert not any(a.startswith("XLA_FLAGS=") for a in c), c

    (per_gpu,) = _dry_run("slurm", "--nodes", "2", "--gpus-per-node", "4", *module)
    assert per_gpu[:1] == ["srun"] and "--ntasks-per-node=4" in per_gpu and "--nodes=2" in per_gpu
    assert "MSPEC_DISTRIBUTED=on" in per_gpu and per_gpu[-len(module):] == module
    (per_node,) = _dry_run("slurm", "--per", "node", "--gpus-per-node", "4", *module)
    assert "--ntasks-per-node=1" in per_node and "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in per_node

    cmds = _dry_run("tpu", "--name", "pod", "--zone", "us-central2-b", "--project", "p", *module,
                    env={"MSPEC_HEARTBEAT_TIMEOUT": "30"})
    assert len(cmds) == 5  # pack, copy, unpack, install, run
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    for c in cmds[1:]:
        assert "--worker=all" in c and c[c.index("--zone") + 1] == "us-central2-b"
        assert c[c.index("--project") + 1] == "p"
    assert "pip install" in cmds[3][-1] and "jax[tpu]==0.10.2" in cmds[3][-1]
    remote = shlex.split(cmds[4][-1])
    assert remote[:3] == ["cd", "mspec", "&&"]
    assert "MSPEC_DISTRIBUTED=on" in remote and "MSPEC_HEARTBEAT_TIMEOUT=30" in remote
    assert remote[-len(module) - 2:] == [".venv/bin/python", "-m", *module]
    (only,) = _dry_run("tpu", "--name", "pod", "--zone", "z", "--no-sync", "--no-install",
                       "--worker", "0", *module)
    assert "--worker=0" in only and "--worker=all" not in only


def test_launch_takes_the_interpreter_from_PYTHON_and_refuses_one_without_the_project(tmp_path):
    module = ["experiments.pretrain", "--workdir", "w"]
    proc = subprocess.run([LAUNCH, "--dry-run", "local", *module], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert shlex.split(proc.stdout) == [sys.executable, "-m", *module]
    assert f"interpreter: {sys.executable} ($PYTHON)" in proc.stderr
    # An interpreter without jax (e.g. a virtualenv's project installed elsewhere) stops at once.
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    proc = subprocess.run([LAUNCH, "local", *module], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHON=str(fake)))
    assert proc.returncode == 2 and f"{fake} cannot import jax" in proc.stderr, proc.stderr


def test_launch_help_and_usage_errors():
    help_text = subprocess.run([LAUNCH, "--help"], capture_output=True, text=True).stdout
    for mode in ("local", "cpu", "tpu", "slurm", "--dry-run"):
        assert re.search(rf"^\s*{re.escape(mode)}\b", help_text, re.M), mode
    for args, msg in [
        (["tpu", "m"], "--name TPU_NAME is required"),
        (["cpu", "--processes", "0", "m"], "positive integer"),
        (["slurm", "--per", "socket", "m"], "--per must be gpu or node"),
        (["--bogus"], "unknown option"),
    ]:
        proc = subprocess.run([LAUNCH, "--dry-run", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and msg in proc.stderr, (args, proc.stderr)


# --------------------------------------------------------------------------------------------------
# The data rule (in-process): per-device-slot streams and their positions
# --------------------------------------------------------------------------------------------------


def _molecules(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = int(rng.integers(3, 10))
        out.append({
            "index": i,
            "atomic_numbers": rng.integers(1, 10, atoms).astype(np.int32),
            "positions": (rng.normal(size=(atoms, 3)) * 1.5).astype(np.float32),
        })
    return out


def _slot_iterator(source, slots, start=None, **kw):
    from mspec import graph
    from mspec.data import pipeline, sharding

    budget = graph.Budget(n_node=40, n_edge=800, n_graph=5, max_torsions=1)
    featurizer = pipeline.Featurizer(radius=3.0, max_z=20)
    kw = dict(dict(seed=3, shuffle=True, repeat=True), **kw)
    return sharding.SlotBatchIterator(
        source, featurizer, budget, slots=slots, num_slots=4, start=start, prefetch=1, **kw
    )


def _first_atoms(batch) -> list:
    return [row[mask].tolist() for row, mask in zip(batch["atomic_numbers"], batch["node_mask"])]


def test_the_global_batch_does_not_depend_on_the_process_layout():
    source = _molecules(60)
    whole = _slot_iterator(source, [0, 1, 2, 3])
    halves = [_slot_iterator(source, [0, 1]), _slot_iterator(source, [2, 3])]
    for _ in range(12):  # more than an epoch: the shuffle is re-drawn
        a = next(whole)
        parts = [next(h) for h in halves]
        for k in a:
            np.testing.assert_array_equal(a[k], np.concatenate([p[k] for p in parts]), err_msg=k)
    for it in (whole, *halves):
        it.close()


def test_a_finite_stream_delivers_every_molecule_once_then_pads():
    source = _molecules(23)
    it = _slot_iterator(source, [0, 1, 2, 3], shuffle=False, repeat=False, pad_forever=True)
    seen = []
    for _ in range(30):
        batch = next(it)
        if not batch["graph_mask"].any():
            break
        for row in range(4):
            n_node = batch["n_node"][row][batch["graph_mask"][row]]
            z = batch["atomic_numbers"][row][batch["node_mask"][row]]
            seen += [tuple(part) for part in np.split(z, np.cumsum(n_node)[:-1])]
    it.close()
    assert sorted(seen) == sorted(tuple(m["atomic_numbers"]) for m in source)


def test_resume_positions_exact_and_translated():
    from mspec.data import sharding

    source = _molecules(50)
    it = _slot_iterator(source, [0, 1, 2, 3])
    for _ in range(3):
        next(it)
    saved = sharding.global_state(it.state())
    expected = next(it)
    it.close()
    assert saved["num_slots"] == 4 and len(saved["positions"]) == 4
    # Exact resume, in any layout: slots [2, 3] of a 2-process run pick their own positions.
    starts = sharding.start_positions(saved, [2, 3], 4)
    assert starts == saved["positions"][2:]
    resumed = _slot_iterator(source, [2, 3], start=starts)
    got = next(resumed)
    resumed.close()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k][2:], err_msg=k)

    # Another device count: resume at the first stream position every old slot had consumed.
    old = {"num_slots": 3, "positions": [5, 4, 6]}
    consumed = {d + 3 * j for d, k in enumerate(old["positions"]) for j in range(k)}
    first_unseen = min(i for i in range(100) if i not in consumed)
    new = sharding.start_positions(old, [0, 1], 2)
    resumed_at = {s + 2 * j for s, k in zip([0, 1], new) for j in range(k)}
    assert resumed_at == set(range(first_unseen))
    assert sharding.start_positions({"next_index": 7}, [0, 1, 2, 3], 4) == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="no iterator position"):
        sharding.start_positions({}, [0], 1)


def test_local_slots_of_a_one_process_mesh():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mspec.data import sharding
    from mspec.training import train

    mesh = train.make_mesh()
    assert sharding.local_slots(NamedSharding(mesh, P("data")), 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="one batch row per device"):
        sharding.local_slots(NamedSharding(mesh, P()), 4)
    assert jax.process_count() == 1
