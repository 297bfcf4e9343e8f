"""Fine-tuning entry point (QM9 properties, MD17 energies and forces).

    python -m experiments.finetune --config experiments/configs/finetune_qm9.py:homo --workdir runs/ft_homo \
        --config.init.checkpoint=runs/frad
    python -m experiments.finetune --config experiments/configs/finetune_md17.py:aspirin --workdir runs/ft_aspirin

Re-running with the same --workdir resumes from its latest checkpoint. At the end the last and
best-validation checkpoints are evaluated (results.json, parity_*.png in the workdir).
Multi-process runs are started with ./launch.sh, as pre-training's: the global batch, and so the
run, does not depend on the number of processes.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mspec.training import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to experiments/configs/finetune_*.py, optionally with ':variant'.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, metrics and results.")
cli.define_run_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from mspec.training import distributed

    # Before anything touches a JAX device: joins the other processes of a multi-process run.
    distributed.initialize()
    from mspec.training import loop

    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, **cli.run_options())


if __name__ == "__main__":
    from mspec.kernels import host_malloc

    host_malloc.reexec_with_hugepages()  # first: glibc reads its tunables at start-up only
    cli.run(main)
