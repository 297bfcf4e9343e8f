"""Config checks shared by pre-training and fine-tuning: values before any work, and the
comparison of a resumed run's config with the one its checkpoint was written with.

Both raise :class:`ConfigError` with one line that names the key(s) (``docs/reliability.md``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A config value or a config change that cannot be run; the message names the key."""


# Keys that change how a run is carried out, not what it trains: they may differ on resume.
# (Anything under a listed prefix: "evaluate" covers evaluate.checkpoints, ...)
OPERATIONAL_KEYS = (
    "stop_after_step",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "data.data_dir",
    "data.source_dir",
    "data.manual_dir",
    "data.prefetch",
    "data.num_threads",
    "data.num_workers",
    "model.message_passing",  # the same math (tested in tests/test_fused_message.py)
    "evaluate",
)
# Keys added after runs were written, with the value that those runs used: a stored config
# without one compares as if it had it (so older workdirs still resume).
DEFAULTS_OF_NEWER_KEYS = {
    "model.name": "et",
    "model.dtype": "float32",
    "model.vector_norm": "whitened",
    "model.prior": "none",
    "model.separate_noise_vectors": False,
    "model.shared_filters": False,
    "init.zero_scalar_readout": False,
}
# Keys that configs no longer carry where nothing read them, with the reason: a stored config
# that still has one resumes as if it had not (fine-tuning evaluates data.validation_split).
RETIRED_KEYS = {"data.eval_split": "read by pre-training only"}
# Pre-training only: its validation does not feed back into training (fine-tuning's does, through
# the best checkpoint and the plateau schedule).
PRETRAIN_EVAL_KEYS = ("eval_every", "data.eval_max_molecules", "data.eval_split")


def _fail(key: str, want: str, value: Any) -> None:
    raise ConfigError(f"config.{key} must be {want}, got {value!r}")


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, Mapping) and not hasattr(node, "keys"):
            return None
        if part not in node:
            return None
        node = node[part]
    return node


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_values(config) -> None:
    """Validates every value the loops use (present keys only), before any data is read.

    Cadences, step counts and ``keep_checkpoints`` are integers >= 1; the learning rate, noise
    scales (τ, σ) and ``eps`` finite and positive; loss weights, warm-up, weight decay and
    clipping finite and >= 0; Adam's betas in [0, 1).
    """
    rules = (
        (("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
          "keep_checkpoints", "data.max_neighbors"), "an integer >= 1", lambda v: _is_int(v) and v >= 1),
        (("stop_after_step", "data.prefetch", "data.eval_max_molecules", "data.num_threads",
          "data.num_workers", "optim.warmup_steps"), "an integer >= 0", lambda v: _is_int(v) and v >= 0),
        (("optim.lr", "optim.eps", "noise.tau", "noise.sigma_deg", "data.budget_slack",
          "model.cutoff"), "a finite number > 0", lambda v: _is_number(v) and v > 0),
        (("optim.weight_decay", "optim.grad_clip_norm", "optim.lr_min", "data.skin",
          "loss.denoising_weight", "loss.energy_weight", "loss.force_weight", "loss.mpr_weight",
          "loss.contrastive_weight", "loss.denoising_scale"),
         "a finite number >= 0", lambda v: _is_number(v) and v >= 0),
        (("optim.b1", "optim.b2"), "a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    )
    for keys, want, ok in rules:
        for key in keys:
            value = _get(config, key)
            if value is not None and not ok(value):
                _fail(key, want, value)
    scale = _get(config, "loss.denoising_scale")
    if scale is not None and _get(config, "loss.denoising_weight") and not scale > 0:
        _fail("loss.denoising_scale", "> 0 when loss.denoising_weight > 0", scale)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` of a nested mapping (lists and tuples compare as lists)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _describe(keys, old, new) -> str:
    return ", ".join(f"{k} ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})" for k in keys)


def check_resume(
    stored: Mapping,
    current: Mapping,
    *,
    directory: str,
    step: int,
    allow: Iterable[str] = (),
    operational: Iterable[str] = OPERATIONAL_KEYS,
) -> list[str]:
    """Compares the config a checkpoint was written with (``stored``) with this run's.

    Keys under ``operational`` may differ. A different model (other than
    ``model.message_passing``) can never be resumed. Any other difference (noise, loss, task,
    data, optimiser, ``total_steps``, ...) is refused unless its key, or a prefix of it, is in
    ``allow`` (``--allow_config_change``).

    Returns:
      The allowed keys that differ (to be recorded), sorted.

    Raises:
      ConfigError: one line listing the differing keys with both values.
    """
    old, new = ({**DEFAULTS_OF_NEWER_KEYS, **flatten(c)} for c in (stored, current))
    for key in RETIRED_KEYS:
        if key not in new:
            old.pop(key, None)
    differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    differing = [k for k in differing if not _under(k, operational)]
    model = [k for k in differing if k.startswith("model.")]
    where = f"{directory} (step {step})"
    if model:
        raise ConfigError(
            f"the checkpoint in {where} was written with a different model config: "
            f"{_describe(model, old, new)}; use a new --workdir"
        )
    allow = tuple(allow)
    refused = [k for k in differing if not _under(k, allow)]
    if refused:
        raise ConfigError(
            f"refusing to resume {where}: the config differs from the checkpoint's in what is "
            f"trained: {_describe(refused, old, new)}. Use a new --workdir, or continue with the "
            f"new values with --allow_config_change={','.join(refused)}"
        )
    return differing
