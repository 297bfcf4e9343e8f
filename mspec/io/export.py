"""Writing a converted torch model (:class:`mspec.io.torch_et.Converted`) as mspec checkpoints.

Two layouts, both read by the normal commands:

* :func:`write_pretrained` -- a pre-training-style directory for
  ``experiments.finetune --config.init.checkpoint=DIR``::

      DIR/config.json              resolved mspec config: model, data.max_neighbors,
                                   standardization, converted_from (file, variant, hyper-parameters)
      DIR/checkpoints/0/state      {"params": ..., "normalizer": (sum, sum_sq, count)}  (orbax)

  The normaliser is present for the forks (their ``pos_normalizer`` buffers), so stage 2 can
  carry it like a pre-training checkpoint's.

* :func:`write_finetune_workdir` -- a fine-tuning workdir for ``experiments.evaluate --workdir
  DIR`` (and :mod:`experiments.predict`): the fine-tuning config with the checkpoint's model and
  its own standardisation (``target.fixed_standardizer``: evaluation uses the torch model's
  mean / std, not statistics refitted on the data), and the full train state at step 0 in both
  ``checkpoints/`` and ``best/``.

An existing non-empty ``DIR`` is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from mspec.io.torch_et import ConversionError, Converted

MODEL_FLAG_KEYS = ("hidden", "num_layers", "num_heads", "num_rbf", "cutoff", "max_z",
                   "interlayer_norm", "vector_norm")


def model_flags(converted: Converted) -> list[str]:
    """The ``--config.model.*`` overrides that give a fine-tuning config this checkpoint's
    encoder (the property head and prior are the fine-tuning config's own choice)."""
    flags = [f"--config.model.{k}={converted.model[k]}" for k in MODEL_FLAG_KEYS]
    if converted.model.get("separate_noise_vectors"):
        flags.append("--config.model.separate_noise_vectors=True")
    return flags


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else repr(o)))


def resolved_config(converted: Converted) -> dict:
    """The mspec config describing a converted model (``config.json``)."""
    model = dict(converted.model, heads=list(converted.model["heads"]), message_passing="xla")
    return {
        "model": model,
        "data": {"max_neighbors": converted.max_num_neighbors or 32},
        "standardization": converted.standardization,
        "converted_from": _json_safe({
            "variant": converted.variant,
            **converted.source,
            "hyper_parameters": converted.hyper_parameters,
        }),
    }


@contextlib.contextmanager
def _fresh_dir(out: str):
    """Yields a staging directory beside ``out`` that becomes ``out`` only when everything in it
    is written, so a failed or killed conversion never leaves a directory that looks complete."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and os.listdir(out):
        raise ConversionError(f"{out} exists and is not empty; choose a new --out directory")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=os.path.dirname(out))
    try:
        yield staging
        os.replace(staging, out)  # onto a missing or empty directory: atomic
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save(directory: str, state: Any, config: dict) -> None:
    from mspec.training import checkpoint

    ckpt = checkpoint.Checkpointer(directory, keep=1, async_save=False)
    try:
        ckpt.save(0, state, config, {"converted": True})
    finally:
        ckpt.close()


def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def write_pretrained(converted: Converted, out: str) -> str:
    """Writes ``out/config.json`` and ``out/checkpoints/0``; returns ``out`` (absolute)."""
    config = resolved_config(converted)
    state: dict[str, Any] = {"params": converted.params}
    if converted.normalizer is not None:
        state["normalizer"] = tuple(converted.normalizer)
    with _fresh_dir(out) as staging:
        _save(os.path.join(staging, "checkpoints"), state, config)
        _write_json(os.path.join(staging, "config.json"), config)
    return os.path.abspath(os.path.expanduser(out))


def _atomref_setting(converted: Converted, config) -> bool:
    """Whether the labels get QM9's fixed atom references subtracted (``target.atomref``) for a
    checkpoint whose Atomref table became the model's learnable prior.

    Both torch conventions exist: a model trained on total energies holds the references
    themselves in its prior (about -13.6 eV for H, -1030 eV for C: the labels are used as they
    are), while Frad's pre-trained path subtracts QM9's references from the labels and learns a
    small correction (well under 5 eV per element). Anything else is refused as ambiguous.
    """
    from mspec.training import downstream, targets

    atomref = converted.standardization["atomref"]
    name = config.target.name
    kind = downstream.get(config.task)
    if atomref is None or kind is None or kind.forces or name not in targets.QM9_ATOMREF_EV:
        return False
    table = np.asarray(atomref, np.float64)[list(targets._ATOMREF_Z)]
    refs = np.asarray(targets.QM9_ATOMREF_EV[name])
    if np.allclose(table, refs, rtol=0.1, atol=0.0):
        return False
    if np.max(np.abs(table)) < 5.0:
        return True
    raise ConversionError(
        f"{converted.source['file']}: the checkpoint's Atomref prior (H, C, N, O, F: "
        f"{np.round(table, 3).tolist()} eV) is neither QM9's {name} references nor a small "
        "correction on top of them; cannot tell which labels it was trained on"
    )


def write_finetune_workdir(converted: Converted, out: str, config) -> str:
    """Writes a fine-tuning workdir holding the converted model at step 0.

    Args:
        converted: the converted checkpoint (it must have the scalar head).
        out: a new directory.
        config: a fine-tuning config (``experiments/configs/finetune_*.py``), unlocked; its
            ``model`` section is replaced by the checkpoint's (its property head, prior and
            vector streams included), ``target.atomref`` (:func:`_atomref_setting`) and
            ``target.fixed_standardizer`` are set from the checkpoint, ``init.checkpoint`` is
            cleared (the parameters are in the workdir).

    Returns:
        ``out`` (absolute).
    """
    import jax

    from mspec.training import finetune, train

    from mspec import models

    try:
        models.property_head(converted.model["heads"])
    except ValueError:
        raise ConversionError(f"{converted.source['file']}: no property head (output_model.*): "
                              "nothing to evaluate") from None
    config = config.copy_and_resolve_references()
    config.unlock()
    config.model.update(dict(converted.model, heads=tuple(converted.model["heads"])))
    config.target.atomref = _atomref_setting(converted, config)
    std = converted.standardization
    config.target.standardize = (std["mean"], std["std"]) != (0.0, 1.0)
    config.target.fixed_standardizer = {"mean": std["mean"], "std": std["std"]}
    config.init.checkpoint = ""
    if "noise" not in converted.model["heads"]:
        config.loss.denoising_weight = 0.0
    config.converted_from = resolved_config(converted)["converted_from"]
    finetune.check_config(config)
    trainer = finetune.FinetuneTrainer(config, models.get_model(config.model), train.make_mesh())
    state = jax.device_get(trainer.state_from_params(converted.params))
    config_json = json.loads(config.to_json_best_effort())
    with _fresh_dir(out) as staging:
        for sub in ("checkpoints", "best"):
            _save(os.path.join(staging, sub), state, config_json)
        _write_json(os.path.join(staging, "config.json"), config_json)
    return os.path.abspath(os.path.expanduser(out))
