"""The fused C++ message-passing kernel (mspec/kernels/et_message.cc) against the XLA formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mspec import graph, models
from mspec.data import datasets, pipeline
from mspec.kernels import build
from mspec.kernels import message as fm
from mspec.models import et as et_lib
from mspec.models.et import EquivariantTransformer
from mspec.training import train
from tests.test_train import tiny_config

needs_kernel = pytest.mark.skipif(
    not build.available(), reason=f"fused kernel unavailable here: {build._error}"
)


def _inputs(seed=0, n=37, e=300, f=64):
    rng = np.random.default_rng(seed)
    rn = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    # q, k, u, vec, filter rows [pk | pv] before bias and SiLU, their bias, unit, cut
    floats = [rn(n, f), rn(n, f), rn(n, 3 * f), rn(n, 3, f), rn(e, 4 * f), rn(4 * f), rn(e, 3),
              jnp.asarray(rng.random(e).astype(np.float32))]
    mask = jnp.asarray((rng.random(e) > 0.2).astype(np.float32))
    # Random, unsorted edges with repeats: the kernel must not assume the pipeline's order.
    senders = jnp.asarray(rng.integers(0, n, e).astype(np.int32))
    receivers = jnp.asarray(rng.integers(0, n, e).astype(np.int32))
    cts = (rn(n, f), rn(n, 3, f))
    return floats, mask, senders, receivers, cts


def _pair_layout_inputs(seed=0, molecules=9, f=64):
    """Fully connected molecules of 1-12 atoms (one with a single atom) in graph.pack's pair
    layout: many components, pair filter rows, and the self-loop row shared by all of them. The
    mask drops random edges, some pairs in one direction only."""
    rng = np.random.default_rng(seed)
    mols = []
    for g in range(molecules):
        n = 1 if g == 3 else int(rng.integers(2, 13))
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        mols.append({"atomic_numbers": np.ones(n, np.int32),
                     "positions": rng.normal(size=(n, 3)).astype(np.float32),
                     "senders": j.ravel().astype(np.int32), "receivers": i.ravel().astype(np.int32),
                     "torsions": np.zeros((0, 4), np.int32), "moving": np.zeros((0, n), bool)})
    nodes = sum(len(m["atomic_numbers"]) for m in mols) + 3  # padding nodes
    edges = nodes + sum(len(m["senders"]) - len(m["atomic_numbers"]) for m in mols) + 11  # spare
    b = graph.pack(mols, graph.Budget(n_node=nodes, n_edge=edges, n_graph=molecules + 1, max_torsions=1))
    rows = graph.num_pairs(edges, nodes) + 1
    rn = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    floats = [rn(nodes, f), rn(nodes, f), rn(nodes, 3 * f), rn(nodes, 3, f), rn(rows, 4 * f),
              rn(4 * f), rn(edges, 3), jnp.asarray(rng.random(edges).astype(np.float32))]
    mask = jnp.asarray((b["edge_mask"] & (rng.random(edges) > 0.15)).astype(np.float32))
    cts = (rn(nodes, f), rn(nodes, 3, f))
    return floats, mask, jnp.asarray(b["senders"]), jnp.asarray(b["receivers"]), cts, rows - 1


def _assert_fused_matches_xla(floats, mask, s, r, cts, heads, pairs, schedule):
    cx, cv = cts
    e = s.shape[0]

    def loss(fn):
        def f(*a):
            x, v = fn(*a)
            return jnp.sum(x * cx) + jnp.sum(v * cv)

        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(8))))

    def xla(q, k, u, vec, filters, bias, unit, cut):  # the kernel adds the bias, applies the SiLU
        f = q.shape[1]
        dk, dv = jax.nn.silu(filters[:, :f] + bias[:f]), jax.nn.silu(filters[:, f:] + bias[f:])
        if pairs is not None:
            dk, dv = graph.expand_pair_rows(dk, e), graph.expand_pair_rows(dv, e)
        return et_lib.message_passing_xla(q, k, u, vec, dk, dv, unit, cut, mask, s, r, heads)

    v1, g1 = loss(xla)(*floats)
    v2, g2 = loss(lambda *a: fm.message_fused(*a, mask, s, r, heads, pairs=pairs, schedule=schedule))(*floats)
    assert float(v2) == pytest.approx(float(v1), rel=1e-5)
    for name, a, b in zip("q k u vec filters bias unit cut".split(), g1, g2):
        scale = float(jnp.abs(a).max())
        assert scale > 0, name
        np.testing.assert_allclose(b, a, atol=1e-5 * scale, rtol=0, err_msg=name)


def _assert_second_order_matches_xla(floats, mask, s, r, cts, heads, pairs):
    """The gradient of a loss built from the kernel's gradient (as a force loss is): the VJP of
    the backward (the second-order kernel), against the same with XLA ops."""
    cx, cv = cts
    e = s.shape[0]
    rng = np.random.default_rng(5)
    directions = [jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)) for x in floats]

    def xla(q, k, u, vec, filters, bias, unit, cut):
        f = q.shape[1]
        dk, dv = jax.nn.silu(filters[:, :f] + bias[:f]), jax.nn.silu(filters[:, f:] + bias[f:])
        if pairs is not None:
            dk, dv = graph.expand_pair_rows(dk, e), graph.expand_pair_rows(dv, e)
        return et_lib.message_passing_xla(q, k, u, vec, dk, dv, unit, cut, mask, s, r, heads)

    def second(fn):
        def phi(*a):
            x, v = fn(*a)
            return jnp.sum(x * cx) + jnp.sum(v * cv)

        def outer(*a):  # first derivatives in the loss, and the values too
            g = jax.grad(phi, argnums=tuple(range(8)))(*a)
            return sum(jnp.sum(gi * di) for gi, di in zip(g, directions)) + 0.1 * phi(*a)

        return jax.jit(jax.grad(outer, argnums=tuple(range(8))))(*floats)

    fused = lambda *a: fm.message_fused(*a, mask, s, r, heads, pairs=pairs)
    for name, a, b in zip("q k u vec filters bias unit cut".split(), second(xla), second(fused)):
        scale = float(jnp.abs(a).max())
        assert scale > 0, name
        np.testing.assert_allclose(b, a, atol=2e-5 * scale, rtol=0, err_msg=name)


@needs_kernel
@pytest.mark.parametrize("heads", [2, 4, 8])
def test_fused_second_derivatives_match_xla(heads):
    """Training on forces differentiates the kernel's backward: per molecule in the pair layout
    (F = 64: head widths 32 and 16, compiled as constants, and 8), and one big component of
    random edges with per-edge rows (where the first-order kernel would use its passes
    schedule; the second-order one always works per component)."""
    floats, mask, s, r, cts, pairs = _pair_layout_inputs(seed=heads)
    _assert_second_order_matches_xla(floats, mask, s, r, cts, heads, pairs)
    floats, mask, s, r, cts = _inputs(seed=heads, n=23, e=160)
    _assert_second_order_matches_xla(floats, mask, s, r, cts, heads, None)


@needs_kernel
def test_fused_second_derivatives_equal_finite_differences_of_the_kernels():
    """Independently of the XLA formulation: the second-order kernel's two outputs are the
    directional derivatives of the first-order kernels, ``H t = d/dh backward(x + h t)`` and
    ``J t = d/dh forward(x + h t)``, checked by central differences of the fused kernels
    themselves (float32, Richardson-extrapolated central differences on inputs of order 1)."""
    floats, mask, s, r, cts, pairs = _pair_layout_inputs(seed=7, molecules=4)
    rng = np.random.default_rng(8)
    t = [jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)) for x in floats]
    fwd = lambda *a: fm.message_fused(*a, mask, s, r, 4, pairs=pairs)
    bwd = jax.jit(lambda *a: jax.vjp(fwd, *a)[1](cts))
    shifted = lambda h: [x + h * d for x, d in zip(floats, t)]

    # Reverse mode through the backward: the gradient of <backward(x, c), t> is H t in x and J t
    # in c (the second-order kernel; H is symmetric).
    def along_t(xs, c):
        return sum(jnp.sum(g * d) for g, d in zip(jax.vjp(fwd, *xs)[1](c), t))

    ht, jt = jax.jit(jax.grad(along_t, argnums=(0, 1)))(floats, cts)
    def central(fn, h):
        return [(a - b) / (2 * h) for a, b in zip(fn(*shifted(h)), fn(*shifted(-h)))]

    def richardson(fn, h=2e-2):  # error O(h^4): the logits' SiLU curves too fast for O(h^2)
        return [(4 * a - b) / 3 for a, b in zip(central(fn, h / 2), central(fn, h))]

    fd_ht, fd_jt = richardson(bwd), richardson(jax.jit(fwd))
    for name, got, want in zip("q k u vec filters bias unit cut x_agg vec_agg".split(),
                               [*ht, *jt], [*fd_ht, *fd_jt]):
        scale = float(jnp.abs(want).max())
        assert scale > 0, name
        np.testing.assert_allclose(got, want, atol=2e-3 * scale, rtol=0, err_msg=name)


@needs_kernel
def test_fused_second_derivatives_are_deterministic():
    floats, mask, s, r, (cx, cv), pairs = _pair_layout_inputs(seed=1, molecules=24)

    @jax.jit
    def second(*a):
        def phi(*a):
            x, v = fm.message_fused(*a, mask, s, r, 4, pairs=pairs)
            return jnp.sum(x * cx) + jnp.sum(v * cv)

        def outer(*a):
            return sum(jnp.sum(g ** 2) for g in jax.grad(phi, argnums=tuple(range(8)))(*a))

        return jax.grad(outer, argnums=tuple(range(8)))(*a)

    first = jax.device_get(second(*floats))
    for _ in range(3):
        for a, b in zip(first, jax.device_get(second(*floats))):
            np.testing.assert_array_equal(a, b)


@needs_kernel
@pytest.mark.parametrize("schedule", ["auto", "components", "passes"])
def test_fused_values_and_gradients_match_xla(schedule):
    """Random edges in random order, one filter row per edge (one big component)."""
    floats, mask, s, r, cts = _inputs()
    _assert_fused_matches_xla(floats, mask, s, r, cts, 8, None, schedule)


@needs_kernel
@pytest.mark.parametrize("heads", [2, 32])
def test_fused_matches_xla_for_other_head_widths(heads):
    """F = 64: 2 heads of D = 32 (the width the kernel compiles as a constant, as in the papers'
    8 x 32) and 32 heads of D = 2 (more heads than one block of attention weights)."""
    floats, mask, s, r, cts, pairs = _pair_layout_inputs(seed=3)
    for schedule in ("components", "passes"):
        _assert_fused_matches_xla(floats, mask, s, r, cts, heads, pairs, schedule)


@needs_kernel
@pytest.mark.parametrize("schedule", ["auto", "components", "passes"])
def test_fused_matches_xla_on_pair_rows_across_molecules(schedule):
    """The pair layout: one component per molecule, pair rows owned by one component, the
    self-loop row summed over all of them."""
    floats, mask, s, r, cts, pairs = _pair_layout_inputs()
    _assert_fused_matches_xla(floats, mask, s, r, cts, 4, pairs, schedule)
    # The same edges shuffled: the kernel groups them itself.
    perm = np.random.default_rng(5).permutation(s.shape[0])
    (q, k, u, vec, filters, bias, unit, cut) = floats
    frow = graph.pair_filter_rows(s.shape[0], q.shape[0])[perm]
    shuffled = [q, k, u, vec, filters[frow], bias, unit[perm], cut[perm]]  # per-edge rows
    _assert_fused_matches_xla(shuffled, mask[perm], s[perm], r[perm], cts, 4, None, schedule)


def test_unknown_schedule_is_an_error():
    floats, mask, s, r, _ = _inputs()
    with pytest.raises(ValueError, match="Unknown schedule 'threads'"):
        fm.message_fused(*floats, mask, s, r, 8, schedule="threads")


def test_filter_shapes_are_checked():
    (q, k, u, vec, filters, bias, unit, cut), mask, s, r, _ = _inputs()
    with pytest.raises(ValueError, match=r"filters \(300, 192\) .* must be \(300, 256\)"):
        fm.message_fused(q, k, u, vec, filters[:, :192], bias, unit, cut, mask, s, r, 8)
    with pytest.raises(ValueError, match=r"filter_bias \(64,\)"):
        fm.message_fused(q, k, u, vec, filters, bias[:64], unit, cut, mask, s, r, 8)


@needs_kernel
def test_model_with_fused_kernel_matches_xla_under_data_parallelism(qm9_sample_dir):
    builder = datasets.get_builder("qm9/sample", qm9_sample_dir, build=False)
    source = datasets.open_split(builder, "train")
    feat = pipeline.Featurizer(radius=5.5, max_z=100)
    mols = [feat(source[i]) for i in range(8)]
    budget = graph.Budget(n_node=200, n_edge=4000, n_graph=9, max_torsions=8)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    stats = tuple(np.zeros(()) for _ in range(3))
    results = []
    for mode in ("xla", "fused"):
        c = tiny_config(qm9_sample_dir, **{"model.message_passing": mode})
        trainer = train.Trainer(c, models.get_model(c.model), mesh)
        params = trainer.init_state(jax.random.key(0), graph.pack([], budget))["params"]
        batch = trainer.global_batch(
            graph.stack([graph.pack(mols[:4], budget), graph.pack(mols[4:], budget)])
        )
        (loss, _), grads = jax.jit(trainer.loss_and_grads)(params, jax.random.key(3), batch, stats)
        results.append((float(loss), jax.device_get(grads)))
    (l1, g1), (l2, g2) = results
    assert l2 == pytest.approx(l1, rel=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, atol=1e-5 * (np.abs(a).max() + 1e-12), rtol=0)


def test_message_passing_setting_errors_and_fallback(monkeypatch, caplog):
    with pytest.raises(ValueError, match="Unknown message_passing 'cuda'"):
        fm.use_fused("cuda", jnp.float32)
    assert fm.use_fused("xla", jnp.float32) is False
    with pytest.raises(build.KernelUnavailable, match="float32 only"):
        fm.use_fused("fused", jnp.float64)

    def broken():
        raise build.KernelUnavailable("no C++ compiler 'g++' on PATH (set $CXX)")

    monkeypatch.setattr(build, "load", broken)
    monkeypatch.setattr(fm, "_fallback_noted", False)
    with caplog.at_level("WARNING", logger="mspec"):
        assert fm.use_fused("auto", jnp.float32) is False  # falls back, says why once
        assert fm.use_fused("auto", jnp.float32) is False
    assert [r.getMessage() for r in caplog.records] == [
        "message passing with XLA ops (the fused kernel is unavailable: no C++ compiler 'g++' "
        "on PATH (set $CXX))"
    ]
    with pytest.raises(build.KernelUnavailable, match="no C\\+\\+ compiler"):
        fm.use_fused("fused", jnp.float32)


def test_auto_on_an_accelerator_is_xla_without_a_warning(monkeypatch, caplog):
    """"auto" means XLA ops on GPUs and TPUs: that is the setting working, not a fallback."""
    monkeypatch.setattr(fm.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(fm, "_fallback_noted", False)
    with caplog.at_level("WARNING", logger="mspec"):
        assert fm.use_fused("auto", jnp.float32) is False
    assert caplog.records == []
    with pytest.raises(build.KernelUnavailable, match="runs on CPU only, this is gpu"):
        fm.use_fused("fused", jnp.float32)


def test_a_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("MSPEC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setattr(build, "_error", None)
    with pytest.raises(build.KernelUnavailable, match="no C\\+\\+ compiler 'no-such-compiler'"):
        build.load()
    assert not build.available()  # the failure is remembered, not retried on every call


def test_resume_ignores_how_messages_are_computed():
    a = {"hidden": 64, "message_passing": "auto"}
    assert train.model_math(a) == train.model_math({"hidden": 64})
    assert train.model_math(a) != train.model_math({"hidden": 128})


@pytest.mark.parametrize("mode", ["xla", pytest.param("fused", marks=needs_kernel)])
def test_filters_once_per_pair_equal_filters_per_edge(mode, qm9_sample_dir):
    """The pair layout's shared distance filters give the per-edge result: values and gradients,
    also when the neighbour cap keeps only one direction of a pair."""
    builder = datasets.get_builder("qm9/sample", qm9_sample_dir, build=False)
    source = datasets.open_split(builder, "train")
    feat = pipeline.Featurizer(radius=5.5, max_z=100)
    budget = graph.Budget(n_node=120, n_edge=3001, n_graph=7, max_torsions=8)  # odd spare slot
    b = graph.pack([feat(source[i]) for i in range(6)], budget)
    rng = np.random.default_rng(0)
    pos = jnp.asarray(b["positions"] + rng.normal(0, 0.2, b["positions"].shape).astype(np.float32))
    s, r = jnp.asarray(b["senders"]), jnp.asarray(b["receivers"])
    mask = graph.active_edges(pos, s, r, jnp.asarray(b["edge_mask"]), 5.0, 6)
    one_way = np.asarray(mask[: budget.n_pair]) != np.asarray(mask[budget.n_pair : 2 * budget.n_pair])
    assert one_way.any()  # the cap really drops one direction of some pairs
    z = jnp.asarray(b["atomic_numbers"])
    model = EquivariantTransformer(hidden=32, num_layers=2, num_heads=4, num_rbf=16, message_passing=mode)
    params = model.init(jax.random.key(0), z, pos, s, r, mask)
    cx = jnp.asarray(rng.standard_normal((120, 32)).astype(np.float32))
    cv = jnp.asarray(rng.standard_normal((120, 3, 32)).astype(np.float32))

    def loss(p, pairs):
        x, v = model.apply(p, z, pos, s, r, mask, num_pairs=pairs)
        keep = jnp.asarray(b["node_mask"], jnp.float32)
        return jnp.sum(x * cx * keep[:, None]) + jnp.sum(v * cv * keep[:, None, None])

    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, None)))(params)
    l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(p, budget.n_pair)))(params)
    assert float(l2) == pytest.approx(float(l1), rel=1e-5)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(c, a, atol=1e-5 * (np.abs(a).max() + 1e-12), rtol=0)
    with pytest.raises(ValueError, match="num_pairs=3 does not match"):
        model.apply(params, z, pos, s, r, mask, num_pairs=3)


@needs_kernel
@pytest.mark.parametrize("schedule", ["components", "passes"])
def test_fused_gradients_are_deterministic(schedule):
    """Every output of the kernel is summed in a fixed order, whatever thread runs it (exact
    resume relies on bitwise-repeatable steps)."""
    floats, mask, s, r, (cx, cv), pairs = _pair_layout_inputs(seed=1, molecules=24)

    @jax.jit
    def grads(*a):
        def f(*a):
            x, v = fm.message_fused(*a, mask, s, r, 4, pairs=pairs, schedule=schedule)
            return jnp.sum(x * cx) + jnp.sum(v * cv)

        return jax.grad(f, argnums=tuple(range(8)))(*a)

    first = jax.device_get(grads(*floats))
    for _ in range(3):
        for a, b in zip(first, jax.device_get(grads(*floats))):
            np.testing.assert_array_equal(a, b)


_THREADS_SCRIPT = """
import os, sys
# The CPUs this process may use, set before jax starts its thread pools.
os.sched_setaffinity(0, [int(c) for c in os.environ["MSPEC_TEST_CPUS"].split(",")])
import jax, jax.numpy as jnp, numpy as np
from mspec.kernels import message as fm
from tests.test_fused_message import _pair_layout_inputs
outs = []
for molecules in (24, 3):  # many components (per molecule) and few (the passes schedule)
    floats, mask, s, r, (cx, cv), pairs = _pair_layout_inputs(seed=2, molecules=molecules)
    def f(*a):
        x, v = fm.message_fused(*a, mask, s, r, 4, pairs=pairs)
        return jnp.sum(x * cx) + jnp.sum(v * cv)
    outs += jax.device_get(jax.jit(jax.grad(f, argnums=tuple(range(8))))(*floats))
# The process's OS threads: XLA's thread pools grow with the CPUs the process may use.
np.savez(sys.argv[1], *outs, threads=len(os.listdir("/proc/self/task")))
"""


@needs_kernel
def test_fused_results_do_not_depend_on_the_thread_count(tmp_path):
    """The kernel runs on XLA's intra-op thread pool, whose size follows the CPUs the process may
    use; the automatic schedule looks at the batch only. So a run resumed in a process with
    another thread count repeats the same steps bit for bit (one CPU vs all of them here)."""
    import os
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs os.sched_setaffinity (Linux)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cpus = sorted(os.sched_getaffinity(0))
    results, threads = [], []
    for allowed in ({cpus[0]}, set(cpus)):
        out = tmp_path / f"grads_{len(allowed)}.npz"
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   MSPEC_TEST_CPUS=",".join(str(c) for c in sorted(allowed)))
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(out)], cwd=repo, env=env,
                       check=True, timeout=300)
        with np.load(out) as z:
            arrays = [k for k in z.files if k.startswith("arr_")]
            results.append([z[k] for k in sorted(arrays, key=lambda k: int(k.split("_")[1]))])
            threads.append(int(z["threads"]))
    if len(cpus) > 1:  # the affinity did change the size of XLA's thread pool
        assert threads[0] < threads[1], threads
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
