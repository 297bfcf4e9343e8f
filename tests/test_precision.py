"""The compute dtype ``model.dtype`` (mspec.models.precision): float32 unchanged, bfloat16 within a
stated tolerance of float32 (outputs, forces, gradients, a short pre-training run), float32
parameters, norms and sums under bfloat16, and the fused CPU kernels refused or skipped.

Tolerances are stated in units of bfloat16's unit roundoff ``U = 2^-8`` (8 significant bits):
every bfloat16 value carries a relative rounding error of up to ``U`` (about 0.4%), so a
computation of a few tens of rounded steps lands some ``U`` away from float32. Measured on the
``:tiny`` model (F = 64, 2 layers) at initialisation, over six random batches, as norm-wise
relative errors: node features 0.7-0.8 ``U`` (they leave through a float32 LayerNorm), vector
features 1.9-2.4 ``U``, per-atom scalars 1.6-4.7 ``U`` and noise predictions 2.9-6.5 ``U`` (small
outputs of the heads, where the two gated blocks cancel), forces 5.0-8.5 ``U`` and parameter
gradients 6-7.5 ``U`` per array (a backward pass doubles the chain). Each bound below is about
twice the largest of these.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core

from experiments.configs import pretrain_frad
from mspec import graph, models
from mspec.data import datasets, pipeline
from mspec.kernels import build
from mspec.kernels import message as fused_message
from mspec.models import Model
from mspec.training import run_config, train
from test_et_model import build_batch, random_molecule

U = 2.0**-8  # bfloat16 unit roundoff
TOLERANCE = dict(node_features=2 * U, vectors=5 * U, scalar=10 * U, noise=12 * U, forces=16 * U)
GRAD_TOLERANCE = 16 * U  # per parameter array
SEEDS = (0, 1, 2)  # random batches
BUDGET = graph.Budget(n_node=97, n_edge=1800, n_graph=7, max_torsions=8)  # ~5 molecules
# The compared programs are compiled with LLVM's optimisation level 0: about half the compile
# time (most of these tests' time) for the same XLA program; the values differ from the default
# build's by float32 rounding (measured: 1e-6 relative), far below U.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def tiny_config(**model):
    """``pretrain_frad.py:tiny`` on one device, one sub-batch per step, with ``model`` keys."""
    c = pretrain_frad.get_config("tiny")
    c.microbatches = 1
    c.model.update(model)
    return c


def tiny_model(**model) -> Model:
    """The tiny config's model (F = 64, 2 layers, LayerNorm and whitened vector norm after
    each layer, scalar and noise heads); XLA message passing unless ``model`` says otherwise."""
    return models.get_model((tiny_config(**{"message_passing": "xla", **model})).model)


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


@pytest.fixture(scope="module")
def initial_state():
    """The tiny pre-training run's initial train state (float32 parameters), on the host."""
    trainer = train.Trainer(tiny_config(), tiny_model(), _mesh())
    return jax.device_get(trainer.init_state(jax.random.key(1), graph.pack([], BUDGET)))


def _batch(seed: int) -> dict:
    molecules = [random_molecule(seed), random_molecule(seed + 100, 9)]
    return {k: jnp.asarray(v) for k, v in build_batch(molecules, n_node=24, n_edge=200).items()}


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _shapes(model: Model, batch: dict):
    """The parameters' shapes and dtypes (enough to trace the model)."""
    return jax.eval_shape(model.init, jax.random.key(0), batch)["params"]


def _energy_fn(model: Model):
    """``(params, positions, batch) -> ((energy, outputs), (param grads, dE/dpositions))``."""

    def energy(params, positions, batch):
        out = model.apply({"params": params}, {**batch, "positions": positions})
        return jnp.sum(out["scalar"]), out

    return jax.value_and_grad(energy, argnums=(0, 1), has_aux=True)


def _jaxpr(model: Model, params, batch):
    """The forward and backward pass (energy, outputs, gradients and forces) as a jaxpr."""
    return jax.make_jaxpr(lambda p: _energy_fn(model)(p, batch["positions"], batch))(params)


@pytest.fixture(scope="module")
def runs(initial_state):
    """Outputs, forces and gradients of the tiny model in both dtypes at its initial
    parameters, on a few random batches."""
    fns = {
        dt: jax.jit(_energy_fn(tiny_model(dtype=dt)), compiler_options=FAST_COMPILE)
        for dt in ("float32", "bfloat16")
    }
    out = {}
    for seed in SEEDS:
        batch = _batch(seed)
        for dt, fn in fns.items():
            (_, outputs), (grads, d_pos) = fn(initial_state["params"], batch["positions"], batch)
            out[seed, dt] = (outputs, grads, -d_pos)
    return out


def test_float32_is_the_model_without_the_option():
    batch = _batch(0)
    default = Model(hidden=64, num_layers=2, num_rbf=16)  # a Model built without the option
    params = _shapes(default, batch)
    ref = _jaxpr(default, params, batch)
    # The same program, operation by operation, hence bitwise the same values and gradients.
    for dtype in ("float32", jnp.float32):
        model = Model(hidden=64, num_layers=2, num_rbf=16, dtype=dtype)
        assert str(_jaxpr(model, params, batch)) == str(ref)
    assert str(_jaxpr(tiny_model(), params, batch)) == str(ref)  # the configs' default
    assert "bfloat16" not in {dtype for _, dtype, _ in _equations(ref.jaxpr)}


def test_bfloat16_outputs_and_forces_are_within_tolerance_of_float32(runs):
    for seed in SEEDS:
        (o32, _, f32), (o16, _, f16) = runs[seed, "float32"], runs[seed, "bfloat16"]
        errors = {k: _relative(o32[k], o16[k]) for k in ("node_features", "vectors", "scalar", "noise")}
        errors["forces"] = _relative(f32, f16)
        for key, err in errors.items():
            assert err < TOLERANCE[key], (seed, key, err / U)
        # ... and it is bfloat16 that ran: not float32's values (the option is not ignored).
        assert min(errors.values()) > U / 16, errors
        assert all(v.dtype == jnp.float32 for v in o16.values())  # losses read float32


def test_bfloat16_keeps_float32_parameters_and_close_finite_gradients(runs):
    batch = _batch(0)
    p32, p16 = _shapes(tiny_model(), batch), _shapes(tiny_model(dtype="bfloat16"), batch)
    assert jax.tree.structure(p16) == jax.tree.structure(p32)
    assert all(b.dtype == jnp.float32 and b.shape == a.shape
               for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)))
    for seed in SEEDS:
        g32, g16 = runs[seed, "float32"][1], runs[seed, "bfloat16"][1]
        paths = jax.tree_util.tree_leaves_with_path(g32)
        for (path, a), b in zip(paths, jax.tree.leaves(g16)):
            name = jax.tree_util.keystr(path)
            assert b.dtype == jnp.float32 and np.all(np.isfinite(b)), name
            if np.any(a):  # the first layer's vec_proj only ever meets zeros: 0 in both
                assert _relative(a, b) < GRAD_TOLERANCE, (seed, name, _relative(a, b) / U)
            else:
                assert not np.any(b), name


def _equations(jaxpr):
    """``(primitive, input dtype, input and output shapes)`` of every equation, sub-jaxprs
    included (one entry per input dtype)."""
    for eqn in jaxpr.eqns:
        arrays = [v.aval for v in eqn.invars if hasattr(v.aval, "dtype")]
        shapes = [a.shape for a in arrays] + [v.aval.shape for v in eqn.outvars]
        for dtype in {str(a.dtype) for a in arrays}:
            yield eqn.primitive.name, dtype, shapes
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    yield from _equations(sub)


def test_bfloat16_runs_the_matmuls_in_bfloat16_and_norms_and_sums_in_float32():
    batch = _batch(0)
    model = tiny_model(dtype="bfloat16")
    params = _shapes(model, batch)
    fwd = list(_equations(jax.make_jaxpr(lambda p: model.apply({"params": p}, batch))(params).jaxpr))
    both = list(_equations(_jaxpr(model, params, batch).jaxpr))
    dots = [(dtype, shapes) for prim, dtype, shapes in fwd if prim == "dot_general"]
    # Every Linear of the encoder and heads (one dot per kernel) computes in bfloat16 ...
    kernels = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(params) if "kernel" in str(path))
    assert sum(dtype == "bfloat16" for dtype, _ in dots) >= kernels
    # ... and the float32 ones are the whitened vector norm's per-atom 3 x 3 algebra.
    for dtype, shapes in dots:
        if dtype != "bfloat16":
            assert dtype == "float32" and any(len(s) == 3 and s[1] == 3 for s in shapes), shapes
    # That algebra (the covariance V V^T / F, its inverse square root, the whitening) is float32,
    # forward and backward: in bfloat16 the whitening would amplify its round-off by up to
    # 1 / sqrt(1e-5) ~ 300 along directions of small variance.
    for prim, dtype, shapes in both:
        if prim == "dot_general" and any(s[-2:] == (3, 3) for s in shapes):
            assert dtype == "float32", shapes
    # The 3 x 3 covariance's eigh and every (inverse) square root of a norm stay float32, and every
    # segment sum (messages forward, gathered rows backward) accumulates in float32.
    for prim in ("eigh", "rsqrt", "scatter-add"):
        dtypes = {dtype for p, dtype, _ in both if p == prim} - {"int32"}
        assert dtypes == {"float32"}, (prim, dtypes)


def test_fused_message_passing_is_float32_only(monkeypatch, caplog):
    batch = _batch(0)
    try:
        build.load()
    except build.KernelUnavailable:
        pytest.skip("the fused kernels do not build here")
    with pytest.raises(build.KernelUnavailable) as error:
        _shapes(tiny_model(message_passing="fused", dtype="bfloat16"), batch)
    assert str(error.value).splitlines()[0] == (
        "model.message_passing='fused': the fused kernel is float32 only, the features are bfloat16"
    )
    assert fused_message.use_fused("auto", jnp.float32)
    monkeypatch.setattr(fused_message, "_fallback_noted", False)  # the note is printed once
    with caplog.at_level(logging.WARNING, logger="mspec"):
        assert not fused_message.use_fused("auto", jnp.bfloat16)
    assert "message passing with XLA ops (the fused kernel is float32 only" in caplog.text
    with pytest.raises(ValueError, match="Unknown model dtype 'float16'; expected one of"):
        _shapes(tiny_model(dtype="float16"), batch)


def test_a_workdir_written_before_model_dtype_resumes_as_float32():
    stored = {"model": {"hidden": 64, "message_passing": "auto"}}  # a config from before the key
    current = {"model": {"hidden": 64, "message_passing": "auto", "dtype": "float32"}}
    assert run_config.check_resume(stored, current, directory="w", step=2) == []
    with pytest.raises(run_config.ConfigError, match=r"model.dtype \('float32' -> 'bfloat16'\)"):
        run_config.check_resume(stored, {"model": {**current["model"], "dtype": "bfloat16"}},
                                directory="w", step=2)


def test_short_bfloat16_pretraining_run_tracks_float32(qm9_sample_dir, initial_state):
    """The tiny Frad pre-training config, 30 steps of the real update (Frad noise, loss, AdamW
    with warm-up) on the same qm9/sample batches and noise, once per dtype from the same state.

    Measured: the bfloat16 losses differ from float32's by 0.1% (median) and 1.1% (largest, at the
    second step) of the loss, 0.2% on average; the bounds are about three times that.
    """
    source = datasets.open_split(datasets.get_builder("qm9/sample", qm9_sample_dir, build=False), "train")
    ds = pipeline.make_grain_dataset(source, pipeline.Featurizer(radius=5.5, max_z=100), seed=0,
                                     shuffle=False, repeat=False)
    it = pipeline.PackedBatchIterator(ds, BUDGET, num_devices=1)
    batches = [next(it) for _ in range(30)]
    it.close()
    curves = {}
    for dtype in ("float32", "bfloat16"):
        c = tiny_config(dtype=dtype)  # message_passing "auto": fused kernels for float32 only
        trainer = train.Trainer(c, models.get_model(c.model), _mesh())
        update = jax.jit(trainer._update, donate_argnums=(0,), compiler_options=FAST_COMPILE)
        state = jax.device_put(initial_state, trainer.replicated)
        curves[dtype] = []
        for b in batches:
            state, measured = update(state, trainer.global_batch(b))
            curves[dtype].append(float(measured["loss"]))
    f32, bf16 = np.array(curves["float32"]), np.array(curves["bfloat16"])
    assert np.all(np.isfinite(bf16)) and f32[-1] < 0.5 * f32[0]  # a run that trains
    difference = np.abs(bf16 - f32) / f32
    assert np.max(difference) < 0.03 and np.mean(difference) < 0.006, difference
    assert np.any(difference > 0)
