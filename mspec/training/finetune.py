"""Fine-tuning on QM9 properties or MD17 energies and forces, and evaluation in the papers' units.

The fine-tuning trainer, its set-up (:func:`build`), prediction and model-selection metric, and
:func:`evaluate_workdir`. The loop is :func:`mspec.training.loop.train_and_evaluate` (with
:class:`mspec.training.tasks.Finetuning`): it trains (or resumes), keeps the last checkpoints in
``workdir/checkpoints`` and the best-validation one in ``workdir/best``, then evaluates both on
the validation and test splits and writes ``workdir/results.json`` and parity plots
(:mod:`mspec.training.evaluation`).

The step (one jitted function over a global batch ``[D, ...]`` sharded on the ``"data"`` mesh
axis, per-device ``shard_map`` + ``lax.map`` as in :mod:`mspec.training.train`):

* **QM9** (``config.task = "qm9"``): training inputs get Coord noise (τ = 0.005 Å) and the
  property is predicted from the noisy input (Noisy Nodes, ``docs/spec/frad.md`` §3.1). Loss =
  ``w_y MSE(ŷ, y) + w_dn MSE(noise head, noise / denoising_scale)`` in training units (eV, D, ...).
* **MD17** (``config.task = "md17"``): ``E = std Σ_i h_i + mean`` and ``F = -∂E/∂positions``,
  computed with ``jax.value_and_grad`` inside the differentiated loss (so training differentiates
  through the force). Loss = ``w_E L(E)^ema + w_F L(F)`` with ``L`` MSE or smooth-L1 and the
  optional Frad energy-loss EMA; optionally Frad's separate noisy-node pass (torsion + Cartesian
  noise, its own forward pass feeding only the denoising loss).

Targets are regressed as residuals ``y - offset`` (``offset`` = training mean, plus the QM9 atom
references when ``config.target.atomref``), computed in float64 on the host, so float32 on the
device never has to resolve total energies of thousands of eV.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mspec import graph, losses, models
from mspec.kernels import host_malloc
from mspec.data import datasets, pipeline, sharding
from mspec.models import count_params
from mspec.training import (checkpoint, downstream, evaluation, restore, run_config, schedules,
                            targets, train)
from mspec.training import step as shared_step

TASKS = tuple(downstream.KINDS)
HOST_PREFIX = "_"  # packed keys that stay on the host (float64 bookkeeping for evaluation)


# --------------------------------------------------------------------------------------------------
# Labels: featurise and pack
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabeledFeaturizer:
    """Adds the regression labels to :class:`mspec.data.pipeline.Featurizer`'s output.

    * ``target``: ``y - offset`` in float32 (``offset`` = standardiser mean + atom references),
    * ``forces [n, 3]`` (MD17, kcal/mol/Å),
    * host-only float64 ``_y`` (the raw label) and ``_ref`` (atom-reference sum, 0 without).
    """

    base: pipeline.Featurizer
    task: str
    target: str  # QM9 target name, or the MD17 molecule
    mean: float
    atomref: bool = False

    @property
    def spectra(self) -> tuple[tuple[str, int], ...]:
        """Spectra carried per molecule (none for fine-tuning; part of the batch budget)."""
        return self.base.spectra

    def raw_label(self, example) -> tuple[float, float]:
        """``(y, atom-reference sum)`` of one example, in training units (float64)."""
        if not downstream.of(self.task).forces:  # a QM9 label column
            column = targets.QM9_LABEL_COLUMNS.index(self.target)
            y = float(np.asarray(example["targets"], np.float64)[column])
            ref = targets.atomref_sum(self.target, example["atomic_numbers"]) if self.atomref else 0.0
            return y, ref
        return float(example["energy"]), 0.0

    def __call__(self, example) -> dict[str, np.ndarray]:
        mol = self.base(example)
        y, ref = self.raw_label(example)
        mol["target"] = np.float32(y - ref - self.mean)
        mol["_y"] = np.float64(y)
        mol["_ref"] = np.float64(ref)
        if downstream.of(self.task).forces:
            forces = np.asarray(example["forces"], np.float32)
            if forces.shape != mol["positions"].shape:
                raise pipeline.BadRecordError(
                    f"{self.base.dataset} frame {example.get('frame', '?')}: forces {forces.shape} "
                    f"vs positions {mol['positions'].shape}"
                )
            mol["forces"] = forces
        return mol


def pack_labeled(molecules, budget: graph.Budget, with_forces: bool = False) -> dict[str, np.ndarray]:
    """:func:`graph.pack` plus ``target [G]``, ``_y [G]``, ``_ref [G]`` and (``with_forces``)
    ``forces [N, 3]``; the keys never depend on the molecules (an empty batch has them too)."""
    batch = graph.pack(molecules, budget)
    G, N = budget.n_graph, budget.n_node
    batch["target"] = np.zeros(G, np.float32)
    batch["_y"] = np.zeros(G, np.float64)
    batch["_ref"] = np.zeros(G, np.float64)
    if with_forces:
        batch["forces"] = np.zeros((N, 3), np.float32)
    node = 0
    for g, mol in enumerate(molecules):
        n = len(mol["atomic_numbers"])
        batch["target"][g] = mol["target"]
        batch["_y"][g] = mol["_y"]
        batch["_ref"][g] = mol["_ref"]
        if with_forces:
            batch["forces"][node : node + n] = mol["forces"]
        node += n
    return batch


def split_host(batch: dict) -> tuple[dict, dict]:
    """``(device keys, host-only keys)`` of a packed global batch."""
    dev = {k: v for k, v in batch.items() if not k.startswith(HOST_PREFIX)}
    host = {k: v for k, v in batch.items() if k.startswith(HOST_PREFIX)}
    return dev, host


# --------------------------------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------------------------------


def check_config(config) -> None:
    """Fails early with a :class:`run_config.ConfigError` naming the key (before any data is read)."""
    run_config.check_values(config)
    if config.task not in TASKS:
        raise run_config.ConfigError(f"config.task must be one of {TASKS}, got {config.task!r}")
    kind = downstream.of(config.task)
    if not kind.forces and config.target.name not in targets.QM9_TARGETS:
        raise run_config.ConfigError(f"unknown QM9 target {config.target.name!r}; known: {targets.QM9_TARGETS}")
    if config.target.atomref and (kind.forces or config.target.name not in targets.QM9_ATOMREF_EV):
        raise run_config.ConfigError(f"config.target.atomref is only for QM9 {sorted(targets.QM9_ATOMREF_EV)}")
    try:
        head = models.property_head(config.model.heads)
    except ValueError as e:
        raise run_config.ConfigError(f"config.model.heads: fine-tuning {e}") from None
    prior = config.model.get("prior", "none")
    if prior not in models.PRIORS:
        raise run_config.ConfigError(f"config.model.prior must be one of {models.PRIORS}, got {prior!r}")
    if prior != "none" and head != "scalar":
        raise run_config.ConfigError(
            f"config.model.prior={prior!r} needs the 'scalar' head (torchmd-net allows no prior "
            f"with the {head!r} head)")
    if kind.forces and head != "scalar":
        raise run_config.ConfigError(f"MD17 needs the 'scalar' (energy) head, not {head!r}")
    if (config.model.get("separate_noise_vectors", False)
            and config.model.get("vector_norm", "whitened") != "whitened"):
        raise run_config.ConfigError(
            "config.model.separate_noise_vectors needs config.model.vector_norm='whitened'")
    if config.loss.denoising_weight > 0 and "noise" not in config.model.heads:
        raise run_config.ConfigError("config.loss.denoising_weight > 0 needs the 'noise' head")
    if config.loss.property_loss not in losses.PROPERTY_LOSSES:
        raise run_config.ConfigError(
            f"config.loss.property_loss must be one of {losses.PROPERTY_LOSSES}, got {config.loss.property_loss!r}")
    if not 0.0 < config.loss.energy_ema_alpha <= 1.0:
        raise run_config.ConfigError("config.loss.energy_ema_alpha must be in (0, 1]")
    if kind.forces and config.loss.denoising_weight > 0 and not config.loss.sep_noisy_nodes:
        raise run_config.ConfigError(
            "MD17 denoising needs config.loss.sep_noisy_nodes = True (energies and forces on clean "
            "frames, a separate noisy pass for the noise head; docs/spec/frad.md §3.2)"
        )
    checkpoints = tuple((config.get("evaluate") or {}).get("checkpoints", ("last", "best")))
    if not checkpoints or set(checkpoints) - {"last", "best"}:
        raise run_config.ConfigError(
            f"config.evaluate.checkpoints must name 'last' and/or 'best', got {checkpoints!r}")


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneTrainer:
    """Jitted train and predict steps for one fine-tuning config and mesh.

    Attributes:
      std: the standardiser's std (the model's per-atom outputs are multiplied by it).
    """

    config: ml_collections.ConfigDict
    model: Any
    mesh: jax.sharding.Mesh
    std: float = 1.0
    traces: int = 0

    def __post_init__(self):
        host_malloc.warn_if_untuned(self.mesh.devices.flat[0].platform)
        self.tx, self.schedule = schedules.make_optimizer(self.config.optim, self.config.total_steps)
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())
        self.denoise = self.config.loss.denoising_weight > 0
        self.kind = downstream.of(self.config.task)
        self.update_fn = jax.jit(self._update, donate_argnums=(0,))
        self.predict_fn = jax.jit(self._predict)

    # ---- one device batch ------------------------------------------------------------------

    def molecule_outputs(self, params, b, positions):
        """Per-molecule predictions ``[G]`` (residual units: without the standardiser's mean and
        fixed atom references) and the raw model outputs, for one device batch at ``positions``."""
        edge_mask = graph.active_edges(
            positions, b["senders"], b["receivers"], b["edge_mask"],
            self.config.model.cutoff, self.config.data.max_neighbors,
        )
        out = self.model.apply({"params": params}, {**b, "positions": positions, "edge_mask": edge_mask})
        per_graph = models.molecule_property(
            out, b["node_graph"], b["graph_mask"].shape[0], self.std)
        return per_graph, out

    def energy_and_forces(self, params, b, positions):
        """``(E [G], F [N, 3] = -∂ΣE/∂positions, model outputs)`` for one device batch."""

        def total(pos):
            e, out = self.molecule_outputs(params, b, pos)
            return jnp.sum(jnp.where(b["graph_mask"], e, 0.0)), (e, out)

        (_, (e, out)), grad = jax.value_and_grad(total, has_aux=True)(positions)
        return e, -grad * b["node_mask"][:, None], out

    def _one(self, params, key, b, training: bool) -> dict:
        res = {}
        if not self.kind.forces:
            pos = b["positions"]
            if training and self.denoise:
                pos, res["noise_target"] = train.perturb(self.config, key, b)
            res["pred"], out = self.molecule_outputs(params, b, pos)
            if training and self.denoise:
                res["noise_pred"] = out["noise"]
            return res
        res["pred"], res["forces"], _ = self.energy_and_forces(params, b, b["positions"])
        if training and self.denoise:
            # Frad's sep-noisy-node pass: its energy and forces are discarded.
            noisy, res["noise_target"] = train.perturb(self.config, key, b)
            _, out = self.molecule_outputs(params, b, noisy)
            res["noise_pred"] = out["noise"]
        return res

    def _forward(self, params, rng, batch, training: bool) -> dict:
        """Outputs with a leading device axis ``[D, ...]``; each device its own rows."""

        def one_device(params, keys, batch):
            return jax.lax.map(lambda a: self._one(params, a[0], a[1], training), (keys, batch))

        keys = jax.random.split(rng, batch["node_mask"].shape[0])
        return train.per_device(
            one_device, self.mesh, in_specs=(P(), P("data"), P("data")), out_specs=P("data")
        )(params, keys, batch)

    # ---- losses ----------------------------------------------------------------------------

    def _loss(self, params, rng, batch, energy_ema):
        cfg = self.config.loss
        out = self._forward(params, rng, batch, training=True)
        l_y = losses.property_loss(out["pred"], batch["target"], batch["graph_mask"], cfg.property_loss)
        aux = {"property_loss": l_y}
        if self.kind.forces:
            l_f = losses.force_loss(out["forces"], batch["forces"], batch["node_mask"], cfg.property_loss)
            # Frad's EMA: L^ema = a L + (1 - a) * previous (detached); the first step uses L.
            prev = jax.lax.stop_gradient(jnp.where(jnp.isnan(energy_ema), 0.0, energy_ema))
            a = cfg.energy_ema_alpha
            l_e = jnp.where(jnp.isnan(energy_ema), l_y, a * l_y + (1.0 - a) * prev)
            loss = cfg.energy_weight * l_e + cfg.force_weight * l_f
            aux.update(force_loss=l_f, energy_ema=jax.lax.stop_gradient(l_e))
        else:
            loss = cfg.energy_weight * l_y
            aux["energy_ema"] = energy_ema
        if self.denoise:
            target = out["noise_target"] / cfg.denoising_scale
            l_dn = losses.denoising_mse(out["noise_pred"], target, batch["node_mask"])
            loss = loss + cfg.denoising_weight * l_dn
            aux["denoising_mse"] = l_dn
        return loss, aux

    def _update(self, state, batch):
        return shared_step.update(self, state, batch)

    def objective_and_grads(self, state, rng, batch):
        """The step's loss, measurements, carried state and gradients (:func:`step.update`)."""
        (loss, aux), grads = jax.value_and_grad(self._loss, has_aux=True)(
            state["params"], rng, batch, state["energy_ema"]
        )
        ema = aux.pop("energy_ema")
        return (loss, (aux, {"energy_ema": ema})), grads

    def _predict(self, params, batch):
        """Clean-input predictions: ``pred [D, G]`` (+ ``forces [D, N, 3]`` for MD17)."""
        return self._forward(params, jax.random.key(0), batch, training=False)

    # ---- state -----------------------------------------------------------------------------

    def init_state(self, rng, device_batch: dict) -> dict:
        params = jax.jit(self.model.init)(rng, device_batch)["params"]
        return self.state_from_params(params)

    def state_from_params(self, params) -> dict:
        state = {
            "params": params,
            "opt": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            # ReduceLROnPlateau and best-validation bookkeeping (host-updated, checkpointed).
            "lr_scale": jnp.ones((), jnp.float32),
            "plateau_best": jnp.full((), jnp.inf, jnp.float32),
            "plateau_bad": jnp.zeros((), jnp.int32),
            "best_val": jnp.full((), jnp.inf, jnp.float32),
            "best_step": jnp.full((), -1, jnp.int32),
        }
        state = jax.device_put(state, self.replicated)
        # The energy EMA starts as NaN ("no previous step"). A multi-process device_put checks
        # that every process passes equal values, and NaN never equals NaN: made on the mesh.
        state["energy_ema"] = jax.jit(lambda: jnp.full((), jnp.nan, jnp.float32),
                                      out_shardings=self.replicated)()
        return state

    def global_batch(self, local_batch: dict) -> dict:
        return {
            k: jax.make_array_from_process_local_data(self.data_sharding, v)
            for k, v in local_batch.items()
        }


# --------------------------------------------------------------------------------------------------
# Set-up shared by training and evaluation
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    config: Any
    builder: Any
    sources: dict  # split role ("train", "validation", "test") -> data source
    featurizer: LabeledFeaturizer
    standardizer: targets.Standardizer  # used by the model (identity when not standardising)
    fitted: targets.Standardizer  # fitted on the training labels (for the mean predictor)
    budget: graph.Budget
    trainer: FinetuneTrainer

    @property
    def kind(self) -> downstream.Downstream:
        """What the run predicts and how it is scored (QM9 property / MD17 energy + forces)."""
        return downstream.of(self.config.task)

    def dummy_batch(self) -> dict:
        """An empty device batch with the run's static shapes (for initialisation)."""
        return split_host(pack_labeled([], self.budget, self.kind.forces))[0]

    def abstract_state(self) -> dict:
        """The trainer's state layout (what a checkpoint restores into), without initialising."""
        return checkpoint.abstract_state(self.trainer.init_state, self.trainer.replicated,
                                         jax.random.key(0), self.dummy_batch())

    def predict(self, params, role: str, limit: int | None = None) -> dict[str, np.ndarray]:
        """:func:`predict` on this set-up."""
        return predict(self, params, role, limit)


def target_name(config) -> str:
    return config.target.name


def training_labels(featurizer: LabeledFeaturizer, source) -> np.ndarray:
    """``y - atom references`` of every training example (float64)."""
    out = np.empty(len(source), np.float64)
    for i in range(len(source)):
        y, ref = featurizer.raw_label(source[i])
        out[i] = y - ref
    return out


def build(config, mesh=None) -> Setup:
    """Dataset, standardiser, featuriser, budgets, model and trainer for a fine-tuning config."""
    check_config(config)
    mesh = mesh or train.make_mesh()
    # Several processes must not build the same dataset concurrently: prepare it beforehand.
    builder = datasets.get_builder(
        config.data.dataset, config.data.data_dir or None, build=jax.process_count() == 1,
        manual_dir=config.data.manual_dir or None,
    )
    sources = {
        role: datasets.open_split(builder, config.data[f"{role}_split"])
        for role in ("train", "validation", "test")
    }
    base = pipeline.Featurizer(
        radius=config.model.cutoff + config.data.skin, max_z=config.model.max_z,
        dataset=config.data.dataset,
    )
    unshifted = LabeledFeaturizer(base, config.task, target_name(config), 0.0, config.target.atomref)
    train.note(f"{config.data.dataset}: computing training-label statistics over {len(sources['train'])} examples")
    fitted = targets.Standardizer.fit(training_labels(unshifted, sources["train"]))
    standardizer = fitted if config.target.standardize else targets.Standardizer()
    if config.target.get("fixed_standardizer"):  # a converted model's own (mspec.io.export)
        standardizer = targets.Standardizer(**config.target.fixed_standardizer)
    featurizer = dataclasses.replace(unshifted, mean=standardizer.mean)
    budget = train.choose_budget(config, builder, featurizer, sources["train"])
    message_passing_of(config)  # prints which implementation runs
    model = models.get_model(config.model)
    trainer = FinetuneTrainer(config, model, mesh, std=standardizer.std)
    return Setup(config, builder, sources, featurizer, standardizer, fitted, budget, trainer)


def message_passing_of(config) -> str:
    """The message-passing implementation a fine-tuning run uses, printed with the reason.

    ``"auto"`` is the fused CPU kernels where they run (CPU backend, float32, the kernels build;
    see :func:`mspec.kernels.message.use_fused`), for QM9 and for MD17 alike: the kernels are
    differentiable twice, as training on forces needs.
    """
    train.note_message_passing(config)
    return config.model.get("message_passing", "xla")


def zero_scalar_readout(params: dict) -> dict:
    """``params`` with the property head's last output set to 0, so every per-atom contribution,
    and so the readout, starts at exactly 0 (the prediction is the standardiser's mean + prior):

    * ``scalar_head``: column 0 (the scalar) of ``blocks/output_network_1/update_net_2``'s
      kernel and bias;
    * ``dipole_head``: columns 0 and 1 there (the charge, and the gate of the vector part);
    * ``spatial_extent_head``: ``output_network_2``'s kernel and bias.

    Why: with Xavier init the sum over a molecule's atoms of the head's initial outputs can sit
    tens of standard deviations away from the target, depending on the seed (an initial loss of
    25 to 3,800 over five seeds at the CPU study's size, docs/reproduction.md); Adam's second
    moment then remembers those gradients (β2 = 0.999) and shrinks every later step.
    """
    out = jax.tree_util.tree_map(lambda x: x, params)

    def zeroed(layer: dict, columns: slice) -> dict:
        return {**layer, "kernel": layer["kernel"].at[:, columns].set(0.0),
                "bias": layer["bias"].at[columns].set(0.0)}

    try:
        if "scalar_head" in params:
            blocks = out["scalar_head"]["blocks"]["output_network_1"]
            blocks["update_net_2"] = zeroed(blocks["update_net_2"], slice(0, 1))
        elif "dipole_head" in params:
            blocks = out["dipole_head"]["blocks"]["output_network_1"]
            blocks["update_net_2"] = zeroed(blocks["update_net_2"], slice(0, 2))
        elif "spatial_extent_head" in params:
            head = out["spatial_extent_head"]
            head["output_network_2"] = zeroed(head["output_network_2"], slice(None))
        else:
            raise ValueError("config.init.zero_scalar_readout: this model has no property head "
                             f"(parameters: {sorted(params)})")
    except KeyError as e:
        raise ValueError("config.init.zero_scalar_readout: the property head lacks its output "
                         f"layer (missing {e.args[0]!r})") from None
    return out


def init_params(setup: Setup) -> dict:
    """Fresh parameters, then the configured subtrees from a pre-training checkpoint."""
    cfg = setup.config
    params = jax.jit(setup.trainer.model.init)(jax.random.key(cfg.seed), setup.dummy_batch())["params"]
    if cfg.init.get("zero_scalar_readout", False):
        # Before the restore, so a checkpoint that holds a trained scalar head still replaces it.
        params = zero_scalar_readout(params)
    params = jax.device_put(params, setup.trainer.replicated)
    if cfg.init.checkpoint:
        params, report = restore.restore_subtrees(
            params, cfg.init.checkpoint, tuple(cfg.init.subtrees),
            step=cfg.init.step if cfg.init.step >= 0 else None, prefix=cfg.init.prefix,
        )
        train.note(report.summary())
    else:
        train.note(f"training from scratch (no config.init.checkpoint); {count_params(params):,} parameters")
    return params


def batches(setup: Setup, role: str, *, shuffle: bool, repeat: bool, start=None,
            limit: int | None = None, pad_forever: bool = False) -> sharding.SlotBatchIterator:
    """Process-local rows ``[L, ...]`` of the global batches of a split: one packed stream per
    device slot (:mod:`mspec.data.sharding`), so the global batch does not depend on the number
    of processes, and on one device it is the split's single stream.

    ``start``: per-slot positions (:func:`sharding.start_positions`); default the start.
    """
    num_slots = jax.device_count()
    data = setup.config.data
    return sharding.SlotBatchIterator(
        setup.sources[role], setup.featurizer, setup.budget,
        slots=sharding.local_slots(setup.trainer.data_sharding, num_slots), num_slots=num_slots,
        seed=setup.config.seed, shuffle=shuffle, repeat=repeat, limit=limit, start=start,
        pad_forever=pad_forever, prefetch=data.prefetch,
        num_threads=data.get("num_threads", 0), num_workers=data.get("num_workers", 0),
        pack_fn=functools.partial(pack_labeled, with_forces=setup.kind.forces),
    )


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a ``[D, ...]`` global array, in local-row (slot) order."""
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data) for shard in shards])


def predict(setup: Setup, params, role: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """Clean predictions over a split (its first ``limit`` molecules), in training units, float64,
    in the split's order; gathered from every process, so each returns the same arrays (a
    collective when there are several: every process must call it).

    Returns ``y_true [M]``, ``y_pred [M]``, ``ref [M]`` (atom references), and for MD17
    ``f_true [A, 3]``, ``f_pred [A, 3]`` over all real atoms.
    """
    num_slots = jax.device_count()
    it = batches(setup, role, shuffle=False, repeat=False, limit=limit, pad_forever=True)
    slots = np.asarray(it.slots, np.int32)  # local row j holds device slot slots[j]
    delivered = np.zeros(num_slots, np.int64)  # molecules of each slot's stream so far
    found: list[tuple[int, tuple]] = []  # (split position, per-molecule values)
    md17 = setup.kind.forces
    try:
        for local in it:
            dev, host = split_host(local)
            res = setup.trainer.predict_fn(params, setup.trainer.global_batch(dev))
            rows = {"slot": slots, "gm": local["graph_mask"], "y": host["_y"], "ref": host["_ref"],
                    "pred": _local_rows(res["pred"])}
            if md17:
                rows.update(nm=local["node_mask"], ng=local["node_graph"], f_true=local["forces"],
                            f_pred=_local_rows(res["forces"]))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                gathered = multihost_utils.process_allgather(rows)  # [P, L, ...] each
                rows = {k: np.asarray(v).reshape(-1, *np.shape(v)[2:]) for k, v in gathered.items()}
            if not np.asarray(rows["gm"], bool).any():  # every slot exhausted (on every process)
                break
            for r, slot in enumerate(rows["slot"]):
                # Slot s delivers stream positions s, s + D, s + 2D, ... (unshuffled: the split's).
                for g in np.flatnonzero(rows["gm"][r]):
                    position = int(slot + num_slots * delivered[slot])
                    delivered[slot] += 1
                    values = (rows["y"][r, g], rows["ref"][r, g], rows["pred"][r, g])
                    if md17:
                        atoms = np.asarray(rows["nm"][r], bool) & (rows["ng"][r] == g)
                        values += (rows["f_true"][r][atoms], rows["f_pred"][r][atoms])
                    found.append((position, values))
    finally:
        it.close()
    if not found:
        return {}
    found.sort(key=lambda item: item[0])
    columns = list(zip(*(values for _, values in found)))
    y, ref, pred = (np.asarray(c, np.float64) for c in columns[:3])
    out = {"y_true": y, "ref": ref, "y_pred": pred + setup.standardizer.mean + ref}
    if md17:
        out["f_true"] = np.concatenate(columns[3]).astype(np.float64)
        out["f_pred"] = np.concatenate(columns[4]).astype(np.float64)
    return out


def validation_metric(setup: Setup, pred: dict) -> float:
    """Model-selection metric (training units): QM9 MAE; MD17 ``w_E MAE_E + w_F MAE_F``.

    For MD17 this is the clean L1 composite, without the official run's energy EMA and freshly
    noised denoising term (which make its model selection noisy; docs/spec/frad.md §7 item 4).
    """
    mae_y = float(np.mean(np.abs(pred["y_pred"] - pred["y_true"])))
    if not setup.kind.forces:
        return mae_y
    mae_f = float(np.mean(np.abs(pred["f_pred"] - pred["f_true"])))
    return setup.config.loss.energy_weight * mae_y + setup.config.loss.force_weight * mae_f


def describe_validation(setup: Setup, pred: dict, value: float) -> str:
    """The validation line's text, with units: ``"validation MAE 0.334 eV"`` (QM9), or the MD17
    composite with its energy and force MAEs."""
    cfg = setup.config
    if not setup.kind.forces:
        return f"validation MAE {value:.6g} {setup.kind.training_unit(cfg.target.name)}"
    mae_e = float(np.mean(np.abs(pred["y_pred"] - pred["y_true"])))
    mae_f = float(np.mean(np.abs(pred["f_pred"] - pred["f_true"])))
    return (
        f"validation {cfg.loss.energy_weight:g} x energy MAE + {cfg.loss.force_weight:g} x force MAE "
        f"= {value:.6g} (energy MAE {mae_e:.4g} kcal/mol, force MAE {mae_f:.4g} kcal/mol/Å)"
    )


# --------------------------------------------------------------------------------------------------
# Running and evaluating (the loop itself is mspec.training.loop's, with tasks.Finetuning)
# --------------------------------------------------------------------------------------------------


def _resolved_config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def replicate_scalars(trainer, state, **values):
    """``state`` with the named scalars replaced (host values, replicated like the state)."""
    new = dict(state)
    for k, v in values.items():
        new[k] = jax.device_put(jnp.asarray(v, state[k].dtype), trainer.replicated)
    return new


def evaluate_workdir(workdir: str, which=("last", "best"), roles=("validation", "test")) -> dict:
    """Evaluates a fine-tuning workdir's last and best checkpoints (:func:`evaluation.evaluate`),
    rebuilding the run's set-up from its ``config.json``.

    Raises:
        FileNotFoundError: no ``config.json`` in ``workdir``.
        run_config.ConfigError: ``workdir`` is a pre-training run.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a fine-tuning workdir?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    task = config.get("task", "denoise")
    if task not in TASKS:
        raise run_config.ConfigError(
            f"{workdir} is a pre-training workdir (config.task {task!r}); experiments.evaluate "
            f"evaluates fine-tuning workdirs (config.task in {TASKS}). A pre-training "
            "run's validation loss is in its metrics.jsonl (eval/... records) and TensorBoard"
        )
    return evaluation.evaluate(build(config), workdir, which=which, roles=roles)
