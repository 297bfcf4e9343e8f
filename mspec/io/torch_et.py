"""PyTorch Equivariant Transformer checkpoints -> mspec parameters (torch is not needed).

Three codebases write the ET, each with its own names and options (``variant``):

* ``"torchmd-net"``: upstream torchmd-net (3.1.0): no per-layer norms, no vector norm; head MLPs
  named ``update_net.layers.{0,2}``; a ``distance.box`` buffer.
* ``"molspectra"``: the MolSpectra fork: per-layer affine LayerNorm ``x_norms.{l}`` and EqLN
  ``vec_norms.{l}``, ``out_norm_vec`` (``layernorm_on_vec = whitened``) -> mspec
  ``interlayer_norm = "affine"``.
* ``"frad"``: the Frad fork: one shared non-affine LayerNorm (no parameters) and ``vec_norms.{l}``
  (``md17 = false``) -> ``interlayer_norm = "shared_noaffine"``; with ``md17 = true`` no per-layer
  norms (``"none"``).

Files: a Lightning ``.ckpt`` (Lightning 2.x, or pytorch_lightning 1.x with class-keyed callbacks;
the ``state_dict`` entries carry the prefix ``model.``, ``hyper_parameters`` holds the training
arguments) or a plain ``TorchMD_Net`` ``state_dict`` saved with ``torch.save`` (no
hyper-parameters: ``num_heads`` and ``output_model`` must then be given, e.g. from the run's
``hparams.yaml``). Both are read by :mod:`mspec.io.torch_pickle`.

The architecture comes from the tensor shapes (F, L, K, max_z, which norms exist) and the
hyper-parameters (H, the cutoff, the head type), cross-checked against each other. Every tensor
must be mapped and every mspec parameter filled with the right shape: an unmapped tensor, a
missing parameter, a shape mismatch or an unsupported setting is a :class:`ConversionError` that
lists every offending name (torch's own loaders keep random weights for what they skip).

Layouts: a torch ``Linear`` weight is ``[out, in]`` (``y = x W^T + b``), a Flax kernel
``[in, out]``, so weights are transposed; the head-interleaved ``v_proj`` / ``dv_proj`` and the
F-blocked ``vec_proj`` / ``o_proj`` need no reordering because the mspec layers use torch's
layouts (:class:`mspec.models.et.EquivariantMultiHeadAttention`). LayerNorm ``weight`` is Flax's
``scale``.

Heads: ``output_model`` (hyper-parameter ``output_model``: ``Scalar``, ``DipoleMoment`` or
``ElectronicSpatialExtent``, with or without ``Equivariant``) becomes mspec's ``scalar_head``,
``dipole_head`` or ``spatial_extent_head``; ``output_model_noise`` the ``noise_head``; a trained
``Atomref`` table (``prior_model.atomref.weight``) the learnable ``prior`` (``model.prior =
"atomref"``); Frad's ``seperate_noise`` sets ``model.separate_noise_vectors``.

Buffers: the RBF ``means`` / ``betas`` must equal mspec's constants bitwise
(:func:`mspec.models.et.expnorm_rbf_params`; a trainable or modified RBF is refused); ``mean`` /
``std`` (standardisation: ``E = std sum_i h_i + mean``) and the forks' denoising normaliser
``pos_normalizer.*`` are carried in :class:`Converted`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from mspec.io import torch_pickle

VARIANTS = ("torchmd-net", "frad", "molspectra")


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the file and every fault."""


@dataclasses.dataclass
class Converted:
    """An ET checkpoint in mspec's terms.

    Attributes:
        variant: one of :data:`VARIANTS`.
        model: mspec model settings (``hidden, num_layers, num_heads, num_rbf, cutoff, max_z,
            interlayer_norm, vector_norm, heads, prior, separate_noise_vectors``), see
            :class:`mspec.models.Model`.
        params: the parameter tree ``{"representation": ..., "scalar_head" (or "dipole_head",
            "spatial_extent_head"): ..., "noise_head": ..., "prior": ...}`` (float32 numpy
            arrays), as ``Model.init(...)["params"]``.
        standardization: ``{"mean": float, "std": float, "atomref": [max_z] list or None}``:
            a molecule's property is ``std * sum_i h_i + sum_i atomref[z_i] + mean``; the
            atomref values are also the model's learnable prior (``params["prior"]``).
        normalizer: the forks' denoising-target statistics ``(sum [3], sum of squares [3],
            count [])`` (mspec's :class:`mspec.losses.RunningStats`), or None.
        max_num_neighbors: the checkpoint's neighbour cap (None when unknown).
        source: where it came from (file, format, Lightning version, epoch, step).
        hyper_parameters: the checkpoint's hyper-parameters (None for a plain state dict).
    """

    variant: str
    model: dict
    params: dict
    standardization: dict
    normalizer: tuple | None
    max_num_neighbors: int | None
    source: dict
    hyper_parameters: dict | None


# -------------------------------------------------------------------------------------------------
# Reading
# -------------------------------------------------------------------------------------------------


def read_torch_file(path: str) -> tuple[dict[str, np.ndarray], dict | None, dict]:
    """``(state dict without the "model." prefix, hyper-parameters or None, source info)``."""
    try:
        obj = torch_pickle.load(path, mmap=False)
    except torch_pickle.TorchFileError as e:
        raise ConversionError(str(e)) from None
    if isinstance(obj, dict) and "state_dict" in obj:  # a Lightning checkpoint
        sd = obj["state_dict"]
        outside = [k for k in sd if not str(k).startswith("model.")]
        if outside:
            raise ConversionError(
                f"{path}: Lightning state_dict entries outside the model (no 'model.' prefix): "
                f"{outside}"
            )
        state = {k[len("model."):]: v for k, v in sd.items()}
        hparams = obj.get("hyper_parameters")
        if hparams is not None and not isinstance(hparams, dict):
            raise ConversionError(f"{path}: hyper_parameters is a {type(hparams).__name__}, not a dict")
        source = {
            "file": path,
            "format": "lightning",
            "lightning_version": obj.get("pytorch-lightning_version"),
            "epoch": obj.get("epoch"),
            "global_step": obj.get("global_step"),
        }
        return state, (dict(hparams) if hparams is not None else None), source
    if isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        return dict(obj), None, {"file": path, "format": "state_dict"}
    raise ConversionError(
        f"{path}: neither a Lightning checkpoint (no 'state_dict' key) nor a state dict of tensors "
        f"(got {type(obj).__name__})"
    )


# -------------------------------------------------------------------------------------------------
# Hyper-parameters
# -------------------------------------------------------------------------------------------------

# Settings mspec implements (name -> accepted values). A missing entry is fine (older codebases
# lack some); a present one must match.
_SUPPORTED = {
    "model": ("equivariant-transformer",),
    "rbf_type": ("expnorm",),
    "trainable_rbf": (False,),
    "activation": ("silu",),
    "attn_activation": ("silu",),
    "neighbor_embedding": (True,),
    "distance_influence": ("both",),
    "aggr": ("add",),
    "reduce_op": ("add",),
    "cutoff_lower": (0, 0.0),
    "atom_filter": (-1,),
    "output_model": ("Scalar", "EquivariantScalar", "DipoleMoment", "EquivariantDipoleMoment",
                     "ElectronicSpatialExtent", "EquivariantElectronicSpatialExtent"),
    "output_model_noise": (None, "VectorOutput"),
    "prior_model": (None, "Atomref"),
    "vector_cutoff": (False,),
    "output_mlp_num_layers": (0,),
    "seperate_noise": (False, True),  # Frad's MD17 two-stream recipe (energy head on un-normed vec)
    "layernorm_on_vec": (None, "whitened"),
}


def _matches(value: Any, allowed: tuple) -> bool:
    """``value`` is one of ``allowed``; booleans and None by identity (so 0 is not False)."""
    for a in allowed:
        if a is None or isinstance(a, bool) or isinstance(value, bool):
            if value is a:
                return True
        elif value == a:
            return True
    return False


def _unsupported_settings(hparams: dict) -> list[str]:
    return [f"{key}={hparams[key]!r} (supported: {', '.join(map(repr, allowed))})"
            for key, allowed in _SUPPORTED.items()
            if key in hparams and not _matches(hparams[key], allowed)]


# -------------------------------------------------------------------------------------------------
# Names: torch -> mspec
# -------------------------------------------------------------------------------------------------

_REP = "representation_model."
_LINEAR_PART = {"weight": "kernel", "bias": "bias"}
_NORM_PART = {"weight": "scale", "bias": "bias"}


def _head_path(variant: str, head: str, rest: str):
    """``(path, transpose)`` of a gated-block head tensor, or None."""
    m = re.fullmatch(r"output_network\.(\d+)\.(vec1_proj|vec2_proj)\.weight", rest)
    if m:
        return (head, "blocks", f"output_network_{m[1]}", m[2], "kernel"), True
    update = r"update_net\.layers\.([02])" if variant == "torchmd-net" else r"update_net\.([02])"
    m = re.fullmatch(rf"output_network\.(\d+)\.{update}\.(weight|bias)", rest)
    if m:
        return (head, "blocks", f"output_network_{m[1]}", f"update_net_{m[2]}",
                _LINEAR_PART[m[3]]), m[3] == "weight"
    return None


# torchmd-net's output_model names (hyper-parameter, with or without "Equivariant") -> mspec head.
OUTPUT_MODELS = {"Scalar": "scalar", "DipoleMoment": "dipole",
                 "ElectronicSpatialExtent": "spatial_extent"}


def property_head_of(hparams: dict) -> str:
    """The mspec property head for the checkpoint's ``output_model`` (``"Scalar"`` if absent)."""
    name = str(hparams.get("output_model") or "Scalar")
    return OUTPUT_MODELS.get(name.removeprefix("Equivariant"), "scalar")


def _spatial_extent_path(rest: str):
    """``ElectronicSpatialExtent``'s MLP: ``output_network.{0,2}`` (the forks' ``Sequential``) or
    ``output_network.layers.{0,2}`` (torchmd-net 3.x's ``MLP``)."""
    m = re.fullmatch(r"output_network\.(?:layers\.)?([02])\.(weight|bias)", rest)
    if m:
        return ("spatial_extent_head", f"output_network_{m[1]}", _LINEAR_PART[m[2]]), m[2] == "weight"
    return None


def parameter_path(variant: str, name: str, head: str = "scalar") -> tuple[tuple[str, ...], bool] | None:
    """Where torch parameter ``name`` goes in the mspec tree: ``(path, transpose)``.

    ``head``: the mspec property head that ``output_model.*`` holds (:func:`property_head_of`).
    None when ``name`` is not a parameter of this variant (a buffer, or unknown).
    """
    if name.startswith("output_model."):
        rest = name[len("output_model."):]
        if head == "spatial_extent":
            return _spatial_extent_path(rest)
        return _head_path(variant, f"{head}_head", rest)
    if _ATOMREF_WEIGHT.fullmatch(name):
        return ("prior", "atomref"), False
    if name.startswith("output_model_noise."):
        return _head_path(variant, "noise_head", name[len("output_model_noise."):])
    if not name.startswith(_REP):
        return None
    rest = name[len(_REP):]
    rep = "representation"
    if rest == "embedding.weight":
        return (rep, "embedding", "embedding"), False
    if rest == "neighbor_embedding.embedding.weight":
        return (rep, "neighbor_embedding", "embedding", "embedding"), False
    m = re.fullmatch(r"neighbor_embedding\.(distance_proj|combine)\.(weight|bias)", rest)
    if m:
        return (rep, "neighbor_embedding", m[1], _LINEAR_PART[m[2]]), m[2] == "weight"
    m = re.fullmatch(r"attention_layers\.(\d+)\.layernorm\.(weight|bias)", rest)
    if m:
        return (rep, f"attention_layers_{m[1]}", "layernorm", _NORM_PART[m[2]]), False
    m = re.fullmatch(
        r"attention_layers\.(\d+)\.(q_proj|k_proj|v_proj|o_proj|dk_proj|dv_proj|vec_proj)"
        r"\.(weight|bias)", rest)
    if m:
        return (rep, f"attention_layers_{m[1]}", m[2], _LINEAR_PART[m[3]]), m[3] == "weight"
    m = re.fullmatch(r"out_norm\.(weight|bias)", rest)
    if m:
        return (rep, "out_norm", _NORM_PART[m[1]]), False
    if variant == "torchmd-net":
        return None  # no per-layer or vector norms upstream
    if rest == "out_norm_vec.weight":
        return (rep, "out_norm_vec", "weight"), False
    m = re.fullmatch(r"vec_norms\.(\d+)\.weight", rest)
    if m:
        return (rep, f"vec_layer_norms_{m[1]}", "weight"), False
    m = re.fullmatch(r"x_norms\.(\d+)\.(weight|bias)", rest)
    if m and variant == "molspectra":
        return (rep, f"layer_norms_{m[1]}", _NORM_PART[m[2]]), False
    return None


_RBF_BUFFERS = (_REP + "distance_expansion.means", _REP + "distance_expansion.betas")
_NORMALIZER = ("pos_normalizer.acc_sum", "pos_normalizer.acc_squared_sum",
               "pos_normalizer.acc_count", "pos_normalizer.num_accumulations")
_ATOMREF = re.compile(r"prior_model\.(?:\d+\.)?(atomref\.weight|initial_atomref)")
# The trained Atomref table (a parameter: mspec's learnable prior); initial_atomref is a buffer.
_ATOMREF_WEIGHT = re.compile(r"prior_model\.(?:\d+\.)?atomref\.weight")


def _is_buffer(variant: str, name: str) -> bool:
    if _ATOMREF_WEIGHT.fullmatch(name):
        return False
    if name in ("mean", "std") or name in _RBF_BUFFERS or _ATOMREF.fullmatch(name):
        return True
    if variant == "torchmd-net":
        return name == _REP + "distance.box"
    return name in _NORMALIZER


def to_tree(variant: str, named: dict[str, np.ndarray], head: str = "scalar") -> tuple[dict, list[str]]:
    """``(nested mspec tree, names that are not parameters of the variant)``.

    Used for the weights and, in the parity tests, for torch's gradients (same names, same
    layouts). ``head``: the property head ``output_model.*`` holds. The Atomref table
    ``[max_z, 1]`` becomes the prior's ``[max_z]``.
    """
    tree: dict = {}
    unmapped = []
    for name, value in named.items():
        where = parameter_path(variant, name, head)
        if where is None:
            unmapped.append(name)
            continue
        path, transpose = where
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        value = np.asarray(value)
        if path == ("prior", "atomref") and value.ndim == 2 and value.shape[1] == 1:
            value = value[:, 0]
        node[path[-1]] = value.T if transpose else value
    return tree, unmapped


# -------------------------------------------------------------------------------------------------
# Architecture
# -------------------------------------------------------------------------------------------------


def _infer_cutoff(means: np.ndarray) -> float:
    """The upper cutoff from the first RBF mean, ``float32(exp(-cutoff))`` (lower cutoff 0)."""
    return round(-math.log(float(means[0])), 4)


def infer_model(variant: str, state: dict, hparams: dict, path: str) -> dict:
    """mspec model settings from the tensor shapes and the hyper-parameters."""
    faults = []
    emb = state.get(_REP + "embedding.weight")
    proj = state.get(_REP + "neighbor_embedding.distance_proj.weight")
    if emb is None or proj is None or _RBF_BUFFERS[0] not in state:
        raise ConversionError(
            f"{path}: not an ET state dict (no {_REP}embedding.weight, "
            "neighbor_embedding.distance_proj.weight or distance_expansion.means)"
        )
    max_z, hidden = emb.shape
    num_rbf = proj.shape[1]
    layers = sorted({int(m[1]) for k in state
                     if (m := re.match(re.escape(_REP) + r"attention_layers\.(\d+)\.", k))})
    if layers != list(range(len(layers))) or not layers:
        faults.append(f"attention layers {layers} are not 0..L-1")
    num_layers = len(layers)
    cutoff = float(hparams.get("cutoff_upper", _infer_cutoff(state[_RBF_BUFFERS[0]])))
    if "num_heads" not in hparams:
        raise ConversionError(
            f"{path}: the number of attention heads is not stored in a plain state dict; give it "
            "(e.g. --num_heads 8, or --hparams with the run's hparams.yaml)"
        )
    num_heads = int(hparams["num_heads"])
    if hidden % num_heads:
        faults.append(f"embedding dimension {hidden} is not divisible by num_heads={num_heads}")
    for key, value in (("embedding_dimension", hidden), ("num_layers", num_layers),
                       ("num_rbf", num_rbf), ("max_z", max_z)):
        if key in hparams and int(hparams[key]) != value:
            faults.append(f"hyper-parameter {key}={hparams[key]} but the tensors say {value}")

    has = lambda fragment: any(fragment in k for k in state)  # noqa: E731
    if variant == "molspectra" and (has("x_norms.") or has("vec_norms.")):
        interlayer = "affine"
    elif variant == "frad" and has("vec_norms."):
        interlayer = "shared_noaffine"
        if hparams.get("md17") is True:
            faults.append("md17=True but the checkpoint has per-layer vec_norms")
    else:
        interlayer = "none"
    vector_norm = "whitened" if has(_REP + "out_norm_vec.") else "none"
    if hparams.get("layernorm_on_vec") == "whitened" and vector_norm == "none":
        faults.append(f"layernorm_on_vec='whitened' but {_REP}out_norm_vec.weight is missing")
    separate = hparams.get("seperate_noise") is True
    if separate and vector_norm == "none":
        faults.append(f"seperate_noise=True but {_REP}out_norm_vec.weight is missing")
    head = property_head_of(hparams)
    heads = tuple(h for h, prefix in ((head, "output_model."), ("noise", "output_model_noise."))
                  if any(k.startswith(prefix) for k in state))
    if not heads:
        faults.append("no output head (output_model.* / output_model_noise.*)")
    prior = "atomref" if any(_ATOMREF_WEIGHT.fullmatch(k) for k in state) else "none"
    if prior != "none" and head != "scalar":
        faults.append(f"an Atomref prior with output_model={hparams.get('output_model')!r} "
                      "(torchmd-net allows a prior only with the scalar head)")
    faults += _unsupported_settings(hparams)
    if faults:
        raise ConversionError(f"{path}: cannot convert ({variant}): " + "; ".join(faults))
    return dict(hidden=int(hidden), num_layers=num_layers, num_heads=num_heads,
                num_rbf=int(num_rbf), cutoff=cutoff, max_z=int(max_z),
                interlayer_norm=interlayer, vector_norm=vector_norm, heads=heads, prior=prior,
                separate_noise_vectors=separate)


def expected_params(model: dict) -> dict:
    """Shapes of the parameters of the mspec model ``model`` (``jax.ShapeDtypeStruct`` tree)."""
    import jax

    from mspec.models import Model

    batch = dict(
        atomic_numbers=np.zeros(2, np.int32), positions=np.zeros((2, 3), np.float32),
        node_mask=np.ones(2, bool), senders=np.zeros(1, np.int32),
        receivers=np.zeros(1, np.int32), edge_mask=np.ones(1, bool),
        node_graph=np.zeros(2, np.int32), graph_mask=np.ones(1, bool),
    )
    return jax.eval_shape(Model(**model).init, jax.random.key(0), batch)["params"]


def _flat(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _check_buffers(variant: str, state: dict, model: dict, path: str) -> list[str]:
    from mspec.models.et import expnorm_rbf_params

    means, betas, _ = expnorm_rbf_params(model["num_rbf"], model["cutoff"])
    faults = []
    for name, ours in zip(_RBF_BUFFERS, (means, betas)):
        theirs = np.asarray(state[name]) if name in state else None
        if theirs is None:
            faults.append(f"missing buffer {name}")
        elif theirs.shape != ours.shape or not np.array_equal(theirs.astype(np.float32), ours):
            faults.append(
                f"{name} differs from torchmd-net's ExpNormal constants for K={model['num_rbf']}, "
                f"cutoff {model['cutoff']} Å (trained or modified RBF: not supported)"
            )
    box = state.get(_REP + "distance.box")
    if box is not None and np.any(np.asarray(box) != 0):
        faults.append(f"{_REP}distance.box is non-zero (periodic boxes are not supported)")
    return faults


def _standardization(state: dict) -> dict:
    atomref = None
    for name in state:
        m = _ATOMREF.fullmatch(name)
        if m and m[1] == "atomref.weight":  # the (possibly trained) values, not the initial ones
            atomref = np.asarray(state[name], np.float64).reshape(-1).tolist()
    return {
        "mean": float(np.asarray(state.get("mean", 0.0))),
        "std": float(np.asarray(state.get("std", 1.0))),
        "atomref": atomref,
    }


def convert(path: str, variant: str, hparams: dict | None = None) -> Converted:
    """Reads and converts an ET checkpoint.

    Args:
        path: a Lightning ``.ckpt`` or a ``torch.save``'d state dict.
        variant: which codebase wrote it, one of :data:`VARIANTS`.
        hparams: hyper-parameters that override / complete the checkpoint's own (a plain state
            dict has none: ``num_heads`` is needed, and ``output_model`` should be given).

    Raises:
        ConversionError: listing every unmapped tensor, missing parameter, shape mismatch,
            buffer mismatch or unsupported setting.
    """
    if variant not in VARIANTS:
        raise ConversionError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    state, stored, source = read_torch_file(path)
    merged = {**(stored or {}), **(hparams or {})}
    model = infer_model(variant, state, merged, path)

    params_named = {k: v for k, v in state.items() if not _is_buffer(variant, k)}
    tree, unmapped = to_tree(variant, params_named, property_head_of(merged))
    expected = _flat(expected_params(model))
    got = _flat(tree)
    faults = [f"unmapped tensor {n}" for n in unmapped]
    faults += [f"missing parameter {'/'.join(p)} {tuple(expected[p].shape)}"
               for p in expected if p not in got]
    faults += [f"no mspec parameter {'/'.join(p)} for this architecture" for p in got
               if p not in expected]
    faults += [f"shape mismatch {'/'.join(p)}: checkpoint {got[p].shape}, model "
               f"{tuple(expected[p].shape)}" for p in expected
               if p in got and tuple(got[p].shape) != tuple(expected[p].shape)]
    faults += [f"{'/'.join(p)} has dtype {got[p].dtype} (expected float32)" for p in got
               if got[p].dtype != np.float32]
    faults += _check_buffers(variant, state, model, path)
    if faults:
        raise ConversionError(
            f"{path}: cannot convert ({variant}, {model['interlayer_norm']} per-layer norm, "
            f"vector norm {model['vector_norm']}): " + "; ".join(faults)
        )
    params = jax_tree(tree)
    normalizer = None
    if all(n in state for n in _NORMALIZER[:3]):
        normalizer = (
            np.asarray(state[_NORMALIZER[0]], np.float32).reshape(3),
            np.asarray(state[_NORMALIZER[1]], np.float32).reshape(3),
            np.asarray(state[_NORMALIZER[2]], np.float32).reshape(()),
        )
    neighbors = merged.get("max_num_neighbors")
    return Converted(
        variant=variant, model=model, params=params, standardization=_standardization(state),
        normalizer=normalizer, max_num_neighbors=None if neighbors is None else int(neighbors),
        source=source, hyper_parameters=stored,
    )


def jax_tree(tree: dict) -> dict:
    """The nested dict with contiguous float32 leaves (torch views may be strided)."""
    return {k: jax_tree(v) if isinstance(v, dict) else np.ascontiguousarray(v, np.float32)
            for k, v in tree.items()}
