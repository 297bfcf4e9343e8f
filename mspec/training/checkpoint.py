"""Checkpoints: a thin wrapper around orbax ``CheckpointManager``, and partial restores across runs.

Each step directory holds the train state (``state``), the resolved config (``config``, JSON) and
the input-iterator position (``data``, JSON). Orbax writes ``<step>.orbax-checkpoint-tmp`` and
renames it when complete, so a crash or kill during a save leaves the previous checkpoint as the
latest one; leftovers are cleaned up by the next run.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Periodic, keep-N, asynchronous checkpoints in ``directory``."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, config: dict, data: dict) -> None:
        """Starts saving (asynchronously); returns once device arrays are copied to host."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config),
                data=ocp.args.JsonSave(data),
            ),
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict, dict]:
        """Restores ``(step, state, config, data)``; the state takes the layout of ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings), e.g. from
        :func:`abstract_like`. A shape or structure mismatch raises an error; nothing is silently
        re-initialised.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                config=ocp.args.JsonRestore(),
                data=ocp.args.JsonRestore(),
            ),
        )
        return step, restored["state"], restored["config"], restored["data"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding skeleton of ``tree`` for restoring into the same layout."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RestoreError(ValueError):
    """A checkpoint does not hold what a partial restore was asked for, or holds it in other shapes."""


def _open_readonly(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def restore_params_subtrees(
    directory: str,
    params: dict,
    subtrees: tuple[str, ...],
    step: int | None = None,
    with_normalizer: bool = False,
) -> tuple[dict, Any, int]:
    """Copies named top-level parameter subtrees from another run's checkpoint into ``params``.

    Used to start stage 2 from a stage-1 (Frad/Coord) checkpoint: only the listed subtrees (e.g.
    ``("representation", "noise_head")``) are taken; everything else in ``params`` keeps its
    fresh initialisation. Unlike the official ``load_model``, nothing is skipped silently: a
    missing subtree, a different tree structure or any shape/dtype mismatch raises
    :class:`RestoreError` naming the parameter.

    Args:
      directory: the ``checkpoints`` directory of the source run (or its workdir).
      params: the freshly initialised parameters (replicated ``jax.Array`` leaves).
      subtrees: top-level keys of ``params`` to overwrite.
      step: checkpoint step (default: the latest).
      with_normalizer: also return the source run's denoising normaliser state.

    Returns:
      ``(params, normalizer or None, step)``; restored leaves get the sharding of the fresh ones.
    """
    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    if not os.path.isdir(directory):
        raise RestoreError(f"init checkpoint directory {directory} does not exist")
    mgr = _open_readonly(directory)
    try:
        step = mgr.latest_step() if step is None else step
        if step is None or step not in mgr.all_steps():
            raise RestoreError(f"no checkpoint step {step} in {directory} (have {mgr.all_steps()})")
        meta = mgr.item_metadata(step)["state"]
        meta = getattr(meta, "tree", meta)
        if "params" not in meta:
            raise RestoreError(f"checkpoint {directory}/{step} has no 'params' in its state")
        for name in subtrees:
            if name not in params:
                raise RestoreError(f"subtree {name!r} is not a parameter of this model ({sorted(params)})")
            if name not in meta["params"]:
                raise RestoreError(
                    f"checkpoint {directory}/{step} has no parameter subtree {name!r} "
                    f"(it has {sorted(meta['params'])})"
                )
            want = jax.tree_util.tree_flatten_with_path(params[name])[0]
            have = jax.tree_util.tree_flatten_with_path(meta["params"][name])[0]
            want_d = {_path_str(p): v for p, v in want}
            have_d = {_path_str(p): v for p, v in have}
            if set(want_d) != set(have_d):
                raise RestoreError(
                    f"subtree {name!r} differs in structure: only in the model "
                    f"{sorted(set(want_d) - set(have_d))[:5]}, only in {directory}/{step} "
                    f"{sorted(set(have_d) - set(want_d))[:5]}"
                )
            for path, v in want_d.items():
                m = have_d[path]
                if tuple(m.shape) != tuple(v.shape) or jax.numpy.dtype(m.dtype) != v.dtype:
                    raise RestoreError(
                        f"parameter {name}/{path}: model {tuple(v.shape)} {v.dtype}, checkpoint "
                        f"{directory}/{step} {tuple(m.shape)} {m.dtype}; the model configs differ"
                    )
        # Restore the whole saved state onto one replicated layout, then pick the subtrees.
        replicated = jax.tree.leaves(params)[0].sharding
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated), meta
        )
        restored = mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
    finally:
        mgr.close()
    new_params = dict(params)
    for name in subtrees:
        new_params[name] = jax.tree.map(
            lambda fresh, old: jax.device_put(old, fresh.sharding), params[name], restored["params"][name]
        )
    normalizer = None
    if with_normalizer:
        if "normalizer" not in restored:
            raise RestoreError(f"checkpoint {directory}/{step} has no denoising normaliser state")
        normalizer = tuple(restored["normalizer"])
    return new_params, normalizer, step
