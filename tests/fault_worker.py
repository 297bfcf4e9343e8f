"""Worker for tests/test_faults.py: runs an experiment entry point with one injected fault.

    python -m tests.fault_worker FAULT@STEP MODULE [MODULE ARGS...]
    python -m tests.fault_worker kill_mid_step@5 experiments.pretrain --config ... --workdir W

Faults (the process ends the way a real fault would end it; nothing is cleaned up):

``kill_mid_step@N``      SIGKILL while step N is computing (dispatched, not finished).
``kill_in_save@N``       SIGKILL inside the save of ``checkpoints/N``: every file written, the
                         final rename of ``N.orbax-checkpoint-tmp`` not done yet.
``kill_before_save@N``   SIGKILL when the periodic save of step N starts (for fine-tuning: after
                         ``best/N`` is written, before ``checkpoints/N``).
``sigterm@N``            SIGTERM to itself during step N (a preemption notice).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def _kill(signum=signal.SIGKILL) -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signum)


def _wrap_update(cls, step: int, signum) -> None:
    """Makes ``cls``'s jitted update send ``signum`` while step ``step`` is computing."""
    post_init = cls.__post_init__

    def patched(self):
        post_init(self)
        update = self.update_fn

        def update_fn(state, batch):
            new_step = int(state["step"]) + 1  # read before the state is donated
            out = update(state, batch)
            if new_step == step:
                _kill(signum)
            return out

        self.update_fn = update_fn

    cls.__post_init__ = patched


def install(fault: str) -> None:
    kind, _, at = fault.partition("@")
    step = int(at)
    from mspec.training import checkpoint, finetune, train

    if kind in ("kill_mid_step", "sigterm"):
        signum = signal.SIGKILL if kind == "kill_mid_step" else signal.SIGTERM
        for cls in (train.Trainer, finetune.FinetuneTrainer):
            _wrap_update(cls, step, signum)
    elif kind == "kill_in_save":
        from orbax.checkpoint._src.path import async_path

        rename = async_path.rename

        async def dying_rename(src, dst):
            if str(src).endswith(f"checkpoints/{step}.orbax-checkpoint-tmp"):
                _kill()
            return await rename(src, dst)

        async_path.rename = dying_rename
    elif kind == "kill_before_save":
        save = checkpoint.Checkpointer.save

        def dying_save(self, s, *args, **kwargs):
            if s == step and self.directory.endswith("checkpoints"):
                _kill()
            return save(self, s, *args, **kwargs)

        checkpoint.Checkpointer.save = dying_save
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def main() -> None:
    fault, module_name, *args = sys.argv[1:]
    # Patches must survive: no re-exec for huge pages.
    os.environ["MSPEC_MALLOC_TUNING"] = "0"
    install(fault)
    from mspec.training import cli

    module = importlib.import_module(module_name)
    sys.argv = [module_name, *args]
    cli.run(module.main)


if __name__ == "__main__":
    main()
