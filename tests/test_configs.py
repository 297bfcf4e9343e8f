"""Every experiment config: each variant builds, validates and describes a model, and every key
of every config is read by the code that runs it (a key nobody reads is a setting that silently
does nothing: a typo'd override, or one dropped by a refactor).

Reads are recorded by wrapping ``ConfigDict.__getitem__`` (attribute access, ``[]`` and ``.get``
all go through it) while bulk operations (serialising, copying, printing, ``items()``) are
ignored, then every task's ``tiny`` variant runs end to end for a couple of steps (with the PaiNN
backbone, so the same runs prove that the second backbone runs every task): Frad and Coord
pre-training, MolSpectra stage 2 from the Frad checkpoint, QM9 and MD17 fine-tuning from it. Keys
are identified by their path; a sub-dict is recognised by its set of keys, so a copy of the
config (or its JSON round trip) counts as the same config.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import re
import threading

import pytest
from ml_collections import config_dict

from data_pipelines.md17 import MOLECULES
from experiments.configs import (
    finetune_md17,
    finetune_qm9,
    pretrain_coord,
    pretrain_frad,
    pretrain_molspectra,
    reproduce,
)
from mspec import models
from mspec.training import finetune, loop, run_config, targets, train

ROOT = pathlib.Path(__file__).resolve().parents[1]

PRETRAIN_VARIANTS = {
    pretrain_frad: ("base", "tiny"),
    pretrain_coord: ("base", "tiny"),
    pretrain_molspectra: ("base", "tiny"),
}
FINETUNE_VARIANTS = {
    finetune_qm9: (*targets.QM9_TARGETS, "tiny", "tiny,target=U0", "tiny,target=mu",
                   "mu,head=scalar", "r2,head=scalar", "U0,prior=none"),
    finetune_md17: (*MOLECULES, "tiny", "tiny,noisy", "tiny,noisy,separate_noise",
                    "aspirin,noisy", "aspirin,noisy,separate_noise", "aspirin,real",
                    "aspirin,rmd17=1", "aspirin,train=9500"),
}
ALL_VARIANTS = [
    (module, variant)
    for table in (PRETRAIN_VARIANTS, FINETUNE_VARIANTS)
    for module, variants in table.items()
    for variant in variants
]

# Keys read only under a setting the tiny runs do not use (key -> when it is read).
READ_CONDITIONALLY = {
    "data.source_dir": "building a dataset from the user's release files",
    "data.manual_dir": "MD17/rMD17 from the user's npz files (finetune builds read it via get)",
    "init_from.normalizer": "loss.target_normalization='running'",
}


def _id(item) -> str:
    module, variant = item
    return f"{module.__name__.rsplit('.', 1)[-1]}:{variant}"


def _check(config) -> None:
    """The validation the entry point runs before reading any data."""
    task = config.get("task", "denoise")
    if task in finetune.TASKS:
        finetune.check_config(config)
    elif task == "denoise":
        train.check_config(config)
    else:
        run_config.check_values(config)


@pytest.mark.parametrize("item", ALL_VARIANTS, ids=_id)
def test_every_variant_builds_validates_and_describes_a_model(item):
    module, variant = item
    config = module.get_config(variant)
    _check(config)
    model = models.get_model(config.model)
    assert model.backbone == "et" and tuple(model.heads) == tuple(config.model.heads)
    # The second backbone takes the same config with only the name changed.
    config.model.name = "painn"
    if config.model.separate_noise_vectors:
        with pytest.raises(ValueError, match="separate_noise_vectors is an option of the 'et' backbone only"):
            models.get_model(config.model)
    else:
        assert models.get_model(config.model).backbone == "painn"


def test_unknown_backbone_and_model_keys_are_clear_errors():
    config = pretrain_frad.get_config("tiny")
    config.model.name = "schnet"
    with pytest.raises(ValueError, match=r"unknown model.name 'schnet'; known backbones: \['et', 'painn'\]"):
        models.get_model(config.model)
    config.model.name = "et"
    config.model.hiden = 12
    with pytest.raises(ValueError, match=r"unknown model config keys \['hiden'\]"):
        models.get_model(config.model)


def test_variant_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown config argument 'targt'"):
        finetune_qm9.get_config("tiny,targt=homo")
    with pytest.raises(ValueError, match="unknown QM9 variant"):
        finetune_qm9.get_config("homo2")
    with pytest.raises(ValueError, match="separate_noise needs noisy"):
        finetune_md17.get_config("aspirin,separate_noise")
    with pytest.raises(ValueError, match="unknown variant"):
        pretrain_molspectra.get_config("large")


# --------------------------------------------------------------------------------------------------
# Every key is read
# --------------------------------------------------------------------------------------------------

_BULK = ("to_json_best_effort", "to_json", "to_dict", "copy_and_resolve_references", "__eq__",
         "__repr__", "__str__", "items", "values", "__deepcopy__", "__getstate__")


class ReadRecorder:
    """Records ``(keys of the parent dict, key)`` for every read of a config value."""

    def __init__(self):
        self.reads: set[tuple[frozenset, str]] = set()
        self._local = threading.local()

    @contextlib.contextmanager
    def installed(self, monkeypatch):
        getitem = config_dict.ConfigDict.__getitem__
        recorder = self

        def recording_getitem(self, key):
            if not getattr(recorder._local, "bulk", 0) and isinstance(key, str) and "." not in key:
                recorder.reads.add((frozenset(self._fields), key))
            return getitem(self, key)

        def bulk(method):
            def wrapped(self, *args, **kwargs):
                recorder._local.bulk = getattr(recorder._local, "bulk", 0) + 1
                try:
                    return method(self, *args, **kwargs)
                finally:
                    recorder._local.bulk -= 1
            return wrapped

        monkeypatch.setattr(config_dict.ConfigDict, "__getitem__", recording_getitem)
        for name in _BULK:
            if hasattr(config_dict.ConfigDict, name):
                monkeypatch.setattr(config_dict.ConfigDict, name, bulk(getattr(config_dict.ConfigDict, name)))
        yield self

    @staticmethod
    def leaves(config, prefix=""):
        """``{path: (keys of the parent dict, key)}`` of every leaf of ``config``."""
        out = {}
        fields = config._fields
        for key, value in fields.items():
            if isinstance(value, config_dict.ConfigDict):
                out.update(ReadRecorder.leaves(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = (frozenset(fields), key)
        return out

    def unread(self, config) -> list[str]:
        return sorted(path for path, read in self.leaves(config).items() if read not in self.reads)


def _short(config, data_dir):
    """Two steps, logged, evaluated and checkpointed (fine-tuning: then its final evaluation)."""
    config.data.data_dir = data_dir
    if config.get("task") in finetune.TASKS:
        config.total_steps, config.optim.warmup_steps = 2, 1
    else:
        config.stop_after_step = 2
    config.log_every = config.eval_every = config.checkpoint_every = 2
    return config


def test_every_task_runs_with_painn_and_every_config_key_is_read(qm9_sample_dir, monkeypatch, tmp_path):
    """The ``tiny`` configs of every task, two steps each, with the second backbone and only
    ``model.name`` changed: Frad and Coord pre-training, MolSpectra stage 2 from the Frad
    checkpoint, QM9 and MD17 fine-tuning from it (PaiNN's parameters live under
    ``representation``, so they restore like the ET's; the ET's own tiny runs of every task are
    in test_train, test_stage2 and test_finetune). Meanwhile every config read is recorded: the
    model block is read whole by ``get_model`` whatever the backbone, every other key by the code
    that uses it."""
    def tiny(module, variant="tiny"):
        config = _short(module.get_config(variant), qm9_sample_dir)
        config.model.name = "painn"
        config.data.eval_max_molecules = 16
        return config

    with ReadRecorder().installed(monkeypatch) as recorder:
        frad, coord = tiny(pretrain_frad), tiny(pretrain_coord)
        runs = {name: loop.train_and_evaluate(c, str(tmp_path / name))
                for name, c in (("frad", frad), ("coord", coord))}
        stage2 = tiny(pretrain_molspectra)
        stage2.init_from.checkpoint = str(tmp_path / "frad")
        runs["molspectra"] = loop.train_and_evaluate(stage2, str(tmp_path / "molspectra"))
        qm9, md17 = tiny(finetune_qm9), tiny(finetune_md17, "tiny,noisy")
        qm9.evaluate.validation_max_molecules = 16
        for name, c in (("qm9", qm9), ("md17", md17)):
            c.init.checkpoint = str(tmp_path / "frad")
            runs[name] = loop.train_and_evaluate(c, str(tmp_path / name))

    for name in ("frad", "coord"):
        assert runs[name]["final_step"] == 2 and math.isfinite(runs[name]["eval/denoising_mse"]), runs[name]
    assert math.isfinite(runs["molspectra"]["eval/contrastive"]), runs["molspectra"]
    assert math.isfinite(runs["qm9"]["results"]["last"]["test"]["mae"])
    assert math.isfinite(runs["md17"]["results"]["last"]["test"]["forces_mae"])
    with open(tmp_path / "qm9" / "config.json") as f:
        assert json.load(f)["model"]["name"] == "painn"

    configs = {"frad": frad, "coord": coord, "molspectra": stage2, "qm9": qm9, "md17": md17}
    unread = {name: [k for k in recorder.unread(c) if k not in READ_CONDITIONALLY]
              for name, c in configs.items()}
    assert not any(unread.values()), f"config keys nobody read: {unread}"
    every_key = set().union(*(recorder.leaves(c) for c in configs.values()))
    assert set(READ_CONDITIONALLY) <= every_key, "a stale READ_CONDITIONALLY entry"


def test_the_recorder_sees_an_unread_key(monkeypatch):
    """The recorder itself: a key the checks do not read is reported; serialising reads nothing."""
    config = pretrain_frad.get_config("tiny")
    config.noise.unused_setting = 1
    with ReadRecorder().installed(monkeypatch) as recorder:
        config.to_json_best_effort()
        str(config.copy_and_resolve_references())
        assert recorder.reads == set()
        train.check_config(config)
        models.get_model(config.model)
    assert "noise.unused_setting" in recorder.unread(config)
    assert "noise.type" not in recorder.unread(config)
    assert "model.hidden" not in recorder.unread(config)


def _named_in(source: str, path: str) -> bool:
    """``path``'s key is read in ``source`` by name (``.key``, ``["key"]``, ``get("key"``, or a
    quoted ``"key"`` in a list of keys), or its block is forwarded whole (``block.items()``)."""
    *parents, key = path.split(".")
    k = re.escape(key)
    if re.search(rf"""\.{k}\b|["']{k}["']""", source):
        return True
    return bool(parents) and re.search(rf"\b{re.escape(parents[-1])}\.items\(\)", source) is not None


def test_every_key_of_the_study_config_is_read_by_the_study():
    """The reproduction study's config (experiments/configs/reproduce.py, every scale): each leaf
    key is read somewhere in the study's code (a static check: running a study is the smoke
    study's test, tests/test_reproduce.py)."""
    source = "\n".join(p.read_text() for p in (ROOT / "experiments").glob("reproduce*.py"))
    for scale in reproduce.SCALES:
        config = reproduce.get_config(scale)
        missing = [path for path in ReadRecorder.leaves(config) if not _named_in(source, path)]
        assert not missing, f"reproduce:{scale} keys the study never reads: {missing}"
    assert not _named_in("c.pretrain.steps", "pretrain.lr")  # the check can fail


def test_a_retired_key_does_not_block_resuming_an_older_run():
    """Fine-tuning configs dropped ``data.eval_split`` (nothing read it); older runs still resume."""
    current = json_of(finetune_qm9.get_config("tiny"))
    stored = {**current, "data": {**current["data"], "eval_split": "validation"}}
    assert run_config.check_resume(stored, current, directory="w", step=5) == []
    # A key that is not retired still refuses.
    stored["data"]["budget_slack"] = 2.0
    with pytest.raises(run_config.ConfigError, match="data.budget_slack"):
        run_config.check_resume(stored, current, directory="w", step=5)


def json_of(config) -> dict:
    return json.loads(config.to_json_best_effort())


def test_pretraining_refuses_a_fine_tuning_schedule(tmp_path):
    """"plateau" needs fine-tuning's validation-driven controller; pre-training has none."""
    config = pretrain_frad.get_config("tiny")
    config.optim.schedule = "plateau"
    with pytest.raises(run_config.ConfigError, match="optim.schedule must be one of"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
