"""Using a trained model: load a workdir read-only, check molecules, run properties and embeddings.

:func:`load` reads a workdir of ``experiments.finetune`` (or ``experiments.convert
--finetune_config``), of ``experiments.pretrain``, or a converted encoder (``experiments.convert``)
**without writing to it** (a training run may still be saving there): the parameters of its best
or last checkpoint, verified against the stored checksums, and for a fine-tuned model the
standardiser that training and evaluation used.

:class:`Predictor` runs one jitted function on device batches of one static
:class:`mspec.graph.Budget` (compiled once): the fine-tuned model's per-molecule prediction and,
for MD17 models, ``F = -∂E/∂x``, computed by the same :class:`FinetuneTrainer` methods that
training and ``experiments.evaluate`` use, plus the encoder's per-atom representation
``node_features [N, F]``. :func:`to_training_units` adds the standardiser mean and atom
references as :func:`mspec.training.finetune.predict` does.

Used by ``experiments/predict.py`` (files and SMILES in, CSV/NPZ out) and :mod:`mspec.ase`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import ml_collections
import numpy as np

from mspec import graph
from mspec.training import downstream, restore, run_config, targets

# Elements in each training set. A model has never seen the others (their embedding rows are
# untrained), so a molecule holding one is refused instead of given a meaningless number.
QM9_ELEMENTS = (1, 6, 7, 8, 9)  # H C N O F
MD17_ELEMENTS = {  # from the molecular formulas
    "aspirin": (1, 6, 8), "benzene": (1, 6), "ethanol": (1, 6, 8), "malonaldehyde": (1, 6, 8),
    "naphthalene": (1, 6), "salicylic": (1, 6, 8), "toluene": (1, 6), "uracil": (1, 6, 7, 8),
}
QM9_FAMILIES = ("qm9", "qm9s", "qm9_synthetic_spectra")  # datasets of QM9 molecules
# Closer than this, two atoms are a unit or input error (the shortest bond, H2, is 0.74 Å).
MIN_DISTANCE = 0.5  # Å



class ModelError(run_config.ConfigError):
    """The workdir cannot do what was asked (e.g. properties from a pre-training run)."""


def symbol(z: int) -> str:
    """Element symbol of atomic number ``z`` (RDKit's periodic table)."""
    from rdkit import Chem

    return Chem.GetPeriodicTable().GetElementSymbol(int(z))


@dataclasses.dataclass
class TrainedModel:
    """A trained model read from a workdir.

    Attributes:
      workdir: absolute path.
      config: the run's resolved config (``workdir/config.json``).
      checkpoint: the step directory the parameters come from.
      step: its training step.
      params: the parameter tree (host arrays).
      standardizer: ``y = std * Σ h_i + mean`` of a fine-tuned model; None for an encoder.
    """

    workdir: str
    config: ml_collections.ConfigDict
    checkpoint: str
    step: int
    params: dict
    standardizer: targets.Standardizer | None

    @property
    def task(self) -> str:
        return task_of(self.config)

    @property
    def kind(self) -> downstream.Downstream | None:
        """What a fine-tuned model predicts (QM9 property / MD17 energy + forces); None for an
        encoder."""
        return downstream.get(self.task)

    @property
    def finetuned(self) -> bool:
        return is_finetuned(self.config)

    @property
    def properties(self) -> tuple[str, ...]:
        """What it predicts per molecule: ``("homo",)``, ``("energy", "forces")`` or ``()``."""
        return self.kind.properties(self.config.target.name) if self.kind else ()

    def unit(self, name: str) -> str:
        """The papers' unit of a property (``meV``, ``kcal/mol``, ...)."""
        return self._fine_tuned_kind().report_unit(name)

    def report_factor(self, name: str) -> float:
        """Training unit -> :meth:`unit` multiplier (1000 for eV -> meV)."""
        return self._fine_tuned_kind().report_factor(name)

    def _fine_tuned_kind(self) -> downstream.Downstream:
        if self.kind is None:
            raise ValueError(f"{self.describe()} predicts no properties (an encoder)")
        return self.kind

    @property
    def elements(self) -> tuple[int, ...] | None:
        """Atomic numbers of the training data; None when unknown (then any ``Z < max_z``)."""
        family, _, name = str(self.config.get("data", {}).get("dataset", "")).partition("/")
        if family in QM9_FAMILIES:
            return QM9_ELEMENTS
        if family == "md17":
            return MD17_ELEMENTS.get(name.removeprefix("gfn2_").removeprefix("rmd17_"))
        return None

    def describe(self) -> str:
        what = (f"{self.task} {self.config.target.name}" if self.finetuned
                else f"encoder without a property head (config.task {self.task!r})")
        return f"{what} model from {self.checkpoint} (step {self.step})"


def task_of(config) -> str:
    """``qm9`` or ``md17`` (fine-tuning), else the pre-training objective (``denoise``, ...)."""
    return config.get("task", "denoise")


def is_finetuned(config) -> bool:
    """Whether the config is a fine-tuning run's (a model with a property or energy head)."""
    return downstream.get(task_of(config)) is not None


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """A workdir's resolved config (``workdir/config.json``)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a workdir of experiments.finetune, "
            "experiments.pretrain or experiments.convert")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _params_of(step_dir: str) -> dict:
    """The checkpoint's parameters (host arrays, checksums verified, any device count)."""
    state = restore.load_state(step_dir)
    if "params" not in state:
        raise restore.RestoreError(f"checkpoint {step_dir} has no 'params' (keys: {sorted(state)})")
    return state["params"]


def standardizer_of(workdir: str, config) -> targets.Standardizer:
    """The standardiser a fine-tuning run trained and evaluated with.

    A converted model's own (``target.fixed_standardizer``), the identity when the run did not
    standardise, else the one ``experiments.evaluate`` recorded in ``results.json``; a run that
    has not been evaluated yet refits it on its training split as training did (needs the
    dataset).
    """
    fixed = config.target.get("fixed_standardizer")
    if fixed:
        return targets.Standardizer(**fixed)
    if not config.target.standardize:
        return targets.Standardizer()
    path = os.path.join(workdir, "results.json")
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f).get("standardizer")
        if recorded:
            return targets.Standardizer(**recorded)
    from mspec.training import finetune

    print(f"{workdir} has no results.json yet: refitting the standardiser on the training split "
          f"of {config.data.dataset}, as training did", file=sys.stderr, flush=True)
    return finetune.build(config, mesh=single_device_mesh()).standardizer


def load(workdir: str, which: str | None = None) -> TrainedModel:
    """Reads a trained model (see the module docstring); nothing in ``workdir`` is written.

    Args:
      workdir: a fine-tuning or pre-training workdir, or an ``experiments.convert`` output.
      which: ``"best"`` (``workdir/best``, fine-tuning only) or ``"last"``
        (``workdir/checkpoints``); default: best when the workdir has one, else last.

    Raises:
      FileNotFoundError: no ``config.json``.
      ModelError: ``which="best"`` for a workdir without a best checkpoint.
      restore.RestoreError, checkpoint.CheckpointError: no readable or intact checkpoint.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = read_config(workdir)
    best = os.path.join(workdir, "best")
    if which is None:
        try:
            restore.find_checkpoint(best)
            which = "best"
        except restore.RestoreError:
            which = "last"
    if which not in ("best", "last"):
        raise ModelError(f"which must be 'best' or 'last', got {which!r}")
    directory = best if which == "best" else os.path.join(workdir, "checkpoints")
    try:
        step_dir, step = restore.find_checkpoint(directory)
    except restore.RestoreError as e:
        raise ModelError(f"{workdir}: no {which} checkpoint ({e})") from None
    model = TrainedModel(workdir, config, step_dir, step, _params_of(step_dir), None)
    if model.finetuned:
        model.standardizer = standardizer_of(workdir, config)
    return model


# --------------------------------------------------------------------------------------------------
# Molecules
# --------------------------------------------------------------------------------------------------


def check_molecule(model: TrainedModel, numbers: np.ndarray, positions: np.ndarray,
                   charge: int = 0) -> str | None:
    """Why the model cannot be applied to this molecule (one phrase), or None when it can.

    Refused: no atoms, coordinates that are not ``[n, 3]`` finite numbers, an element outside
    the model's embedding table or training data, a net charge (every training set here is of
    neutral molecules and the model has no charge input), atoms closer than ``MIN_DISTANCE``.
    """
    numbers, positions = np.asarray(numbers), np.asarray(positions, np.float64)
    if numbers.ndim != 1 or not len(numbers):
        return "no atoms"
    if positions.shape != (len(numbers), 3):
        return f"{len(numbers)} atoms but coordinates of shape {positions.shape}"
    if not np.all(np.isfinite(positions)):
        return "non-finite coordinates"
    max_z = int(model.config.model.max_z)
    allowed = model.elements
    for z in sorted(set(int(z) for z in numbers)):
        if not 1 <= z < max_z:
            return f"element Z={z} is outside the model's embedding table (1 <= Z < {max_z})"
        if allowed is not None and z not in allowed:
            return (f"element {symbol(z)} (Z={z}) is not in the model's training data "
                    f"({', '.join(symbol(a) for a in allowed)})")
    if charge:
        return f"net charge {charge:+d}: the model was trained on neutral molecules"
    if len(numbers) > 1:
        d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
        d[np.diag_indices(len(d))] = np.inf
        i, j = np.unravel_index(np.argmin(d), d.shape)
        if d[i, j] < MIN_DISTANCE:
            return (f"atoms {min(i, j) + 1} and {max(i, j) + 1} are {d[i, j]:.3g} Å apart "
                    f"(< {MIN_DISTANCE} Å: overlapping atoms, or coordinates not in Å)")
    return None


def featurize(model: TrainedModel, numbers: np.ndarray, positions: np.ndarray,
              all_pairs: bool = False) -> dict[str, np.ndarray]:
    """One molecule as :func:`mspec.graph.pack` takes it (edges within cutoff + skin, as in
    training; ``all_pairs``: every atom pair, so the edge count never changes as atoms move)."""
    data = model.config.get("data", {})
    radius = np.inf if all_pairs else model.config.model.cutoff + data.get("skin", 0.0)
    pos = np.asarray(positions, np.float32)
    senders, receivers = graph.radius_graph(pos, radius)
    return {
        "atomic_numbers": np.asarray(numbers, np.int32), "positions": pos,
        "senders": senders, "receivers": receivers,
        "torsions": np.zeros((0, 4), np.int32), "moving": np.zeros((0, len(numbers)), bool),
    }


def atom_references(model: TrainedModel, numbers: np.ndarray) -> float:
    """The QM9 atom-reference sum the model's target adds (0 when it has none), training units."""
    if model.kind is not None and not model.kind.forces and model.config.target.atomref:
        return targets.atomref_sum(model.config.target.name, numbers)
    return 0.0


# --------------------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------------------


def single_device_mesh() -> jax.sharding.Mesh:
    """A one-device ``"data"`` mesh: inference packs one device batch at a time."""
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


class Predictor:
    """One jitted function of device batches with a fixed :class:`graph.Budget`.

    ``predictor(batch)`` takes a device batch from :func:`graph.pack` (no leading device axis)
    and returns host arrays: ``pred [G]`` (fine-tuned models; training units, before the
    standardiser mean and atom references), ``forces [N, 3]`` (MD17 models, kcal/mol/Å) and,
    with ``embeddings``, ``node_features [N, F]`` (the encoder's output; 0 for padding atoms).
    ``traces`` counts compilations (1 for any number of batches).
    """

    def __init__(self, model: TrainedModel, *, properties: bool = True, embeddings: bool = False):
        from mspec import models
        from mspec.training import finetune

        if properties and not model.finetuned:
            raise ModelError(
                f"{model.workdir} is a pre-training workdir (config.task {model.task!r}): it "
                "predicts no properties; ask for its embeddings only")
        self.properties, self.embeddings = properties, embeddings
        self.traces = 0
        config = ml_collections.ConfigDict(model.config.to_dict())
        # The fused CPU kernels where they run (the same math as XLA ops, 2x faster forward on
        # 2 cores, BENCHMARKS.md inference), whatever setting the run trained with.
        config.model.message_passing = "auto"
        if not properties:  # the encoder alone
            config.model.heads = ()
            config.model.prior = "none"
        net = models.get_model(config.model)
        device = jax.devices()[0]
        if properties:
            self.params = jax.device_put(model.params, device)
            trainer = finetune.FinetuneTrainer(config, net, single_device_mesh(),
                                               std=model.standardizer.std)
        else:
            self.params = jax.device_put({"representation": model.params["representation"]}, device)
            cutoff, max_neighbors = config.model.cutoff, config.data.get("max_neighbors", 32)

        def outputs(params, b):
            self.traces += 1  # runs at trace time only
            res = {}
            if not properties:
                edge_mask = graph.active_edges(b["positions"], b["senders"], b["receivers"],
                                               b["edge_mask"], cutoff, max_neighbors)
                out = net.apply({"params": params}, {**b, "edge_mask": edge_mask})
            elif model.kind.forces:  # the training step's E and F = -∂E/∂x
                res["pred"], res["forces"], out = trainer.energy_and_forces(params, b, b["positions"])
            else:  # the evaluation's clean-input prediction
                res["pred"], out = trainer.molecule_outputs(params, b, b["positions"])
            if embeddings:
                res["node_features"] = out["node_features"]
            return res

        self._fn = jax.jit(outputs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        device = {k: v for k, v in batch.items() if not k.startswith("_")}  # host-only keys
        return jax.device_get(self._fn(self.params, device))


def to_training_units(model: TrainedModel, pred: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Per-molecule model outputs ``[M]`` -> predictions in training units (float64): plus the
    standardiser mean and the atom references, as :func:`mspec.training.finetune.predict`."""
    return np.asarray(pred, np.float64) + model.standardizer.mean + np.asarray(refs, np.float64)

