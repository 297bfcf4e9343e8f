"""Reading a checkpoint's state outside training (mspec.training.restore.load_state): any device
count, every array verified against its stored checksum."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mspec.training import checkpoint, restore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path) -> str:
    """A checkpoint written from a state replicated over the test session's 4 devices."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    state = {"params": {"representation": {"w": rng.normal(size=(8, 4)).astype(np.float32)},
                        "noise_head": {"b": rng.normal(size=(4,)).astype(np.float32)}},
             "step": np.int32(7)}
    on_mesh = jax.device_put(state, NamedSharding(mesh, P()))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1, async_save=False)
    ckpt.save(7, on_mesh, {"model": {}}, {})
    ckpt.close()
    np.save(tmp_path / "w.npy", state["params"]["representation"]["w"])
    return str(tmp_path / "checkpoints" / "7")


def test_a_multi_device_checkpoint_reads_on_one_device(tmp_path):
    assert len(jax.devices()) == 4
    step_dir = _write(tmp_path)
    code = (
        "import jax, numpy as np; from mspec.training import restore; "
        f"p = restore.load_params({step_dir!r}); "
        f"assert np.array_equal(p['representation']['w'], np.load({str(tmp_path / 'w.npy')!r})); "
        "print(len(jax.devices()), p['noise_head']['b'].shape)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "(4,)"]


def test_a_damaged_array_is_named(tmp_path):
    step_dir = _write(tmp_path)
    np.testing.assert_array_equal(restore.load_state(step_dir)["step"], 7)
    sums_path = os.path.join(step_dir, "checksum", "metadata")
    with open(sums_path) as f:
        sums = json.load(f)
    key = "['params']['noise_head']['b']"
    assert key in sums["leaves"]
    sums["leaves"][key] = "00000000"
    with open(sums_path, "w") as f:
        json.dump(sums, f)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"checksum mismatch in 1 array\(s\), e.g. \['params'\]\['noise_head'\]\['b'\]"):
        restore.load_params(step_dir)


def test_an_unreadable_directory_is_a_restore_error(tmp_path):
    os.makedirs(tmp_path / "3" / "state")
    with pytest.raises(restore.RestoreError, match="cannot read checkpoint"):
        restore.load_state(str(tmp_path / "3"))
