"""The pre-training loop: ``train_and_evaluate(config, workdir)``.

``config.task`` picks the trainer (:data:`TASKS`): ``"denoise"`` (Frad / Coord, stage 1;
:class:`mspec.training.train.Trainer`) or ``"molspectra"`` (stage 2;
:class:`mspec.training.molspectra.MolSpectraTrainer`). This loop, its logging, checkpoints and
resume are shared by both. Fine-tuning (``"qm9"``, ``"md17"``) runs its own loop,
:func:`mspec.training.finetune.finetune_and_evaluate`.

Resume order: the latest checkpoint in ``workdir/checkpoints`` if any, else a fresh start (for
stage 2: from ``config.init_from``, see :meth:`Trainer.start_from_pretrained`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mspec import graph, models
from mspec.data import datasets, pipeline, sharding
from mspec.models import count_params
from mspec.training import checkpoint, metrics, molspectra, progress, run_config, safeguards, stopping
from mspec.training.progress import note
from mspec.training.train import (
    Trainer,
    check_config,
    choose_budget,
    make_mesh,
    microbatches,
    note_message_passing,
    stack_microbatches,
)


TASKS = ("denoise", "molspectra")


def make_trainer(config: ml_collections.ConfigDict, mesh, builder=None) -> Trainer:
    """The trainer of ``config.task``: ``"denoise"`` (Frad/Coord, stage 1; the default) or
    ``"molspectra"`` (stage 2: denoising + masked-patch reconstruction + contrastive).

    ``builder`` (the prepared TFDS builder) supplies the spectrum lengths for ``"molspectra"``.
    """
    task = config.get("task", "denoise")
    model = models.get_model(config.model)
    note_message_passing(config)
    if task == "denoise":
        trainer = Trainer(config, model, mesh)
    elif task == "molspectra":
        trainer = molspectra.MolSpectraTrainer(
            config,
            model,
            mesh,
            spectrum_lengths=molspectra.spectrum_lengths(config, builder),
            grids=molspectra.dataset_grids(builder),
        )
    else:
        raise ValueError(f"unknown config.task {task!r}; use one of {TASKS}")
    trainer.check()
    return trainer


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: tuple[str, ...] = (),
    checkpoint_every_minutes: float = 30.0,
) -> dict[str, Any]:
    """Runs (or resumes) pre-training (``config.task``); returns a summary of the run.

    Args:
      allow_config_change: config keys (or prefixes) that may differ from the config the
        checkpoint being resumed was written with (``--allow_config_change``); others refuse
        to resume (:func:`run_config.check_resume`).
      checkpoint_every_minutes: also checkpoint when this much wall-clock time has passed
        since the last save (0 = only ``config.checkpoint_every``).

    Raises:
      stopping.Stopped: SIGINT/SIGTERM arrived; a checkpoint of the current step was saved.
    """
    run_config.check_values(config)  # before touching any data
    if config.get("task", "denoise") == "denoise":
        check_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh()
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    config_json, changed = json.loads(config.to_json_best_effort()), []
    check = safeguards.resume_check(
        config_json, ckpt, allow_config_change,
        run_config.OPERATIONAL_KEYS + run_config.PRETRAIN_EVAL_KEYS, changed,
    )
    try:
        safeguards.check_latest_config(ckpt, check)  # a refused resume fails before any data is read
    except run_config.ConfigError:
        ckpt.close(quiet=True)
        raise

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
    trainer = make_trainer(config, mesh, builder)
    train_source = datasets.open_split(builder, "train")
    eval_source = datasets.open_split(builder, config.data.eval_split)
    spectra = tuple((s.name, s.length) for s in trainer.spectrum_specs)
    featurizer = pipeline.Featurizer(
        radius=config.model.cutoff + config.data.skin,
        max_z=config.model.max_z,
        dataset=config.data.dataset,
        spectra=spectra,
    )
    budget = choose_budget(config, builder, featurizer, train_source)
    note(
        f"devices: {jax.device_count()} ({jax.devices()[0].platform}), processes: "
        f"{jax.process_count()}; per-device budget: {budget}"
    )

    # Initialise from a batch-shaped dummy (the budget fixes every shape).
    dummy = graph.pack([], budget)
    state = trainer.init_state(jax.random.key(config.seed), dummy)
    note(f"model parameters: {count_params(state['params']):,}")
    num_slots = jax.device_count()
    slots = sharding.local_slots(trainer.data_sharding, num_slots)
    start_step, data_position, saved_config = 0, [0] * len(slots), None
    if ckpt.latest_step() is not None:
        start_step, state, saved_config, data = ckpt.restore(
            checkpoint.abstract_like(state), check_config=check, fallback=True
        )
        data_position = sharding.start_positions(data, slots, num_slots)
        note(f"resumed from step {start_step} (data position {data_position})")
    else:
        note(f"no checkpoint yet in {ckpt.directory}: starting from step 0")
        state = trainer.start_from_pretrained(state)
    safeguards.record_config(workdir, config_json, start_step, changed, saved_config)

    writer = metrics.MetricWriter(workdir, resume_step=start_step)
    if start_step == 0:
        writer.write_text("config", "```\n" + config.to_json_best_effort(indent=1) + "\n```")
    # One packed sub-stream per device slot: the global batch does not depend on the number of
    # processes (rule in mspec.data.sharding).
    train_iter = sharding.SlotBatchIterator(
        train_source,
        featurizer,
        budget,
        slots=slots,
        num_slots=num_slots,
        seed=config.seed,
        shuffle=True,
        repeat=True,
        start=data_position,
        prefetch=config.data.prefetch,
        num_threads=config.data.get("num_threads", 0),
        num_workers=config.data.get("num_workers", 0),
    )

    num_microbatches = microbatches(config)
    if config.get("microbatches", 1) == 0:
        note(
            f"microbatches: automatic -> {num_microbatches} sub-batch(es) of "
            f"~{config.batch_size / num_microbatches:.0f} molecules per step"
        )
    total = config.total_steps
    # Stop early (with a checkpoint) without changing the schedule, e.g. to fit a job time limit.
    stop = min(total, config.stop_after_step) if config.stop_after_step > 0 else total
    pending: list[dict] = []
    molecules, fills = 0.0, []
    prog = progress.Progress(start_step, total)
    summary: dict[str, Any] = {"start_step": start_step, "microbatches": num_microbatches}
    step = start_step
    failed = True
    with stopping.StopSignals() as signals:
        extra = stopping.ExtraSaves(signals, checkpoint_every_minutes, config.log_every)
        try:
            while step < stop:
                sub_batches = [next(train_iter) for _ in range(num_microbatches)]
                for sub in sub_batches:
                    f = pipeline.fill(sub)
                    molecules += f["molecules"]
                    fills.append(f["node_fill"])
                if num_microbatches == 1:
                    global_batch = trainer.global_batch(sub_batches[0])
                else:
                    global_batch = trainer.global_batch(
                        stack_microbatches(sub_batches), microbatched=True
                    )
                state, measurements = trainer.update_fn(state, global_batch)
                pending.append(measurements)
                step += 1
                ckpt.poll()  # a failed background save stops the run now, not at the next save

                if step % config.log_every == 0 or step == stop:
                    means = safeguards.mean_measurements(pending, step, ckpt)
                    rate, eta = prog.interval(step, molecules * jax.process_count())
                    means["train/molecules_per_s"] = rate
                    means["train/node_fill"] = float(np.mean(fills))
                    writer.write(step, {f"train/{k}" if "/" not in k else k: v for k, v in means.items()})
                    note(
                        f"step {step}/{total} | loss {means['loss']:.4f} | lr {means['lr']:.2e} | "
                        f"{rate:.1f} mol/s | node fill {means['train/node_fill']:.2f} | "
                        f"ETA {progress.format_eta(eta)}"
                    )
                    summary["train_loss"] = means["loss"]
                    pending, molecules, fills = [], 0.0, []

                save_now, stop_now = extra.check(step)
                if step % config.eval_every == 0 or (step == stop and not stop_now):
                    ev = trainer.evaluate(
                        state, eval_source, featurizer, budget, step=step, writer=writer, workdir=workdir
                    )
                    writer.write(step, ev)
                    note(
                        f"step {step} | validation: "
                        + ", ".join(f"{k[5:]} {v:.4g}" for k, v in ev.items() if k.startswith("eval/"))
                    )
                    summary.update(ev)
                    prog.pause()  # Evaluation time is not training throughput.

                if safeguards.end_of_step_save(
                    ckpt, writer, extra, step, state, config_json,
                    lambda: sharding.global_state(train_iter.state()),
                    periodic=step % config.checkpoint_every == 0 or step == stop,
                    save_now=save_now, stop_now=stop_now,
                ):
                    prog.pause()
            failed = False
        finally:
            train_iter.close()
            ckpt.close(quiet=failed)
            writer.close()
    summary.update(
        {"final_step": step, "compilations": trainer.traces, "budget": dataclasses.asdict(budget)}
    )
    note(f"done: step {step}; the train step compiled {trainer.traces} time(s)")
    logging.info("summary: %s", summary)
    return summary
