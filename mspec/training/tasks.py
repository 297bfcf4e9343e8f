"""The tasks the loop runs, by ``config.task`` (:data:`TASKS`): the only place a task name selects
code.

A task owns what differs between objectives: its data, its trainer (the jitted step), how a
fresh run starts, what validation computes and what happens at the end. The loop
(:func:`mspec.training.loop.train_and_evaluate`) owns everything else: the resume order, the
log / validation / checkpoint cadence, stop signals, progress output and the summary.

* ``"denoise"`` (Frad / Coord, stage 1) and ``"molspectra"`` (stage 2): :class:`Pretraining`
  with :class:`mspec.training.train.Trainer` or its subclass
  :class:`mspec.training.molspectra.MolSpectraTrainer`; one packed data stream per device slot
  (:mod:`mspec.data.sharding`), so the global batch does not depend on the number of processes.
* ``"qm9"`` and ``"md17"``: :class:`Finetuning` with
  :class:`mspec.training.finetune.FinetuneTrainer`; model selection on validation (a ``best/``
  checkpoint), the plateau schedule, and the evaluation of the last and best checkpoints
  (``results.json``, parity plots) at the end.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from mspec import graph, models
from mspec.data import datasets, pipeline, sharding
from mspec.models import count_params
from mspec.training import (
    checkpoint, downstream, evaluation, finetune, molspectra, run_config, safeguards, schedules,
    train,
)
from mspec.training.progress import note


class Pretraining:
    """Denoising (``"denoise"``) and MolSpectra stage 2 (``"molspectra"``) pre-training."""

    operational_keys = run_config.OPERATIONAL_KEYS + run_config.PRETRAIN_EVAL_KEYS

    @staticmethod
    def check(config) -> None:
        run_config.check_values(config)
        if config.optim.schedule not in schedules.PRETRAINING_SCHEDULES:
            raise run_config.ConfigError(
                f"config.optim.schedule must be one of {schedules.PRETRAINING_SCHEDULES} for "
                f"pre-training, got {config.optim.schedule!r}")
        if config.get("task", "denoise") == "denoise":
            train.check_config(config)

    def __init__(self, config, mesh, config_json: dict):
        self.config, self.config_json = config, config_json
        source_dir = config.data.get("source_dir", "")
        try:
            # Several processes must not build the same dataset concurrently: prepare it beforehand.
            builder = datasets.get_builder(
                config.data.dataset,
                config.data.data_dir or None,
                build=jax.process_count() == 1,
                **({"source_dir": os.path.expanduser(source_dir)} if source_dir else {}),
            )
        except datasets.DatasetError as e:
            if jax.process_count() == 1:
                raise
            raise datasets.DatasetError(
                f"{e}. A multi-process run does not build datasets: prepare it once, on storage "
                "every host can read, e.g. `python -m data_pipelines.qm9 --config full --data_dir DIR`"
            ) from e
        datasets.log_metadata(builder)
        self.trainer = _pretraining_trainer(config, mesh, builder)
        self.train_source = datasets.open_split(builder, "train")
        self.eval_source = datasets.open_split(builder, config.data.eval_split)
        self.featurizer = pipeline.Featurizer(
            radius=config.model.cutoff + config.data.skin,
            max_z=config.model.max_z,
            dataset=config.data.dataset,
            spectra=tuple((s.name, s.length) for s in self.trainer.spectrum_specs),
        )
        self.budget = train.choose_budget(config, builder, self.featurizer, self.train_source)
        note(
            f"devices: {jax.device_count()} ({jax.devices()[0].platform}), processes: "
            f"{jax.process_count()}; per-device budget: {self.budget}"
        )
        self.num_microbatches = train.microbatches(config)
        if config.get("microbatches", 1) == 0:
            note(
                f"microbatches: automatic -> {self.num_microbatches} sub-batch(es) of "
                f"~{config.batch_size / self.num_microbatches:.0f} molecules per step"
            )
        self.num_slots = jax.device_count()
        self.slots = sharding.local_slots(self.trainer.data_sharding, self.num_slots)
        self._iter = None

    def abstract_state(self) -> dict:
        """The run's state layout (shapes, dtypes, shardings): what a checkpoint restores into."""
        state = checkpoint.abstract_state(self.trainer.init_state, self.trainer.replicated,
                                          *self._init_args())
        note(f"model parameters: {count_params(state['params']):,}")
        return state

    def start(self) -> dict:
        """A run with no checkpoint yet: a fresh state (``config.seed``); stage 2 then copies
        stage 1's subtrees (``init_from``)."""
        state = self.trainer.init_state(*self._init_args())
        note(f"model parameters: {count_params(state['params']):,}")
        return self.trainer.start_from_pretrained(state)

    def _init_args(self) -> tuple:
        return jax.random.key(self.config.seed), graph.pack([], self.budget)

    def open_batches(self, data: dict | None) -> None:
        """Starts the training stream at a checkpoint's data position (``None``: the start)."""
        start = (sharding.start_positions(data, self.slots, self.num_slots) if data is not None
                 else [0] * len(self.slots))
        if data is not None:
            note(f"data position {start}")
        c = self.config
        self._iter = sharding.SlotBatchIterator(
            self.train_source, self.featurizer, self.budget, slots=self.slots,
            num_slots=self.num_slots, seed=c.seed, shuffle=True, repeat=True, start=start,
            prefetch=c.data.prefetch, num_threads=c.data.get("num_threads", 0),
            num_workers=c.data.get("num_workers", 0),
        )

    def next_batch(self) -> tuple[dict, dict]:
        """The next global batch and its host-side counts (``molecules``, ``node_fill``)."""
        subs = [next(self._iter) for _ in range(self.num_microbatches)]
        fills = [pipeline.fill(sub) for sub in subs]
        counts = {"molecules": sum(f["molecules"] for f in fills),
                  "node_fill": float(np.mean([f["node_fill"] for f in fills]))}
        if self.num_microbatches == 1:
            return self.trainer.global_batch(subs[0]), counts
        return self.trainer.global_batch(train.stack_microbatches(subs), microbatched=True), counts

    def data_state(self) -> dict:
        return sharding.global_state(self._iter.state())

    def validate(self, state, step, writer, workdir) -> tuple[dict, dict, str]:
        """``(state, scalars to log, the validation line)``."""
        ev = self.trainer.evaluate(state, self.eval_source, self.featurizer, self.budget,
                                   step=step, writer=writer, workdir=workdir)
        text = ", ".join(f"{k[5:]} {v:.4g}" for k, v in ev.items() if k.startswith("eval/"))
        return state, ev, f"validation: {text}"

    def finish(self, summary: dict, workdir: str, finished: bool) -> dict:
        """Adds the step's shape to the summary (``microbatches``, the per-device ``budget``)."""
        summary.update(microbatches=self.num_microbatches, budget=dataclasses.asdict(self.budget))
        return summary

    def close(self, failed: bool) -> None:
        if self._iter is not None:
            self._iter.close()


def _pretraining_trainer(config, mesh, builder) -> train.Trainer:
    model = models.get_model(config.model)
    train.note_message_passing(config)
    if config.get("task", "denoise") == "molspectra":
        trainer = molspectra.MolSpectraTrainer(
            config, model, mesh,
            spectrum_lengths=molspectra.spectrum_lengths(config, builder),
            grids=molspectra.dataset_grids(builder),
        )
    else:
        trainer = train.Trainer(config, model, mesh)
    trainer.check()
    return trainer


class Finetuning:
    """QM9 (``"qm9"``) and MD17 (``"md17"``) fine-tuning, with model selection on validation."""

    operational_keys = run_config.OPERATIONAL_KEYS

    @staticmethod
    def check(config) -> None:
        finetune.check_config(config)

    def __init__(self, config, mesh, config_json: dict):
        self.config, self.config_json = config, config_json
        self.setup = finetune.build(config, mesh)
        self.trainer = self.setup.trainer
        note(
            f"devices: {jax.device_count()} ({jax.devices()[0].platform}); per-device budget: "
            f"{self.setup.budget}; target {config.target.name}: mean {self.setup.standardizer.mean:.6g}, "
            f"std {self.setup.standardizer.std:.6g} "
            f"({'standardised' if config.target.standardize else 'not standardised'}"
            f"{', QM9 atom references subtracted' if config.target.atomref else ''})"
        )
        self.plateau = schedules.Plateau(
            factor=config.optim.plateau_factor, patience=config.optim.plateau_patience,
            threshold=config.optim.plateau_threshold, lr_min=config.optim.lr_min,
            base_lr=config.optim.lr,
        )
        self.best = None
        self._iter = None

    def abstract_state(self) -> dict:
        """The run's state layout (shapes, dtypes, shardings): what a checkpoint restores into."""
        return self.setup.abstract_state()

    def start(self) -> dict:
        """Fresh parameters (``config.seed``), then ``config.init``'s subtrees from a
        pre-training checkpoint."""
        return self.trainer.state_from_params(finetune.init_params(self.setup))

    def open_batches(self, data: dict | None) -> None:
        """Starts the training stream (one per device slot, as pre-training's) at a checkpoint's
        data position; a checkpoint of the older single stream (``{"next_index": k}``) resumes
        exactly on one device, translated on several (:func:`sharding.start_positions`)."""
        slots = sharding.local_slots(self.trainer.data_sharding, jax.device_count())
        start = None
        if data is not None:
            start = sharding.start_positions(data, slots, jax.device_count())
            note(f"data position {start}")
        self._iter = finetune.batches(self.setup, "train", shuffle=True, repeat=True, start=start)

    def next_batch(self) -> tuple[dict, dict]:
        local = next(self._iter)
        dev, _ = finetune.split_host(local)
        return self.trainer.global_batch(dev), {"molecules": float(np.sum(local["graph_mask"]))}

    def data_state(self) -> dict:
        return sharding.global_state(self._iter.state())

    def validate(self, state, step, writer, workdir) -> tuple[dict, dict, str]:
        """Validation metric, the plateau schedule, and a ``best/`` checkpoint when it improves."""
        cfg, setup = self.config, self.setup
        pred = finetune.predict(setup, state["params"], "validation", cfg.data.eval_max_molecules or None)
        val = finetune.validation_metric(setup, pred)
        scalars = {"eval/metric": val}
        if cfg.optim.schedule == "plateau":
            lr_scale, best, bad = self.plateau.update(
                float(state["lr_scale"]), float(state["plateau_best"]), int(state["plateau_bad"]), val
            )
            state = finetune.replicate_scalars(self.trainer, state, lr_scale=lr_scale,
                                               plateau_best=best, plateau_bad=bad)
            scalars["eval/lr_scale"] = lr_scale
        improved = val < float(state["best_val"])
        if improved:
            state = finetune.replicate_scalars(self.trainer, state, best_val=val, best_step=step)
            if self.best is None:
                self.best = checkpoint.Checkpointer(os.path.join(workdir, "best"), keep=1, async_save=False)
            # A run killed after this save and before the periodic checkpoint of the same step
            # replays to here on resume; the resumed state is bitwise the one already saved, so
            # the existing best/<step> stands.
            if self.best.latest_step() != step:
                safeguards.save_checkpoint(self.best, step, state, self.config_json,
                                           self.data_state(), "best validation")
        text = finetune.describe_validation(setup, pred, val) + (" (best so far)" if improved else "")
        return state, scalars, text

    def finish(self, summary: dict, workdir: str, finished: bool) -> dict:
        """Once training finished: the evaluation of the last and best checkpoints
        (``summary["results"]``, also ``results.json`` and the parity plots)."""
        if not finished:
            return summary
        ev = self.config.get("evaluate") or {}
        summary["results"] = evaluation.evaluate(
            self.setup, workdir, which=tuple(ev.get("checkpoints", ("last", "best"))),
            validation_max_molecules=int(ev.get("validation_max_molecules", 0)),
        )
        return summary

    def close(self, failed: bool) -> None:
        if self._iter is not None:
            self._iter.close()
        if self.best is not None:
            self.best.close(quiet=failed)


# config.task -> task class.
TASKS: dict[str, Any] = {
    "denoise": Pretraining,
    "molspectra": Pretraining,
    **{name: Finetuning for name in downstream.KINDS},  # qm9, md17
}


def task_class(config):
    """The task class of ``config.task`` (default ``"denoise"``).

    Raises:
        run_config.ConfigError: an unknown task.
    """
    name = config.get("task", "denoise")
    if name not in TASKS:
        raise run_config.ConfigError(f"config.task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]
