"""Initialising a fine-tuning model from a pre-training checkpoint (stage 1 or stage 2).

Only the parameter subtrees named explicitly are copied (e.g. ``("representation",
"noise_head")``); everything else keeps its fresh initialisation, and checkpoint subtrees that the
fine-tuning model has no use for (e.g. a stage-2 ``specformer``) are ignored. Unlike the official
``load_model``, which silently skips tensors whose shapes differ, any structural or shape
difference in a requested subtree is an error. A summary of what was restored, what is fresh and
what was ignored is printed.

Checkpoints are those of :class:`mspec.training.checkpoint.Checkpointer`: ``<dir>/<step>/state``
with the model parameters under ``state["params"]`` (or under ``state["params"][prefix...]`` for a
checkpoint whose model nests the encoder, e.g. ``prefix="encoder"``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from mspec.training import checkpoint


class RestoreError(ValueError):
    """The checkpoint cannot initialise the requested subtrees."""


@dataclasses.dataclass
class RestoreReport:
    checkpoint: str
    step: int
    restored: dict[str, int]  # subtree -> number of parameters
    fresh: dict[str, int]
    ignored: list[str]

    def summary(self) -> str:
        def fmt(d):
            return ", ".join(f"{k} ({v:,} params)" for k, v in d.items()) or "none"

        return (
            f"initialised from {self.checkpoint} (step {self.step}):\n"
            f"  restored: {fmt(self.restored)}\n"
            f"  fresh:    {fmt(self.fresh)}\n"
            f"  ignored checkpoint subtrees: {', '.join(self.ignored) or 'none'}"
        )


def _size(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
    """``(step directory, step)`` for a workdir, its ``checkpoints`` dir or a step directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "state")):
        return path, int(os.path.basename(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if not os.path.isdir(path):
        raise RestoreError(f"checkpoint directory {path} does not exist")
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit() and
                   os.path.isdir(os.path.join(path, d, "state")))
    if not steps:
        raise RestoreError(f"no finished checkpoint (<step>/state) in {path}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RestoreError(f"step {step} not in {path}; available: {steps}")
    return os.path.join(path, str(step)), step


def _dict_key(key: str) -> str:
    """A leaf's key path as it reads when every node is a dict or list: the state comes back
    from the checkpoint's metadata without its named tuples (optax states), so an attribute
    ``.count`` is written ``['count']`` on both sides of the comparison."""
    return re.sub(r"\.([A-Za-z_]\w*)", r"['\1']", key)


def load_state(step_dir: str) -> dict:
    """The whole train state stored in a checkpoint step directory, as host numpy arrays,
    verified against the CRC32 of every array that :class:`mspec.training.checkpoint.Checkpointer`
    stores beside it.

    Readable whatever devices wrote it (e.g. trained on 8 GPUs, read on a laptop): the arrays
    are restored onto this process's first local device, with a target built from the
    checkpoint's own metadata (without one, orbax refuses another device topology).

    Raises:
        RestoreError: the directory cannot be read.
        mspec.training.checkpoint.CheckpointError: an array does not match its checksum.
    """
    path = os.path.join(step_dir, "state")
    try:
        reader = ocp.StandardCheckpointer()
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # "no _CHECKPOINT_METADATA" in the item directory
        try:
            meta = reader.metadata(path).item_metadata
        finally:
            absl_logger.setLevel(level)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        state = jax.tree.map(np.asarray, reader.restore(path, target))
    except Exception as e:  # noqa: BLE001  (orbax raises many types on a bad directory)
        raise RestoreError(f"cannot read checkpoint {step_dir}: {e}") from e
    sums = os.path.join(step_dir, "checksum", "metadata")  # orbax's JSON item file
    if not os.path.isfile(sums):
        print(f"checkpoint {step_dir} has no checksums (written by an older version or converted "
              "without them): read without verification", file=sys.stderr, flush=True)
        return state
    with open(sums) as f:
        stored = {_dict_key(k): v for k, v in json.load(f).get("leaves", {}).items()}
    actual = {_dict_key(k): v for k, v in checkpoint.state_checksums(state).items()}
    bad = sorted(k for k in set(stored) | set(actual) if stored.get(k) != actual.get(k))
    if bad:
        raise checkpoint.CheckpointError(
            f"{path}: checksum mismatch in {len(bad)} array(s), e.g. {bad[0]} (the data files "
            "are damaged)")
    return state


def load_params(step_dir: str, prefix: str = "") -> dict:
    """The parameter tree stored in a checkpoint (host numpy arrays), below ``prefix``."""
    state = load_state(step_dir)
    if "params" not in state:
        raise RestoreError(f"checkpoint {step_dir} has no 'params' (keys: {sorted(state)})")
    params = state["params"]
    for part in [p for p in prefix.split("/") if p]:
        if part not in params:
            raise RestoreError(
                f"checkpoint {step_dir}: no params subtree {part!r} (prefix {prefix!r}); "
                f"available: {sorted(params)}"
            )
        params = params[part]
    return jax.tree.map(np.asarray, params)


def load_normalizer(step_dir: str) -> tuple:
    """The running denoising-target statistics of a pre-training checkpoint (host arrays)."""
    state = load_state(step_dir)
    if "normalizer" not in state:
        raise RestoreError(f"checkpoint {step_dir} has no denoising normaliser state")
    return tuple(np.asarray(x) for x in state["normalizer"])


def _check_same(name: str, fresh, loaded) -> None:
    f_paths = dict(jax.tree_util.tree_flatten_with_path(fresh)[0])
    l_paths = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    if set(f_paths) != set(l_paths):
        only_f = sorted(jax.tree_util.keystr(k) for k in set(f_paths) - set(l_paths))
        only_l = sorted(jax.tree_util.keystr(k) for k in set(l_paths) - set(f_paths))
        raise RestoreError(
            f"subtree {name!r} differs in structure: only in the model {only_f[:5]}, only in the "
            f"checkpoint {only_l[:5]} (was the checkpoint written with another model config?)"
        )
    for k, v in f_paths.items():
        if tuple(v.shape) != tuple(l_paths[k].shape):
            raise RestoreError(
                f"shape mismatch in {name}{jax.tree_util.keystr(k)}: model {tuple(v.shape)}, "
                f"checkpoint {tuple(l_paths[k].shape)}"
            )


def restore_subtrees(
    params: dict, path: str, subtrees: Sequence[str], step: int | None = None, prefix: str = ""
) -> tuple[dict, RestoreReport]:
    """Copies ``subtrees`` of a checkpoint's parameters into ``params`` (a fresh model's).

    Args:
      params: the new model's freshly initialised parameters (top-level subtrees such
        as ``representation``, ``scalar_head``, ``noise_head``).
      path: a pre-training workdir, its ``checkpoints`` directory or one step directory.
      subtrees: top-level names to restore; each must exist in both trees with equal shapes.
      step: checkpoint step (default: the latest).
      prefix: ``/``-separated path inside the checkpoint's params to the model's params.

    Returns:
      ``(new params, report)``. Restored leaves keep the fresh leaves' dtypes (bit-identical for
      equal dtypes) and shardings.

    Raises:
      RestoreError: missing checkpoint or subtree, structure or shape mismatch.
    """
    step_dir, step = find_checkpoint(path, step)
    loaded = load_params(step_dir, prefix)
    new = dict(params)
    restored = {}
    for name in subtrees:
        if name not in params:
            raise RestoreError(f"the model has no parameter subtree {name!r}; it has {sorted(params)}")
        if name not in loaded:
            raise RestoreError(
                f"checkpoint {step_dir} has no params subtree {name!r}; available: {sorted(loaded)}"
            )
        _check_same(name, params[name], loaded[name])
        new[name] = jax.tree.map(
            lambda f, l: jax.device_put(np.asarray(l, dtype=f.dtype), f.sharding)
            if isinstance(f, jax.Array) else np.asarray(l, dtype=f.dtype),
            params[name], loaded[name],
        )
        restored[name] = _size(loaded[name])
    fresh = {k: _size(v) for k, v in params.items() if k not in restored}
    ignored = sorted(k for k in loaded if k not in restored)
    return new, RestoreReport(step_dir, step, restored, fresh, ignored)
