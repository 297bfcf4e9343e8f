"""MolSpectra stage-2 pre-training: denoising + masked-patch reconstruction + 3D->spectrum InfoNCE.

Written from ``docs/spec/molspectra.md`` §4–§6. :class:`MolSpectraTrainer` plugs into the
shared loop of :mod:`mspec.training.loop` (``config.task = "molspectra"``) and changes:

* **parameters**: the ET model's subtrees (``representation``, ``noise_head``, ...) plus
  ``specformer`` and, with a learnable temperature, ``contrastive/log_temperature``. The ET
  subtrees keep the names of a stage-1 checkpoint, so stage 1, stage 2 and fine-tuning restore
  them by the same paths.
* **state**: adds ``batch_stats`` (SpecFormer's BatchNorm running statistics), saved in every
  checkpoint, so a resumed run is exact.
* **start**: ``config.init_from`` copies the listed subtrees (default ``representation`` and
  ``noise_head``) from a stage-1 Frad/Coord checkpoint; missing subtrees or shape mismatches are
  errors (:func:`mspec.training.restore.restore_subtrees`). SpecFormer starts fresh.
* **loss**: ``w_den L_den + w_mpr L_MPR + w_con L_con`` (paper: 1 / 1 / 1), see
  :func:`mspec.losses.masked_patch_mse` and :func:`mspec.losses.info_nce`.

The ET runs per device (``shard_map`` + ``lax.map`` as in stage 1). Its molecule feature is the
sum over each molecule's atoms of the final LayerNorm-ed scalar features ``[G, F]``, with no
projection head (docs/spec/et.md §7; docs/spec/molspectra.md §8 Q16). SpecFormer then runs on
the *global* batch of molecule slots
``[D * G, L]`` under plain ``jax.jit``: its BatchNorm statistics and the InfoNCE negatives span
all devices, as the single-GPU original's batch does, and padding slots are masked out of both.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mspec import graph, losses
from mspec.models.specformer import SpecFormer, make_specs
from mspec.training import plots, restore, run_config, train

# Top-level parameter keys that belong to stage 2 only (everything else is the ET model's).
STAGE2_KEYS = ("specformer", "contrastive")


def spectrum_lengths(config, builder) -> dict[str, int]:
    """Length of every declared spectrum type, from the dataset's feature shapes.

    Raises:
      ValueError: a type in ``config.spectra.types`` is not a fixed-length feature of the dataset.
    """
    if builder is None:
        raise ValueError("MolSpectra training needs the dataset builder to know spectrum lengths")
    features = builder.info.features
    out = {}
    for name in config.spectra.types:
        if name not in features:
            raise ValueError(
                f"config.spectra.types declares {name!r}, but dataset {builder.info.full_name} has "
                f"no such feature (features: {sorted(features.keys())})"
            )
        shape = tuple(features[name].shape)
        if len(shape) != 1 or shape[0] is None:
            raise ValueError(
                f"feature {name!r} of {builder.info.full_name} is not a fixed-length vector: {shape}"
            )
        out[name] = int(shape[0])
    return out


def dataset_grids(builder) -> dict:
    """``{type: {"start", "step", "unit"}}`` from the dataset metadata, when it has them.

    Understands both layouts: ``spectra.<type>.{start, step, unit}`` (synthetic spectra) and the
    QM9S builder's ``grids.<type>.{first, last, points, unit}``.
    """
    meta = dict(getattr(getattr(builder, "info", None), "metadata", None) or {})
    grids = {
        k: v for k, v in (meta.get("spectra") or {}).items()
        if isinstance(v, Mapping) and {"start", "step"} <= set(v)
    }
    for k, v in (meta.get("grids") or {}).items():
        if isinstance(v, Mapping) and {"first", "last", "points"} <= set(v) and v["points"] > 1:
            step = (float(v["last"]) - float(v["first"])) / (int(v["points"]) - 1)
            grids.setdefault(k, {"start": float(v["first"]), "step": step, "unit": v.get("unit", "")})
    return grids


@dataclasses.dataclass
class MolSpectraTrainer(train.Trainer):
    """Stage-2 objective on the shared training loop (see the module docstring).

    Attributes:
      spectrum_lengths: points per spectrum type (from the dataset), e.g. ``{"uv": 701, ...}``.
      grids: optional physical grids from the dataset metadata (for the pictures' x axes).
    """

    spectrum_lengths: Mapping[str, int] | None = None
    grids: Mapping[str, Mapping] | None = None

    def __post_init__(self):
        cfg = self.config
        if self.spectrum_lengths is None:
            raise ValueError("MolSpectraTrainer needs spectrum_lengths")
        sp = cfg.spectra
        self.spectrum_specs = make_specs(
            tuple(sp.types),
            self.spectrum_lengths,
            sp.patch_len,
            sp.stride,
            sp.mask_ratio,
            sp.get("minmax"),
        )
        sf = cfg.specformer
        self.specformer = SpecFormer(
            self.spectrum_specs,
            normalization=sp.normalization,
            embed_dim=sf.embed_dim,
            d_model=sf.d_model,
            num_layers=sf.num_layers,
            num_heads=sf.num_heads,
            d_ff=sf.d_ff,
            bn_momentum=sf.bn_momentum,
        )
        super().__post_init__()

    # ---- configuration --------------------------------------------------------------------------

    def check(self) -> None:
        cfg = self.config
        if cfg.noise.type not in ("frad", "coord"):
            raise run_config.ConfigError(f"config.noise.type must be 'frad' or 'coord', got {cfg.noise.type!r}")
        if cfg.loss.target_normalization not in ("tau", "running", "none"):
            raise run_config.ConfigError(
                f"bad config.loss.target_normalization {cfg.loss.target_normalization!r}"
            )
        if "noise" not in cfg.model.heads:
            raise run_config.ConfigError(
                "stage 2 needs the 'noise' head in config.model.heads (denoising term)"
            )
        if not cfg.spectra.types:
            raise run_config.ConfigError("config.spectra.types is empty: declare the spectra to train on")
        if train.microbatches(cfg) != 1:
            raise run_config.ConfigError(
                f"config.microbatches={cfg.microbatches}: gradient accumulation is implemented "
                "for denoising pre-training only; use microbatches=1 for MolSpectra stage 2"
            )
        if cfg.specformer.embed_dim != cfg.model.hidden:
            raise run_config.ConfigError(
                f"config.specformer.embed_dim ({cfg.specformer.embed_dim}) must equal the ET width "
                f"config.model.hidden ({cfg.model.hidden}): the contrastive loss compares them directly"
            )
        c = cfg.loss.contrastive
        if not c.temperature > 0:
            raise run_config.ConfigError("config.loss.contrastive.temperature must be positive")
        for w in ("denoising_weight", "mpr_weight", "contrastive_weight"):
            if cfg.loss[w] < 0:
                raise run_config.ConfigError(f"config.loss.{w} must be >= 0")

    # ---- state ----------------------------------------------------------------------------------

    def init_state(self, rng, device_batch: dict) -> dict:
        k_et, k_sf, k_mask = jax.random.split(rng, 3)
        params = dict(jax.jit(self.model.init)(k_et, device_batch)["params"])
        g = device_batch["graph_mask"].shape[0]
        dummy = {s.name: jnp.zeros((g, s.length), jnp.float32) for s in self.spectrum_specs}
        init = jax.jit(functools.partial(self.specformer.init, mask_rng=k_mask, train=True))
        variables = init(k_sf, dummy, jnp.ones(g, bool))
        params["specformer"] = variables["params"]
        if self.config.loss.contrastive.learnable_temperature:
            params["contrastive"] = {
                "log_temperature": jnp.log(
                    jnp.asarray(self.config.loss.contrastive.temperature, jnp.float32)
                )
            }
        state = {
            "params": params,
            "opt": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "normalizer": tuple(losses.running_stats_init()),
            "batch_stats": variables["batch_stats"],
        }
        return jax.device_put(state, self.replicated)

    def start_from_pretrained(self, state: dict) -> dict:
        init = self.config.init_from
        if not init.checkpoint:
            train.note(
                "init_from.checkpoint is empty: stage 2 starts from a random ET (no stage 1)"
            )
            return state
        want_norm = self.config.loss.target_normalization == "running" and init.normalizer
        params, report = restore.restore_subtrees(
            state["params"], init.checkpoint, tuple(init.subtrees), step=init.step or None
        )
        train.note("stage 2: " + report.summary())
        state = {**state, "params": params}
        if want_norm:
            normalizer = restore.load_normalizer(report.checkpoint)
            state["normalizer"] = tuple(jax.device_put(x, self.replicated) for x in normalizer)
        return state

    # ---- forward and loss -----------------------------------------------------------------------

    def _et_params(self, params):
        return {k: v for k, v in params.items() if k not in STAGE2_KEYS}

    def _device_structure(self, params, keys, batch):
        """Noise, ET and pooling for this device's rows ``[L, ...]`` (under ``shard_map``).

        Returns:
          ``(pred [L, N, 3], target [L, N, 3], mol [L, G, F])``.
        """

        def one(args):
            key, b = args
            out, target = self.apply_noisy(params, key, b)
            g = b["graph_mask"].shape[0]
            # Sum of the final (LayerNorm-ed) scalar features; padding atoms are already 0.
            mol = jax.ops.segment_sum(out["node_features"], b["node_graph"], num_segments=g)
            return out["noise"], target, mol

        return jax.lax.map(one, (keys, batch))

    def _structure(self, params, rng, batch):
        n_dev = batch["node_mask"].shape[0]
        keys = jax.random.split(rng, n_dev)
        return train.per_device(
            self._device_structure,
            self.mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=(P("data"), P("data"), P("data")),
        )(self._et_params(params), keys, batch)

    def temperature(self, params) -> jax.Array:
        if "contrastive" in params:
            return jnp.exp(params["contrastive"]["log_temperature"])
        return jnp.asarray(self.config.loss.contrastive.temperature, jnp.float32)

    def _objective(self, params, batch_stats, rng, batch, stats, train_mode: bool):
        """All terms for a global batch.

        Returns:
          ``(loss, (measurements, stats, batch_stats, spec_out))``.
        """
        cfg = self.config
        k_struct, k_mask = jax.random.split(rng)
        pred, target_a, mol = self._structure(params, k_struct, batch)
        mode = cfg.loss.target_normalization
        if mode == "running" and train_mode:
            stats = losses.running_stats_update(stats, target_a, batch["node_mask"])
        target = losses.denoising_target(target_a, mode, tau=cfg.noise.tau, stats=stats)
        den = losses.denoising_mse(pred, target, batch["node_mask"])

        d, g = batch["graph_mask"].shape
        gm = batch["graph_mask"].reshape(d * g)
        spec_in = {
            s.name: batch[graph.spectrum_key(s.name)].reshape(d * g, s.length)
            for s in self.spectrum_specs
        }
        variables = {"params": params["specformer"], "batch_stats": batch_stats}
        if train_mode:
            out, updated = self.specformer.apply(
                variables, spec_in, gm, mask_rng=k_mask, train=True, mutable=["batch_stats"]
            )
            batch_stats = updated["batch_stats"]
        else:
            out = self.specformer.apply(variables, spec_in, gm, mask_rng=k_mask, train=False)

        mpr_terms = {
            t: losses.masked_patch_mse(
                out["reconstruction"][t], out["patches"][t], out["mask"][t], gm
            )
            for t in out["patches"]
        }
        mpr = sum(mpr_terms.values())  # a sum over the types, as the paper (Q17)
        mol = mol.reshape(d * g, -1)
        tau = self.temperature(params)
        con = losses.info_nce(
            mol, out["embedding"], gm, tau, symmetric=cfg.loss.contrastive.symmetric
        )
        loss = (
            cfg.loss.denoising_weight * den
            + cfg.loss.mpr_weight * mpr
            + cfg.loss.contrastive_weight * con
        )

        hits = losses.retrieval_hits(
            jax.lax.stop_gradient(mol), jax.lax.stop_gradient(out["embedding"]), gm
        )
        n_mol = jnp.maximum(jnp.sum(gm), 1)
        measurements = {
            "denoising_mse": den,
            "mpr": mpr,
            **{f"mpr_{t}": v for t, v in mpr_terms.items()},
            "contrastive": con,
            "temperature": tau,
            "retrieval_top1": jnp.sum(hits[1]) / n_mol,
            "retrieval_top5": jnp.sum(hits[5]) / n_mol,
        }
        return loss, (measurements, stats, batch_stats, out)

    def objective_and_grads(self, state, rng, batch):
        """The step's loss, measurements, carried state and gradients (:func:`step.update`)."""
        (loss, (meas, stats, batch_stats, _)), grads = jax.value_and_grad(
            self._objective, has_aux=True
        )(
            state["params"],
            state["batch_stats"],
            rng,
            batch,
            losses.RunningStats(*state["normalizer"]),
            True,
        )
        return (loss, (meas, {"normalizer": tuple(stats), "batch_stats": batch_stats})), grads

    def _eval(self, params, batch_stats, normalizer, batch, rng):
        """Per-batch terms with their weights, and the first slot's reconstruction for a picture.

        Masks are drawn with ``rng`` (the official code masks at evaluation too, Q2; a fixed key
        makes evaluations comparable); BatchNorm uses the running statistics.
        """
        loss, (m, _, _, out) = self._objective(
            params, batch_stats, rng, batch, losses.RunningStats(*normalizer), False
        )
        gm = batch["graph_mask"].reshape(-1)
        n_mol = jnp.sum(gm).astype(jnp.float32)
        weights = {
            "loss": n_mol,
            "denoising_mse": 3.0 * jnp.sum(batch["node_mask"]).astype(jnp.float32),
            "mpr": n_mol,
            "contrastive": n_mol,
            "retrieval_top1": n_mol,
            "retrieval_top5": n_mol,
        }
        for t in out["mask"]:
            weights[f"mpr_{t}"] = jnp.sum(out["mask"][t] & gm[:, None]).astype(jnp.float32)
        values = {"loss": loss, **{k: m[k] for k in weights if k != "loss"}}
        # Chance level of top-k retrieval among the n_mol candidates of this batch, per molecule.
        chance = {f"retrieval_chance_top{k}": jnp.minimum(k, n_mol) for k in (1, 5)}
        example = {}
        for s in self.spectrum_specs:
            example[f"spectrum_{s.name}"] = batch[graph.spectrum_key(s.name)].reshape(
                gm.shape[0], -1
            )[0]
            example[f"recon_{s.name}"] = out["reconstruction"][s.name][0]
            example[f"mask_{s.name}"] = out["mask"][s.name][0]
        return values, weights, chance, n_mol, example

    def evaluate(self, state, eval_source, featurizer, budget, *, step, writer, workdir) -> dict:
        """Weighted means of every term over the validation molecules, retrieval accuracy
        within each validation batch (with its chance level), and one reconstruction picture per
        spectrum type (``workdir/reconstructions/*.png`` and TensorBoard images)."""
        cfg = self.config
        if not hasattr(self, "_eval_jit"):
            self._eval_jit = jax.jit(self._eval)
        it = train.eval_batches(self, eval_source, featurizer, budget)
        sums, wsums, chance_sum, n_total, example = {}, {}, {}, 0.0, None
        base = jax.random.key(cfg.seed + 1_000_003)
        try:
            for i, local in enumerate(it):
                values, weights, chance, n_mol, ex = jax.device_get(
                    self._eval_jit(
                        state["params"],
                        state["batch_stats"],
                        state["normalizer"],
                        self.global_batch(local),
                        jax.random.fold_in(base, i),
                    )
                )
                if float(n_mol) == 0.0:  # every slot of every process is exhausted
                    break
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * float(weights[k])
                    wsums[k] = wsums.get(k, 0.0) + float(weights[k])
                for k, v in chance.items():
                    chance_sum[k] = chance_sum.get(k, 0.0) + float(v)
                n_total += float(n_mol)
                if example is None:
                    example = ex
        finally:
            it.close()
        result = {f"eval/{k}": sums[k] / max(wsums[k], 1e-12) for k in sums}
        result.update({f"eval/{k}": v / max(n_total, 1.0) for k, v in chance_sum.items()})
        result["eval/molecules"] = n_total
        if example is not None and jax.process_index() == 0:
            images = plots.save_reconstructions(
                os.path.join(workdir, "reconstructions"),
                step,
                example,
                self.spectrum_specs,
                cfg.spectra.normalization,
                self.grids,
            )
            for t, (_, image) in images.items():
                writer.write_image(f"reconstruction/{t}", image, step)
        return result
