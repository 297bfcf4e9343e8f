"""Evaluates a fine-tuning workdir: last and best-validation checkpoints on validation and test.

    python -m experiments.evaluate --workdir runs/ft_homo
    python -m experiments.evaluate --workdir runs/ft_homo --which=best --splits=test

Writes workdir/results.json and workdir/parity_<which>.png and prints the test MAEs beside the
published numbers. The run's config is read from workdir/config.json.
"""

from absl import app, flags, logging

from mspec.training import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A fine-tuning workdir (holds config.json, checkpoints/, best/).")
flags.DEFINE_list("which", ["last", "best"], "Checkpoints to evaluate: last, best.")
flags.DEFINE_list("splits", ["validation", "test"], "Splits to evaluate: validation, test.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    bad = set(FLAGS.which) - {"last", "best"} or set(FLAGS.splits) - {"validation", "test"}
    if bad:
        raise app.UsageError(f"unknown --which/--splits values {sorted(bad)}")
    from mspec.training import finetune

    finetune.evaluate_workdir(FLAGS.workdir, which=tuple(FLAGS.which), roles=tuple(FLAGS.splits))


if __name__ == "__main__":
    from mspec.kernels import host_malloc

    host_malloc.reexec_with_hugepages()  # first: glibc reads its tunables at start-up only
    cli.run(main)
