"""Parity with the PyTorch Equivariant Transformers, without torch (tests/data/golden_et).

For each variant (upstream torchmd-net 3.1.0, the MolSpectra fork, the Frad fork) the official code
wrote a small model as a Lightning checkpoint and as a plain state dict, plus torch's float64 and
float32 outputs and gradients on four QM9 molecules (tests/data/golden_et/README.md). Each file is
converted with :mod:`mspec.io.torch_et` and the mspec model must reproduce torch: relative error
(max |difference| / max |reference|) at most 1e-4 in float32, with XLA ops and with the fused CPU
kernels, for the representation, both heads, the energies, forces, ∂L/∂pos and (float64) ∂L/∂θ
for every parameter. In float64 the issue's bound is 1e-6; the measured error is < 1e-13, so the
test asks for 1e-9: a 1-ulp defect in a float32 constant (``jnp.linspace`` RBF means instead of
torch's) moves float64 results by 1e-7 .. 1e-6 and must fail it.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mspec.io import torch_et
from mspec.io.parity import OUTPUTS, rel_err, run_model
from mspec.models.et import expnorm_rbf_params

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_et")
VARIANTS = {"upstream": "torchmd-net", "molspectra": "molspectra", "frad": "frad"}
F64_TOL = 1e-9


def golden(name: str) -> str:
    return os.path.join(GOLDEN, name)


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request):
    name = request.param
    ref = dict(np.load(golden(f"{name}.npz")))
    converted = torch_et.convert(golden(f"{name}.ckpt"), VARIANTS[name])
    return name, ref, converted


def test_rbf_means_are_torch_linspace_bitwise():
    # The stored buffers are torch.linspace(exp(-5), 1, 16) and the betas in float32;
    # jnp.linspace differs in 10 of the 16 means (1-2 ulp).
    means, betas, alpha = expnorm_rbf_params(16, 5.0)
    for name in VARIANTS:
        sd = torch_et.read_torch_file(golden(f"{name}.state_dict.pt"))[0]
        assert means.dtype == np.float32 and betas.dtype == np.float32
        np.testing.assert_array_equal(means, sd["representation_model.distance_expansion.means"])
        np.testing.assert_array_equal(betas, sd["representation_model.distance_expansion.betas"])
    assert alpha == 1.0


def test_checkpoint_and_state_dict_convert_to_the_same_model(case):
    name, ref, converted = case
    meta = json.loads(str(ref["meta_json"]))
    plain = torch_et.convert(golden(f"{name}.state_dict.pt"), VARIANTS[name],
                             {"num_heads": 8, "output_model": "Scalar"})
    assert plain.model == converted.model
    jax.tree.map(np.testing.assert_array_equal, plain.params, converted.params)
    sizes = {k: sum(v.size for v in jax.tree.leaves(t)) for k, t in converted.params.items()}
    assert sizes == {"representation": meta["n_params_representation"],
                     "scalar_head": meta["n_params_scalar_head"],
                     "noise_head": meta["n_params_noise_head"]}
    expected_norms = {"upstream": ("none", "none"), "molspectra": ("affine", "whitened"),
                      "frad": ("shared_noaffine", "whitened")}[name]
    assert (converted.model["interlayer_norm"], converted.model["vector_norm"]) == expected_norms
    assert converted.standardization == {"mean": 0.0, "std": 1.0, "atomref": None}
    assert (converted.normalizer is not None) == (name != "upstream")


def test_float64_outputs_and_every_gradient_match_torch(case):
    name, ref, converted = case
    with jax.enable_x64(True):
        ours = run_model(converted.model, converted.params, ref, jnp.float64, "xla")
    errors = {k: rel_err(ours[k], ref[k]) for k in OUTPUTS + ("loss",)}
    torch_grads = {k[len("grad/"):]: ref[k] for k in ref if k.startswith("grad/")}
    tree, unmapped = torch_et.to_tree(VARIANTS[name], torch_grads)
    assert not unmapped
    flat_ref = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat_ours = dict(jax.tree_util.tree_flatten_with_path(ours["grad_params"])[0])
    assert len(flat_ref) == len(flat_ours)
    for path, g_ref in flat_ref:
        g = flat_ours[path]
        if not np.any(g_ref):  # vec_proj of layer 0, vec2_proj of the scalar head's last block
            assert not np.any(g), jax.tree_util.keystr(path)
        else:
            errors["grad" + jax.tree_util.keystr(path)] = rel_err(g, g_ref)
    worst = max(errors, key=errors.get)
    print(f"{name}: float64 worst {worst} {errors[worst]:.2e}")
    assert all(e <= F64_TOL for e in errors.values()), {k: e for k, e in errors.items() if e > F64_TOL}


@pytest.mark.parametrize("message_passing", ["xla", "fused"])
def test_float32_outputs_match_torch(case, message_passing):
    name, ref, converted = case
    ours = run_model(converted.model, converted.params, ref, jnp.float32, message_passing)
    errors = {k: rel_err(ours[k], ref[f"f32/{k}"]) for k in OUTPUTS}
    errors.update({f"{k} vs float64": rel_err(ours[k], ref[k]) for k in OUTPUTS})
    worst = max(errors, key=errors.get)
    print(f"{name} {message_passing}: float32 worst {worst} {errors[worst]:.2e}")
    assert all(e <= 1e-4 for e in errors.values()), errors
