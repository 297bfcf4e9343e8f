"""Denoising pre-training (Frad / Coord) entry point.

    python -m experiments.pretrain --config experiments/configs/pretrain_frad.py --workdir runs/frad
    python -m experiments.pretrain --config experiments/configs/pretrain_frad.py:tiny \
        --workdir runs/tiny --config.optim.lr=1e-4

Re-running with the same --workdir resumes from its latest checkpoint. Multi-process runs (TPU
pod slices, Slurm, N local processes) are started with ./launch.sh; the processes find each other
through the MSPEC_* environment variables of mspec.training.distributed.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mspec.training import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to an experiments/configs/*.py file, optionally with ':variant'.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
cli.define_run_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # orbax and TFDS log every file operation at INFO; progress lines come from mspec itself.
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
