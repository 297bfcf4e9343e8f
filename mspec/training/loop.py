"""The training loop, the only one: ``train_and_evaluate(config, workdir)`` for every task.

``config.task`` picks the task (:mod:`mspec.training.tasks`): pre-training (``"denoise"``: Frad /
Coord; ``"molspectra"``: stage 2) or fine-tuning (``"qm9"``, ``"md17"``). The task supplies the
data, the jitted step, the validation and the end of the run; this loop supplies the rest:

1. the config checks, before any data is read, and the refusal to resume a checkpoint written
   with a different config (:func:`mspec.training.safeguards.resume_check`);
2. the resume order: the latest checkpoint in ``workdir/checkpoints`` (falling back to an older
   complete one if the latest is damaged), else a fresh start (the task's own: stage 2 from
   ``config.init_from``, fine-tuning from ``config.init.checkpoint``, else random);
3. the cadence: a log line and metrics every ``log_every`` steps, validation every
   ``eval_every`` steps, a checkpoint every ``checkpoint_every`` steps and every
   ``checkpoint_every_minutes``, and at the last step (``total_steps``, or ``stop_after_step``);
4. SIGINT / SIGTERM: a checkpoint of the current step, then :class:`stopping.Stopped`; a
   non-finite loss stops the run without saving the diverged state
   (:func:`mspec.training.safeguards.mean_measurements`);
5. the summary (and the task's end: fine-tuning evaluates its last and best checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections

from mspec.training import checkpoint, metrics, progress, run_config, safeguards, stopping, tasks, train
from mspec.training.progress import note


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: tuple[str, ...] = (),
    checkpoint_every_minutes: float = 30.0,
) -> dict[str, Any]:
    """Runs (or resumes) ``config.task`` in ``workdir``; returns a summary of the run.

    Args:
      allow_config_change: config keys (or prefixes) that may differ from the config the
        checkpoint being resumed was written with (``--allow_config_change``); others refuse
        to resume (:func:`run_config.check_resume`).
      checkpoint_every_minutes: also checkpoint when this much wall-clock time has passed
        since the last save (0 = only ``config.checkpoint_every``).

    Returns:
      ``start_step``, ``final_step``, ``train_loss`` (the last logged), the last validation's
      scalars, ``compilations`` (of the train step), and the task's own entries (fine-tuning:
      ``results``, the content of ``results.json``, once training finished).

    Raises:
      stopping.Stopped: SIGINT/SIGTERM arrived; a checkpoint of the current step was saved.
    """
    task_class = tasks.task_class(config)
    task_class.check(config)  # before touching any data
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    config_json, changed = json.loads(config.to_json_best_effort()), []
    check = safeguards.resume_check(config_json, ckpt, allow_config_change,
                                    task_class.operational_keys, changed)
    try:
        safeguards.check_latest_config(ckpt, check)  # a refused resume fails before any data is read
    except run_config.ConfigError:
        ckpt.close(quiet=True)
        raise

    task, writer, failed = None, None, True
    try:
        task = task_class(config, train.make_mesh(), config_json)
        start_step, data, saved_config = 0, None, None
        if ckpt.latest_step() is not None:
            start_step, state, saved_config, data = ckpt.restore(
                task.abstract_state(), check_config=check, fallback=True
            )
            note(f"resumed from step {start_step}")
        else:
            note(f"no checkpoint yet in {ckpt.directory}: starting from step 0")
            state = task.start()
        safeguards.record_config(workdir, config_json, start_step, changed, saved_config)
        task.open_batches(data)
        writer = metrics.MetricWriter(workdir, resume_step=start_step)
        if start_step == 0:
            writer.write_text("config", "```\n" + config.to_json_best_effort(indent=1) + "\n```")
        summary, step = _run(config, task, state, ckpt, writer, workdir, start_step,
                             checkpoint_every_minutes)
        failed = False
    finally:
        if task is not None:
            task.close(failed)
        ckpt.close(quiet=failed)
        if writer is not None:
            writer.close()
    summary["compilations"] = task.trainer.traces
    finished = step >= config.total_steps
    if finished:
        note(f"done: step {step}; the train step compiled {task.trainer.traces} time(s)")
    else:
        note(f"stopped at step {step} of {config.total_steps} (stop_after_step); rerun to continue")
    summary = task.finish(summary, workdir, finished)
    logging.info("summary: %s", summary)
    return summary


def _run(config, task, state, ckpt, writer, workdir, start_step, checkpoint_every_minutes):
    total = config.total_steps
    # Stop early (with a checkpoint) without changing the schedule, e.g. to fit a job time limit.
    stop = min(total, config.stop_after_step) if config.stop_after_step > 0 else total
    pending: list[dict] = []
    counts: dict[str, list[float]] = {}
    prog = progress.Progress(start_step, stop)
    summary: dict[str, Any] = {"start_step": start_step}
    step = start_step
    with stopping.StopSignals() as signals:
        extra = stopping.ExtraSaves(signals, checkpoint_every_minutes, config.log_every)
        while step < stop:
            batch, batch_counts = task.next_batch()
            for k, v in batch_counts.items():
                counts.setdefault(k, []).append(v)
            state, measurements = task.trainer.update_fn(state, batch)
            pending.append(measurements)
            step += 1
            ckpt.poll()  # a failed background save stops the run now, not at the next save

            if step % config.log_every == 0 or step == stop:
                means = safeguards.mean_measurements(pending, step, ckpt)
                rate, eta = prog.interval(step, sum(counts.pop("molecules", [])) * jax.process_count())
                scalars = {f"train/{k}" if "/" not in k else k: v for k, v in means.items()}
                scalars["train/molecules_per_s"] = rate
                fill = ""
                if "node_fill" in counts:
                    scalars["train/node_fill"] = sum(counts["node_fill"]) / len(counts["node_fill"])
                    fill = f" | node fill {scalars['train/node_fill']:.2f}"
                writer.write(step, scalars)
                note(
                    f"step {step}/{total} | loss {means['loss']:.5g} | lr {means['lr']:.2e} | "
                    f"{rate:.1f} mol/s{fill} | ETA {progress.format_eta(eta)}"
                )
                summary["train_loss"] = means["loss"]
                pending, counts = [], {}

            save_now, stop_now = extra.check(step)
            if step % config.eval_every == 0 or (step == stop and not stop_now):
                state, scalars, text = task.validate(state, step, writer, workdir)
                writer.write(step, scalars)
                note(f"step {step} | {text}")
                summary.update(scalars)
                prog.pause()  # Validation time is not training throughput.

            if safeguards.end_of_step_save(
                ckpt, writer, extra, step, state, task.config_json, task.data_state,
                periodic=step % config.checkpoint_every == 0 or step == stop,
                save_now=save_now, stop_now=stop_now,
            ):
                prog.pause()
    summary["final_step"] = step
    return summary, step
