"""Checkpoints: a thin wrapper around orbax ``CheckpointManager``.

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
