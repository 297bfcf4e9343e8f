"""The denoising trainer (Frad / Coord, stage 1) and the set-up helpers every trainer shares.

:class:`Trainer` owns the state, the jitted update and the evaluation of ``config.task ==
"denoise"``; :class:`mspec.training.molspectra.MolSpectraTrainer` (stage 2) subclasses it. The
loop that drives them (resume, cadence, checkpoints) is :mod:`mspec.training.loop`.

One jitted ``update_fn(state, batch)`` runs noise, model, loss and AdamW for a global batch
``[D, ...]`` sharded over a 1-D ``Mesh`` axis ``"data"`` (parameters replicated); XLA inserts the
gradient all-reduce, so the same code runs on 1 CPU, 8 GPUs or a TPU pod slice. Batches have
static shapes, so the step compiles once per run.

Resume order: the latest checkpoint in ``workdir/checkpoints`` if any, else a fresh start (for
stage 2: from ``config.init_from``, see :meth:`Trainer.start_from_pretrained`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mspec import graph, losses, noise
from mspec.kernels import host_malloc
from mspec.data import pipeline, sharding
from mspec.models import Model
from mspec.training import progress, run_config, schedules
from mspec.training import step as shared_step

BUDGET_SAMPLE = 1000  # molecules used to estimate mean atoms / edges for the static budgets


# --------------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------------


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def note_message_passing(config: ml_collections.ConfigDict) -> None:
    """Prints which message-passing implementation ``config.model.message_passing`` runs here
    (for a backbone other than the ET: that it runs XLA ops and ignores the ET's settings)."""
    from mspec.kernels import message as kernel_message
    from mspec.models import ET_ONLY, precision

    backbone = config.model.get("name", "et")
    if backbone != "et":
        note(f"backbone: {backbone} (XLA ops; the ET-only settings {', '.join(ET_ONLY)} are ignored)")
        return
    chosen = config.model.get("message_passing", "xla")
    dtype = precision.compute_dtype(config.model.get("dtype", "float32")) or "float32"
    if chosen == "xla":
        note("message passing: XLA ops (model.message_passing='xla')")
    elif kernel_message.use_fused(chosen, dtype):
        note(f"message passing: fused CPU kernels (model.message_passing={chosen!r})")
    elif jax.default_backend() != "cpu":
        note(f"message passing: XLA ops (model.message_passing={chosen!r} on {jax.default_backend()})")
    else:
        note(f"message passing: XLA ops (model.message_passing={chosen!r}; the fused kernels do "
             "not run here, see the warning above)")


def choose_budget(config, builder, featurizer, train_source) -> graph.Budget:
    """Static per-device budgets from dataset statistics (mean of a sample, dataset maxima).

    Spectra (if the featurizer carries any) have static lengths; they become part of the budget.
    """
    n = min(BUDGET_SAMPLE, len(train_source))
    sample = [featurizer(train_source[i]) for i in range(n)]
    stats = pipeline.molecule_stats(sample)
    meta = dict(builder.info.metadata or {})
    max_nodes = int(meta.get("num_atoms_max", stats["max_nodes"]))
    max_torsions = int(meta.get("num_torsions_max", stats["max_torsions"]))
    # Each device packs batch_size / (devices x microbatches) molecules per sub-batch.
    per_device = max(1, math.ceil(config.batch_size / (jax.device_count() * microbatches(config))))
    return graph.budget_from_stats(
        mean_nodes=stats["mean_nodes"],
        mean_edges=stats["mean_edges"],
        max_nodes=max_nodes,
        # Every pair of the largest molecule may be within the radius.
        max_edges=max_nodes * max_nodes,
        max_torsions=max_torsions,
        molecules_per_device=per_device,
        slack=config.data.budget_slack,
        spectra=featurizer.spectra,
    )


def perturb(config, rng: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Noisy positions and the regression target (Å) for one device batch."""
    nz = config.noise
    if nz.type == "coord":
        return noise.coord_noise(rng, batch["positions"], batch["node_mask"], nz.tau)
    if nz.type == "frad":
        return noise.frad_noise(
            rng,
            batch["positions"],
            batch["node_mask"],
            batch["node_graph"],
            batch["torsion_atoms"],
            batch["torsion_mask"],
            batch["node_moving"],
            sigma_deg=nz.sigma_deg,
            tau=nz.tau,
            fractional=nz.fractional,
        )
    raise ValueError(f"unknown noise type {nz.type!r}; use 'frad' or 'coord'")


def check_config(config) -> None:
    """Fails early with a clear message (:class:`run_config.ConfigError`) on values the step
    would otherwise reject late."""
    run_config.check_values(config)
    if config.noise.type not in ("frad", "coord"):
        raise run_config.ConfigError(f"config.noise.type must be 'frad' or 'coord', got {config.noise.type!r}")
    if config.loss.target_normalization not in ("tau", "running", "none"):
        raise run_config.ConfigError(
            "config.loss.target_normalization must be 'tau', 'running' or 'none', got "
            f"{config.loss.target_normalization!r}"
        )
    if "noise" not in config.model.heads:
        raise run_config.ConfigError("denoising pre-training needs the 'noise' head in config.model.heads")
    k = microbatches(config)
    if k > 1 and config.loss.target_normalization == "running":
        raise run_config.ConfigError(
            f"config.microbatches={k} needs a target normaliser that does not depend on the "
            "batch: use config.loss.target_normalization='tau' or 'none' (the 'running' "
            "normaliser is updated once per step from the whole batch)"
        )


def per_device(fn, mesh, in_specs, out_specs):
    """``jax.shard_map(fn, mesh=mesh, in_specs=..., out_specs=...)``, or ``fn`` itself when the
    mesh has one device.

    On one device the shard_map computes the same thing, but its backward pass all-reduces the
    cotangent of every replicated input (all parameter gradients) over that single device: a
    copy of every gradient per (sub-)batch, about 8 ms of the qm9 config's step on the 2-core
    CPU. ``fn`` must use no collectives (none of the objectives here do).
    """
    if mesh.size == 1:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


# With config.microbatches = 0 (automatic), a CPU device packs at most this many molecules per
# sub-batch. Measured at batch 128 on 2 cores with the fused kernel (BENCHMARKS.md): 1, 2, 4 or 8
# sub-batches peak at 2.5, 1.85, 1.45 and 1.3 GB, and 4 sub-batches of 32 ran at 64-79 mol/s
# against 53-71 for one batch of 128 (faster in each of 14 paired runs) (2, 4 and 8 within noise of each other).
AUTO_CPU_SUBBATCH_MOLECULES = 32


def auto_microbatches(batch_size: int, num_devices: int, platform: str) -> int:
    """Sub-batches per step chosen by ``config.microbatches = 0``.

    On CPU, enough sub-batches that each device packs at most
    :data:`AUTO_CPU_SUBBATCH_MOLECULES` molecules at a time: there as fast or faster than one
    batch, at a fraction of the memory. On accelerators, 1: large batches keep them busy.
    """
    if platform != "cpu":
        return 1
    per_device = math.ceil(batch_size / max(1, num_devices))
    return max(1, math.ceil(per_device / AUTO_CPU_SUBBATCH_MOLECULES))


def microbatches(config) -> int:
    """``config.microbatches`` resolved: sub-batches per step, >= 1 (1 when the key is absent).

    0 means automatic (:func:`auto_microbatches`; 1 with the ``running`` target normaliser, which
    needs whole batches). A negative or non-integer value is a ``ValueError``.
    """
    k = config.get("microbatches", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise run_config.ConfigError(
            f"config.microbatches must be an integer >= 1, or 0 for automatic, got {k!r}"
        )
    if k == 0:
        if config.get("loss", {}).get("target_normalization") == "running":
            return 1
        return auto_microbatches(config.batch_size, jax.device_count(), jax.devices()[0].platform)
    return k


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trainer:
    """Builds the jitted train/eval steps for one config and mesh."""

    config: ml_collections.ConfigDict
    model: Model
    mesh: jax.sharding.Mesh
    traces: int = 0

    def __post_init__(self):
        host_malloc.warn_if_untuned(self.mesh.devices.flat[0].platform)
        self.tx, self.schedule = schedules.make_optimizer(self.config.optim, self.config.total_steps)
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        # Micro-batched steps take [K, D, ...]: K sub-batches, each sharded like one batch.
        self.microbatch_sharding = NamedSharding(self.mesh, P(None, "data"))
        self.replicated = NamedSharding(self.mesh, P())
        self.update_fn = jax.jit(self._update, donate_argnums=(0,))
        self.eval_fn = jax.jit(self._eval)

    def _device_forward(self, params, keys, batch):
        """Noise, in-step edge filter and model for the device batches held by one device.

        Runs under ``shard_map``: ``keys [L]`` and ``batch [L, ...]`` are this device's rows of
        the global batch (L = 1 when there is one device batch per device). The rows are
        processed with ``lax.map``, not ``vmap``: a batched gather/scatter is several times
        slower on XLA:CPU than the plain per-molecule-graph one.

        Returns:
          ``(pred [L, N, 3], target [L, N, 3])``: predicted noise and the noise target in Å.
        """

        def one(args):
            out, target = self.apply_noisy(params, *args)
            return out["noise"], target

        return jax.lax.map(one, (keys, batch))

    def apply_noisy(self, params, key: jax.Array, b: dict) -> tuple[dict, jax.Array]:
        """Perturbs one device batch, re-applies the cutoff and neighbour cap to the noisy
        positions, and runs the model on them: ``(model outputs, noise target [N, 3] in Å)``."""
        noisy, target = perturb(self.config, key, b)
        edge_mask = graph.active_edges(
            noisy,
            b["senders"],
            b["receivers"],
            b["edge_mask"],
            self.config.model.cutoff,
            self.config.data.max_neighbors,
        )
        out = self.model.apply({"params": params}, {**b, "positions": noisy, "edge_mask": edge_mask})
        return out, target

    def _forward(self, params, rng, batch):
        """Predicted and target noise ``[D, N, 3]`` for a global batch; each device its own rows."""
        n_dev = batch["node_mask"].shape[0]
        keys = jax.random.split(rng, n_dev)
        return per_device(
            self._device_forward,
            self.mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=(P("data"), P("data")),
        )(params, keys, batch)

    def _loss(self, params, rng, batch, stats):
        pred, target_a = self._forward(params, rng, batch)
        mode = self.config.loss.target_normalization
        if mode == "running":
            stats = losses.running_stats_update(stats, target_a, batch["node_mask"])
        target = losses.denoising_target(target_a, mode, tau=self.config.noise.tau, stats=stats)
        # Sums and counts over the whole global batch: normalised by the global atom count.
        mse = losses.denoising_mse(pred, target, batch["node_mask"])
        return self.config.loss.denoising_weight * mse, (mse, stats)

    def loss_and_grads(self, params, rng, batch, stats):
        """``((loss, (mse, stats)), grads)`` of one step's batch.

        With ``config.microbatches = K > 1`` the batch is ``[K, D, ...]`` (K sub-batches, as
        :meth:`global_batch` builds it) and the gradient is accumulated over them in a
        ``lax.scan``: each sub-batch's loss is weighted by its share of the real atoms of the
        whole step, so loss and gradients are those of one batch holding all K sub-batches
        (tested), while only one sub-batch's activations are alive at a time.
        """
        if microbatches(self.config) == 1:
            return jax.value_and_grad(self._loss, has_aux=True)(params, rng, batch, stats)
        # Checked in check_config: the target normaliser does not depend on the batch here.
        counts = jnp.sum(batch["node_mask"], axis=tuple(range(1, batch["node_mask"].ndim)))
        shares = counts / jnp.maximum(jnp.sum(counts), 1)  # [K]

        def sub_batch_loss(p, key, sub):
            loss, (mse, _) = self._loss(p, key, sub, stats)
            return loss, mse

        (loss, mse), grads = shared_step.accumulated_value_and_grad(
            sub_batch_loss, params, rng, batch, shares)
        return (loss, (mse, stats)), grads

    def _update(self, state, batch):
        return shared_step.update(self, state, batch)

    def objective_and_grads(self, state, rng, batch):
        """The step's loss, measurements, carried state and gradients (:func:`step.update`)."""
        (loss, (mse, stats)), grads = self.loss_and_grads(
            state["params"], rng, batch, losses.RunningStats(*state["normalizer"])
        )
        return (loss, ({"denoising_mse": mse}, {"normalizer": tuple(stats)})), grads

    def _eval(self, params, normalizer, batch, rng):
        """Summed squared error and count, so the validation mean is exact over all batches."""
        pred, target_a = self._forward(params, rng, batch)
        target = losses.denoising_target(
            target_a,
            self.config.loss.target_normalization,
            tau=self.config.noise.tau,
            stats=losses.RunningStats(*normalizer),
        )
        w = batch["node_mask"].astype(jnp.float32)[..., None]
        return jnp.sum(w * jnp.square(pred - target)), 3.0 * jnp.sum(w)

    # ---- hooks that other objectives (e.g. mspec.training.molspectra) override -----------------

    spectrum_specs = ()  # spectra this objective reads from the batch (none here; not a field)

    def check(self) -> None:
        """Validates the config for this objective (called before any data is read)."""
        check_config(self.config)

    def start_from_pretrained(self, state: dict) -> dict:
        """Initialisation from another run, for a fresh (not resumed) run; none here."""
        return state

    def evaluate(self, state, eval_source, featurizer, budget, *, step, writer, workdir) -> dict:
        """Validation measurements (``eval/...``); may also write pictures."""
        del step, writer, workdir
        return evaluate(self, state, eval_source, featurizer, budget)


    def init_state(self, rng, device_batch: dict) -> dict:
        params = jax.jit(self.model.init)(rng, device_batch)["params"]
        state = {
            "params": params,
            "opt": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "normalizer": tuple(losses.running_stats_init()),
        }
        return jax.device_put(state, self.replicated)

    def global_batch(self, local_batch: dict, *, microbatched: bool = False) -> dict:
        """Per-process rows ``[D_local, ...]`` -> one global array ``[D, ...]`` sharded on "data".

        With ``microbatched=True`` the rows are ``[K, D_local, ...]`` (:func:`stack_microbatches`,
        the train step's input when ``config.microbatches > 1``) and become ``[K, D, ...]``,
        sharded on the second axis.
        """
        sharding = self.microbatch_sharding if microbatched else self.data_sharding
        return {
            k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()
        }


def stack_microbatches(sub_batches: list[dict]) -> dict:
    """K process-local batches ``[D_local, ...]`` -> ``[K, D_local, ...]`` for one step."""
    return {k: np.stack([b[k] for b in sub_batches]) for k in sub_batches[0]}


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def model_math(model_config: dict | None) -> dict | None:
    """The model config without the keys that change how, not what, it computes."""
    if model_config is None:
        return None
    return {k: v for k, v in model_config.items() if k != "message_passing"}


note = progress.note  # used by the other training modules as train.note


def eval_batches(trainer: Trainer, eval_source, featurizer, budget) -> sharding.SlotBatchIterator:
    """Process-local validation batches, in a fixed order, that never run out.

    Every process must run the same number of (collective) eval steps, whatever its share of the
    molecules: exhausted slots yield padding, and the caller stops at the first global batch
    without a molecule.
    """
    num_slots = jax.device_count()
    return sharding.SlotBatchIterator(
        eval_source,
        featurizer,
        budget,
        slots=sharding.local_slots(trainer.data_sharding, num_slots),
        num_slots=num_slots,
        seed=trainer.config.seed,
        shuffle=False,
        repeat=False,
        limit=trainer.config.data.eval_max_molecules or None,
        pad_forever=True,
    )


def evaluate(trainer: Trainer, state, eval_source, featurizer, budget) -> dict[str, float]:
    """Denoising loss over the validation molecules, with fixed noise (comparable across evals)."""
    cfg = trainer.config
    it = eval_batches(trainer, eval_source, featurizer, budget)
    sq, count = 0.0, 0.0
    base = jax.random.key(cfg.seed + 1_000_003)
    try:
        for i, local in enumerate(it):
            s, c = trainer.eval_fn(
                state["params"],
                state["normalizer"],
                trainer.global_batch(local),
                jax.random.fold_in(base, i),
            )
            if float(c) == 0.0:
                break
            sq, count = sq + float(s), count + float(c)
    finally:
        it.close()
    return {"eval/denoising_mse": sq / max(count, 1.0), "eval/atoms": count / 3.0}
