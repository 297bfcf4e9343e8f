"""Checkpoints: orbax ``CheckpointManager`` plus the guarantees of ``docs/reliability.md``.

Each step directory holds the train state (``state``), the resolved config (``config``, JSON),
the input-iterator position (``data``, JSON) and a CRC32 of every state array (``checksum``,
JSON). Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a crash or
kill during a save leaves the previous checkpoint as the latest one; leftovers are cleaned up by
the next run. On top of orbax:

* a background save that fails (read-only or full disk) is reported by :meth:`Checkpointer.poll`,
  called once per training step, as one :class:`CheckpointError` line naming the step and the
  directory, instead of at the next save;
* :meth:`Checkpointer.restore` reads the stored config first (so a config mismatch is reported
  before orbax sees a differently shaped state), verifies the checksums, and with
  ``fallback=True`` moves a corrupt latest checkpoint aside (to ``<directory>.corrupt/``) and
  resumes from the newest intact one, with a warning naming the step and the fault.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message is one line naming step and path."""


class _DropOrbaxTracebacks(logging.Filter):
    """Orbax logs every failed background save as ~1,000 lines of asyncio traceback; the same
    failure reaches the user as one :class:`CheckpointError` line, so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "/orbax/" in record.pathname)


_ORBAX_FILTER = _DropOrbaxTracebacks()


def _quiet_orbax() -> None:
    for name in ("absl", ""):
        logger = logging.getLogger(name)
        if _ORBAX_FILTER not in logger.filters:
            logger.addFilter(_ORBAX_FILTER)
        for handler in logger.handlers:
            if _ORBAX_FILTER not in handler.filters:
                handler.addFilter(_ORBAX_FILTER)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}"


def _host_leaf(x) -> np.ndarray:
    """The host value of one state leaf (replicated arrays: this process's copy)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.ascontiguousarray(np.asarray(x))


def state_checksums(state: Any) -> dict[str, str]:
    """``{leaf path: CRC32 hex}`` of every array of ``state`` (bitwise: dtype, shape, bytes)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        a = _host_leaf(leaf)
        crc = zlib.crc32(f"{a.dtype.str}{a.shape}".encode())
        out[jax.tree_util.keystr(path)] = f"{zlib.crc32(a.tobytes(), crc):08x}"
    return out


class Checkpointer:
    """Periodic, keep-N, asynchronous checkpoints in ``directory``."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """``read_only``: for readers of a directory that a running job may be writing
        (``experiments.evaluate`` on a run in progress): nothing is created, saved, moved or
        deleted. A writer's manager removes unfinished save directories when it opens, which
        would destroy the running job's save in progress."""
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep_checkpoints must be an integer >= 1, got {keep!r}")
        _quiet_orbax()
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        self._pending: int | None = None  # step of the save running in the background
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=not read_only,
                cleanup_tmp_directories=not read_only,
                enable_async_checkpointing=async_save and not read_only,
                read_only=read_only,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def describe_latest(self) -> str:
        """``"the latest complete checkpoint is step N (DIR/N)"`` or that there is none."""
        step = self.latest_step()
        if step is None:
            return f"no checkpoint has been written to {self.directory}"
        return f"the latest complete checkpoint is step {step} ({os.path.join(self.directory, str(step))})"

    def save(self, step: int, state: Any, config: dict, data: dict) -> None:
        """Starts saving (asynchronously); returns once device arrays are copied to host.

        Raises:
          CheckpointError: this or the previous save failed, or this is a read-only reader.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; cannot save step {step}")
        self.poll()
        self.wait()
        checksum = {"algorithm": "crc32", "leaves": state_checksums(state)}
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    config=ocp.args.JsonSave(config),
                    data=ocp.args.JsonSave(data),
                    checksum=ocp.args.JsonSave(checksum),
                ),
                force=True,
            )
        except Exception as e:  # noqa: BLE001  (orbax and the file system raise many types)
            raise CheckpointError(
                f"checkpoint step {step} could not be written to {self.directory}: "
                f"{_one_line(e)}; {self.describe_latest()}"
            ) from None
        self._pending = step

    def poll(self) -> None:
        """Raises :class:`CheckpointError` if a background save has failed (cheap when not)."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the background save is complete; raises :class:`CheckpointError` if it
        failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._manager.reload()
            raise CheckpointError(
                f"checkpoint step {step} could not be written to {self.directory}: "
                f"{_one_line(e)}; {self.describe_latest()}"
            ) from None
        if step is not None and step not in self._manager.all_steps():
            self._manager.reload()
            raise CheckpointError(
                f"checkpoint step {step} was not completed in {self.directory}; "
                f"{self.describe_latest()}"
            )

    # ---- restore --------------------------------------------------------------------------------

    def _read_json(self, step: int, item: str) -> dict:
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
            value = restored[item]
        except Exception as e:  # noqa: BLE001
            path = os.path.join(self.directory, str(step), item, "metadata")
            raise _Corrupt(f"{path}: {_one_line(e)}") from None
        if not isinstance(value, dict):
            raise _Corrupt(f"{os.path.join(self.directory, str(step), item)}: not a JSON object")
        return value

    def read_config(self, step: int | None = None) -> dict:
        """The config stored with a checkpoint (JSON only; the state is not read)."""
        step = self.latest_step() if step is None else step
        try:
            return self._read_json(step, "config")
        except _Corrupt as e:
            raise CheckpointError(f"checkpoint step {step} is unreadable: {e}") from None

    def _restore_one(self, step: int, abstract_state: Any, check_config) -> tuple:
        config = self._read_json(step, "config")
        if check_config is not None:
            check_config(config, step)  # a mismatch is the caller's error, not corruption
        data = self._read_json(step, "data")
        has_checksum = os.path.isdir(os.path.join(self.directory, str(step), "checksum"))
        checksum = self._read_json(step, "checksum") if has_checksum else None
        try:
            state = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )["state"]
        except Exception as e:  # noqa: BLE001
            raise _Corrupt(f"{os.path.join(self.directory, str(step), 'state')}: {_one_line(e)}") from None
        if checksum is None:
            print(
                f"checkpoint step {step} has no checksums (written by an older version): "
                "restored without verification", file=sys.stderr, flush=True,
            )
        else:
            stored, actual = checksum.get("leaves", {}), state_checksums(state)
            bad = sorted(k for k in set(stored) | set(actual) if stored.get(k) != actual.get(k))
            if bad:
                raise _Corrupt(
                    f"{os.path.join(self.directory, str(step), 'state')}: checksum mismatch in "
                    f"{len(bad)} array(s), e.g. {bad[0]} (the data files are damaged)"
                )
        return step, state, config, data

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        *,
        check_config: Callable[[dict, int], None] | None = None,
        fallback: bool = False,
    ) -> tuple[int, Any, dict, dict]:
        """Restores ``(step, state, config, data)``; the state takes the layout of ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings), e.g. from
        :func:`abstract_like`. ``check_config(stored_config, step)`` runs before the state is
        read and may raise (e.g. a different model size). A shape or structure mismatch raises an
        error; nothing is silently re-initialised.

        With ``fallback=True`` (resuming a run), a damaged checkpoint (unreadable metadata or data
        files, checksum mismatch) is moved to ``<directory>.corrupt/<step>`` with a warning and
        the next older one is tried.

        Raises:
          CheckpointError: no checkpoint, or none intact (naming the step and file of the fault).
        """
        steps = self.all_steps() if step is None else [step]
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        faults = []
        for s in reversed(steps):
            try:
                result = self._restore_one(s, abstract_state, check_config)
            except _Corrupt as e:
                faults.append((s, str(e)))
                if not fallback:
                    break
                print(f"WARNING: checkpoint step {s} is damaged ({e}); trying the previous one",
                      file=sys.stderr, flush=True)
                continue
            if faults:
                self._quarantine([f for f, _ in faults])
            return result
        s, why = faults[0]
        raise CheckpointError(
            f"checkpoint step {s} is damaged: {why}"
            + (f" (and {len(faults) - 1} older checkpoint(s) too)" if len(faults) > 1 else "")
        )

    def _quarantine(self, steps: list[int]) -> None:
        """Moves damaged step directories out of orbax's sight (kept for inspection)."""
        if self.read_only:
            return
        aside = self.directory + ".corrupt"
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for s in steps:
                dest = os.path.join(aside, str(s))
                if os.path.exists(dest):
                    shutil.rmtree(dest)
                os.replace(os.path.join(self.directory, str(s)), dest)
                print(f"WARNING: moved damaged checkpoint step {s} to {dest}", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mspec checkpoint quarantine")
        self._manager.reload()

    def close(self, *, quiet: bool = False) -> None:
        """Waits for the background save and closes. ``quiet``: on an error path, report a
        failed save as a warning instead of raising over the original error."""
        try:
            self.wait()
        except CheckpointError as e:
            if not quiet:
                raise
            print(f"WARNING: {e}", file=sys.stderr, flush=True)
        finally:
            try:
                self._manager.close()
            except Exception as e:  # noqa: BLE001  (already reported above)
                if not quiet:
                    raise CheckpointError(f"closing {self.directory}: {_one_line(e)}") from None


class _Corrupt(Exception):
    """A checkpoint's files cannot be read back as written (internal: becomes a warning or a
    :class:`CheckpointError`)."""


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding skeleton of ``tree`` for restoring into the same layout."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def abstract_state(init_state: Callable[..., Any], sharding, *args) -> Any:
    """The skeleton :func:`abstract_like` would give for ``init_state(*args)``, without running
    (or compiling) it: every leaf is placed as ``sharding`` (trainer states are replicated).

    A run that resumes, or a fine-tuning run that re-initialises its parameters anyway, needs
    only the layout; computing a throw-away state would compile the model's initialisation.
    """
    shapes = jax.eval_shape(init_state, *args)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
