"""Worker for tests/test_multihost.py: loss and gradients of the first global batch(es).

    ./launch.sh cpu --processes 2 tests.multihost_worker --data_dir D --out grads.npz
    JAX_NUM_CPU_DEVICES=4 ./launch.sh local tests.multihost_worker --data_dir D --out grads.npz

Builds the batches exactly as ``train_and_evaluate`` does (same budget, per-device-slot streams,
``Trainer.global_batch``) and, for each of the first ``--batches`` global batches, evaluates
``value_and_grad`` of the training loss at the initial parameters. Process 0 writes the losses
and the (replicated) gradients to ``--out``. ``--fail_on_process K`` raises in process K after
the first batch instead (to test failure propagation).
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--fail_on_process", type=int, default=-1)
    args = parser.parse_args(argv)

    from mspec.training import distributed

    distributed.initialize()

    import jax
    import numpy as np

    from experiments.configs import pretrain_frad
    from mspec import graph, models
    from mspec.data import datasets, pipeline, sharding
    from mspec.training import train

    c = pretrain_frad.get_config("tiny")
    c.data.data_dir = args.data_dir
    c.model.hidden, c.model.num_layers, c.batch_size = 32, 1, 8
    trainer = train.Trainer(c, models.get_model(c.model), train.make_mesh())
    builder = datasets.get_builder(c.data.dataset, c.data.data_dir, build=False)
    source = datasets.open_split(builder, "train")
    featurizer = pipeline.Featurizer(radius=c.model.cutoff + c.data.skin, max_z=c.model.max_z)
    budget = train.choose_budget(c, builder, featurizer, source)
    num_slots = jax.device_count()
    it = sharding.SlotBatchIterator(
        source,
        featurizer,
        budget,
        slots=sharding.local_slots(trainer.data_sharding, num_slots),
        num_slots=num_slots,
        seed=c.seed,
        shuffle=True,
        repeat=True,
    )
    state = trainer.init_state(jax.random.key(c.seed), graph.pack([], budget))
    loss_and_grad = jax.jit(jax.value_and_grad(trainer._loss, has_aux=True))
    out = {}
    for b in range(args.batches):
        batch = trainer.global_batch(next(it))
        (loss, _), grads = loss_and_grad(
            state["params"], jax.random.key(b), batch, state["normalizer"]
        )
        out[f"loss/{b}"] = np.asarray(jax.device_get(loss))
        for path, g in jax.tree_util.tree_leaves_with_path(jax.device_get(grads)):
            out[f"grad/{b}/{jax.tree_util.keystr(path)}"] = np.asarray(g)
        if b == 0 and jax.process_index() == args.fail_on_process:
            raise ValueError(f"deliberate failure in process {args.fail_on_process}")
    it.close()
    if jax.process_index() == 0:
        np.savez(args.out, **out)
    print(f"worker {jax.process_index()}/{jax.process_count()} done", file=sys.stderr)


if __name__ == "__main__":
    main()
