"""Reading torch checkpoints without torch (mspec.io.torch_pickle) and refusing what cannot be
converted exactly (mspec.io.torch_et): every fault is named, nothing is silently skipped.

Modified checkpoints are written with the torch-free writer of data_pipelines/fixtures/torch_pt.py
from the golden state dicts (tests/data/golden_et).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile

import numpy as np
import pytest

from data_pipelines.fixtures import torch_pt
from mspec.io import torch_et, torch_pickle

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_et")
PLAIN = {"num_heads": 8, "output_model": "Scalar"}


def golden(name: str) -> str:
    return os.path.join(GOLDEN, name)


def write_state_dict(state: dict, path) -> str:
    torch_pt.save({k: torch_pt.Tensor(v) for k, v in state.items()}, str(path))
    return str(path)


def frad_state() -> dict:
    return dict(torch_pickle.load(golden("frad.state_dict.pt"), mmap=False))


def write_pickle(path, obj_bytes: bytes) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", obj_bytes)
    return str(path)


# -------------------------------------------------------------------------------------------------
# The reader
# -------------------------------------------------------------------------------------------------


def test_protocol2_numpy_payloads_with_python2_names_load(tmp_path):
    # An empty array pickled with protocol 2 refers to `__builtin__.bytes` (issue 21).
    path = str(tmp_path / "numpy.pt")
    torch_pt.save({"empty": np.zeros(0, np.float32), "ints": np.arange(3)}, path)
    assert b"__builtin__" in zipfile.ZipFile(path).read("archive/data.pkl")
    out = torch_pickle.load(path)
    assert out["empty"].shape == (0,) and out["empty"].dtype == np.float32
    np.testing.assert_array_equal(out["ints"], [0, 1, 2])


def test_python2_names_of_unsafe_globals_stay_refused(tmp_path):
    # `copy_reg._reconstructor` maps to copyreg._reconstructor, which is not allowed; an
    # os.system under its Python 2 module name neither.
    for module, name in [("copy_reg", "_reconstructor"), ("posix", "system"), ("__builtin__", "eval")]:
        payload = f"c{module}\n{name}\n.".encode()
        path = write_pickle(tmp_path / f"{name}.pt", payload)
        with pytest.raises(torch_pickle.TorchFileError, match=f"refusing to unpickle {module}.{name}"):
            torch_pickle.load(path)


def test_lightning_1x_callback_classes_are_inert_keys():
    ckpt = torch_pickle.load(golden("frad.ckpt"))
    keys = list(ckpt["callbacks"])
    assert [k.__qualname__ for k in keys] == ["EarlyStopping", "ModelCheckpoint"]
    assert all(isinstance(k, torch_pickle.LightningClassRef) for k in keys)
    # The same class in another file is the same key.
    again = torch_pickle.load(golden("molspectra.ckpt"))
    assert list(again["callbacks"]) == [keys[1]]
    with pytest.raises(torch_pickle.TorchFileError, match="refusing to instantiate"):
        keys[0]()


def test_a_pickled_callback_instance_is_refused(tmp_path):
    # GLOBAL ModelCheckpoint, empty tuple, REDUCE: an instance, not a class reference.
    payload = b"cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n)R."
    path = write_pickle(tmp_path / "instance.pt", payload)
    with pytest.raises(torch_pickle.TorchFileError, match="refusing to instantiate"):
        torch_pickle.load(path)


def test_other_lightning_classes_are_refused(tmp_path):
    payload = b"cpytorch_lightning.callbacks.lr_monitor\nLearningRateMonitor\n."
    path = write_pickle(tmp_path / "other.pt", payload)
    with pytest.raises(torch_pickle.TorchFileError, match="refusing to unpickle"):
        torch_pickle.load(path)


def test_data_pipelines_reexports_the_reader():
    from data_pipelines import torch_pickle as old_home

    assert old_home.load is torch_pickle.load
    assert old_home.TorchFileError is torch_pickle.TorchFileError


# -------------------------------------------------------------------------------------------------
# The converter's refusals
# -------------------------------------------------------------------------------------------------


def test_every_unmapped_missing_and_misshaped_tensor_is_listed(tmp_path):
    state = frad_state()
    state["representation_model.extra_gate.weight"] = np.ones(3, np.float32)
    state["output_model.output_network.2.vec1_proj.weight"] = np.ones((2, 2), np.float32)
    del state["representation_model.attention_layers.1.q_proj.bias"]
    del state["output_model_noise.output_network.0.update_net.2.weight"]
    state["representation_model.attention_layers.0.k_proj.weight"] = np.ones((64, 63), np.float32)
    path = write_state_dict(state, tmp_path / "broken.pt")
    with pytest.raises(torch_et.ConversionError) as err:
        torch_et.convert(path, "frad", PLAIN)
    msg = str(err.value)
    for fault in [
        "unmapped tensor representation_model.extra_gate.weight",
        "no mspec parameter scalar_head/blocks/output_network_2/vec1_proj/kernel",
        "missing parameter representation/attention_layers_1/q_proj/bias (64,)",
        "missing parameter noise_head/blocks/output_network_0/update_net_2/kernel (64, 64)",
        "shape mismatch representation/attention_layers_0/k_proj/kernel: checkpoint (63, 64)",
    ]:
        assert fault in msg, (fault, msg)
    assert msg.startswith(path)


@pytest.mark.parametrize("source, variant, faults", [
    # Frad's file read as MolSpectra's: its per-layer LayerNorms have no parameters.
    ("frad", "molspectra", ["missing parameter representation/layer_norms_0/scale",
                            "missing parameter representation/layer_norms_1/bias"]),
    # MolSpectra's read as Frad's: the affine x_norms have no place.
    ("molspectra", "frad", ["unmapped tensor representation_model.x_norms.0.weight",
                            "unmapped tensor representation_model.x_norms.1.bias"]),
    # A fork read as upstream: upstream has no vector norms and other head names.
    ("frad", "torchmd-net", ["unmapped tensor representation_model.out_norm_vec.weight",
                             "unmapped tensor output_model.output_network.0.update_net.0.weight"]),
])
def test_a_file_of_another_variant_is_refused(source, variant, faults):
    with pytest.raises(torch_et.ConversionError) as err:
        torch_et.convert(golden(f"{source}.ckpt"), variant)
    for fault in faults:
        assert fault in str(err.value), (fault, str(err.value))


def test_plain_state_dict_needs_the_head_count():
    with pytest.raises(torch_et.ConversionError, match="number of attention heads .* --num_heads"):
        torch_et.convert(golden("upstream.state_dict.pt"), "torchmd-net")


def test_unsupported_settings_are_named():
    with pytest.raises(torch_et.ConversionError) as err:
        torch_et.convert(golden("frad.ckpt"), "frad",
                         {"output_model": "VectorOutput", "prior_model": "ZBL",
                          "attn_activation": "tanh", "num_heads": 7})
    msg = str(err.value)
    for fault in ["output_model='VectorOutput'", "prior_model='ZBL'", "attn_activation='tanh'",
                  "not divisible by num_heads=7"]:
        assert fault in msg, (fault, msg)


def test_modified_rbf_buffers_and_periodic_boxes_are_refused(tmp_path):
    state = frad_state()
    state["representation_model.distance_expansion.means"] = (
        state["representation_model.distance_expansion.means"] * np.float32(1.0000001))
    path = write_state_dict(state, tmp_path / "rbf.pt")
    with pytest.raises(torch_et.ConversionError, match=re.escape("distance_expansion.means differs")):
        torch_et.convert(path, "frad", PLAIN)
    up = dict(torch_pickle.load(golden("upstream.state_dict.pt"), mmap=False))
    up["representation_model.distance.box"] = np.eye(3, dtype=np.float32) * 10
    path = write_state_dict(up, tmp_path / "box.pt")
    with pytest.raises(torch_et.ConversionError, match="distance.box is non-zero"):
        torch_et.convert(path, "torchmd-net", PLAIN)


def test_standardisation_and_atomref_are_carried(tmp_path):
    state = dict(torch_pickle.load(golden("upstream.state_dict.pt"), mmap=False))
    state["mean"] = np.array(-11.5, np.float32)
    state["std"] = np.array(0.25, np.float32)
    atomref = np.zeros((100, 1), np.float32)
    atomref[[1, 6]] = [[-0.5], [-37.75]]
    state["prior_model.0.initial_atomref"] = np.zeros((100, 1), np.float32)
    state["prior_model.0.atomref.weight"] = atomref
    path = write_state_dict(state, tmp_path / "stats.pt")
    c = torch_et.convert(path, "torchmd-net", {**PLAIN, "prior_model": "Atomref"})
    assert c.standardization["mean"] == -11.5 and c.standardization["std"] == 0.25
    assert c.standardization["atomref"][6] == -37.75 and len(c.standardization["atomref"]) == 100


def test_not_a_checkpoint(tmp_path):
    path = str(tmp_path / "list.pt")
    torch_pt.save([1, 2, 3], path)
    with pytest.raises(torch_et.ConversionError, match="neither a Lightning checkpoint"):
        torch_et.convert(path, "frad")
    with pytest.raises(torch_et.ConversionError, match="unknown variant"):
        torch_et.convert(golden("frad.ckpt"), "schnet")


# -------------------------------------------------------------------------------------------------
# Frad's heads, prior and vector streams
# -------------------------------------------------------------------------------------------------


def test_dipole_output_model_maps_the_gated_blocks_to_the_dipole_head():
    scalar = torch_et.convert(golden("frad.ckpt"), "frad")
    dipole = torch_et.convert(golden("frad.ckpt"), "frad", {"output_model": "DipoleMoment"})
    assert dipole.model["heads"] == ("dipole", "noise") and "scalar_head" not in dipole.params
    # The same torch tensors (EquivariantDipoleMoment subclasses EquivariantScalar).
    for a, b in zip(jax_leaves(scalar.params["scalar_head"]), jax_leaves(dipole.params["dipole_head"])):
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("mlp_prefix", ["output_network.", "output_network.layers."])
def test_spatial_extent_mlp_maps_from_either_layout(tmp_path, mlp_prefix):
    state = {k: v for k, v in frad_state().items() if not k.startswith("output_model.")}
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(32, 64)).astype(np.float32), rng.normal(size=32).astype(np.float32)
    w2, b2 = rng.normal(size=(1, 32)).astype(np.float32), rng.normal(size=1).astype(np.float32)
    state.update({f"output_model.{mlp_prefix}0.weight": w0, f"output_model.{mlp_prefix}0.bias": b0,
                  f"output_model.{mlp_prefix}2.weight": w2, f"output_model.{mlp_prefix}2.bias": b2})
    path = write_state_dict(state, tmp_path / "r2.pt")
    c = torch_et.convert(path, "frad", {**PLAIN, "output_model": "ElectronicSpatialExtent"})
    assert c.model["heads"] == ("spatial_extent", "noise")
    head = c.params["spatial_extent_head"]
    np.testing.assert_array_equal(head["output_network_0"]["kernel"], w0.T)
    np.testing.assert_array_equal(head["output_network_2"]["bias"], b2)
    # Read as a scalar head instead, the MLP tensors are named as unmapped, not dropped.
    with pytest.raises(torch_et.ConversionError, match=f"unmapped tensor output_model.{mlp_prefix}0.weight"):
        torch_et.convert(path, "frad", PLAIN)


def test_trained_atomref_becomes_the_prior_and_seperate_noise_the_two_streams(tmp_path):
    state = frad_state()
    table = np.linspace(-1, 1, 100, dtype=np.float32)[:, None]
    state["prior_model.atomref.weight"] = table
    state["prior_model.initial_atomref"] = np.zeros_like(table)
    path = write_state_dict(state, tmp_path / "prior.pt")
    c = torch_et.convert(path, "frad", {**PLAIN, "prior_model": "Atomref", "seperate_noise": True})
    assert c.model["prior"] == "atomref" and c.model["separate_noise_vectors"] is True
    np.testing.assert_array_equal(c.params["prior"]["atomref"], table[:, 0])
    with pytest.raises(torch_et.ConversionError, match="allows a prior only with the scalar head"):
        torch_et.convert(path, "frad", {**PLAIN, "output_model": "DipoleMoment"})
    up = dict(torch_pickle.load(golden("upstream.state_dict.pt"), mmap=False))
    with pytest.raises(torch_et.ConversionError, match="seperate_noise=True but .*out_norm_vec"):
        torch_et.convert(write_state_dict(up, tmp_path / "up.pt"), "torchmd-net",
                         {**PLAIN, "seperate_noise": True})
