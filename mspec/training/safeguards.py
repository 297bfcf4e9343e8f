"""Safeguards of the training loops: nothing non-finite is saved, errors name the checkpoint that
really exists, a resumed config is checked against the checkpoint's, and allowed config changes
are recorded. Used by :mod:`mspec.training.train` and :mod:`mspec.training.finetune`; the
guarantees are listed in ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from mspec.training import checkpoint, run_config, stopping
from mspec.training.progress import note


def mean_measurements(pending: list[dict], step: int, ckpt: checkpoint.Checkpointer) -> dict[str, float]:
    """Host means of the per-step measurements since the last log line; a non-finite value stops
    the run (nothing non-finite is ever saved: see :func:`save_checkpoint`)."""
    host = jax.device_get(pending)
    means = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    if not all(math.isfinite(v) for v in means.values()):
        bad = ", ".join(f"{k} {v}" for k, v in means.items() if not math.isfinite(v))
        raise FloatingPointError(
            f"non-finite training measurements at step {step} ({bad}); {_latest_after_wait(ckpt)}"
        )
    return means


def _latest_after_wait(ckpt: checkpoint.Checkpointer) -> str:
    """Where the run stands on disk, once a save in flight (of a finite state) has finished."""
    try:
        ckpt.wait()
    except checkpoint.CheckpointError as e:
        note(f"WARNING: {e}")
    return ckpt.describe_latest()


@jax.jit
def _finite_flags(leaves: list) -> list:
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def nonfinite_arrays(tree) -> list[str]:
    """Paths of the floating-point arrays of ``tree`` that hold a NaN or an infinity."""
    leaves = [
        (path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    ok = jax.device_get(_finite_flags([x for _, x in leaves]))
    return [jax.tree_util.keystr(path) for (path, _), good in zip(leaves, ok) if not good]


# State entries that must be finite to be saved; others may legitimately hold NaN or inf (e.g.
# fine-tuning's "best validation so far" starts at inf, the energy EMA at NaN = unset).
CHECKED_STATE_KEYS = ("params", "opt", "normalizer", "batch_stats")


def save_checkpoint(ckpt: checkpoint.Checkpointer, step: int, state: dict, config_json: dict,
                    data: dict, why: str = "") -> None:
    """Saves ``state`` (in the background) and prints a line, unless its parameters, optimiser
    or normaliser state hold a NaN/inf: then nothing is saved (keep-N never deletes a good
    checkpoint for a diverged one) and the run stops with a ``FloatingPointError`` that names
    the step and the latest checkpoint that really exists."""
    bad = nonfinite_arrays({k: state[k] for k in CHECKED_STATE_KEYS if k in state})
    if bad:
        raise FloatingPointError(
            f"non-finite values in the train state at step {step} ({len(bad)} array(s), e.g. "
            f"{bad[0]}): not saved; {_latest_after_wait(ckpt)}"
        )
    ckpt.save(step, state, config_json, data)
    note(f"checkpoint: saving step {step}{f' ({why})' if why else ''} to {ckpt.directory}")


def end_of_step_save(ckpt: checkpoint.Checkpointer, writer, extra: stopping.ExtraSaves, step: int,
                     state: dict, config_json: dict, data_state, *, periodic: bool,
                     save_now: bool, stop_now: bool) -> bool:
    """The checkpoint logic at the end of a step, shared by the training loops: saves on the step
    cadence (``periodic``), the wall-clock cadence or a stop signal (``save_now``, ``stop_now``
    from :meth:`stopping.ExtraSaves.check`), then raises :class:`stopping.Stopped` if a signal
    asked to stop. ``data_state()`` gives the input position (called only when saving: it may
    be a collective). Returns whether it saved."""
    saved = periodic or save_now
    if saved:
        why = "stop signal" if stop_now else ("wall-clock cadence" if save_now and not periodic else "")
        writer.flush()  # every record up to a checkpoint's step is on disk before it
        save_checkpoint(ckpt, step, state, config_json, data_state(), why)
        extra.saved()
    if stop_now:
        ckpt.wait()
        raise stopping.Stopped(extra.signals.signum or signal.SIGTERM, step, ckpt.directory)
    return saved


def resume_check(config_json: dict, ckpt: checkpoint.Checkpointer, allow, operational, changes: list):
    """A ``check_config`` for :meth:`Checkpointer.restore`: refuses a config that changes what is
    trained (:func:`run_config.check_resume`); collects the allowed changes in ``changes``."""

    def check(stored: dict, step: int) -> None:
        changes[:] = run_config.check_resume(
            stored, config_json, directory=ckpt.directory, step=step, allow=allow,
            operational=operational,
        )

    return check


def check_latest_config(ckpt: checkpoint.Checkpointer, check) -> None:
    """Runs ``check`` (:func:`resume_check`) on the latest checkpoint's stored config, before
    the dataset and model are built. An unreadable config is left to the restore, which falls
    back to an older checkpoint (and checks that one's config)."""
    step = ckpt.latest_step()
    if step is None:
        return
    try:
        stored = ckpt.read_config(step)
    except checkpoint.CheckpointError:
        return
    check(stored, step)


def record_config(workdir: str, config_json: dict, start_step: int, changed: list[str], stored: dict | None) -> None:
    """Writes ``config.json`` and, when ``--allow_config_change`` let keys differ from the
    checkpoint's config, appends them (old and new values) to ``config_changes.jsonl``."""
    if jax.process_index() != 0:
        return
    if changed:
        old, new = run_config.flatten(stored or {}), run_config.flatten(config_json)
        entry = {"step": start_step, "changes": {k: [old.get(k), new.get(k)] for k in changed}}
        with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        note(f"config changed at step {start_step} (allowed): {', '.join(changed)}; "
             "recorded in config_changes.jsonl")
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config_json, f, indent=1)
    os.replace(tmp, os.path.join(workdir, "config.json"))
