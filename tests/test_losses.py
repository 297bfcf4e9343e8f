"""Loss functions: reference formulas, padding invariance, global normalisation, running stats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mspec import losses


def test_denoising_mse_matches_formula_and_ignores_padding():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(10, 3)).astype(np.float32)
    target = rng.normal(size=(10, 3)).astype(np.float32)
    mask = np.array([1] * 7 + [0] * 3, bool)
    ref = np.mean((pred[:7] - target[:7]) ** 2)
    got = losses.denoising_mse(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # Garbage in padding rows changes nothing.
    pred[7:] = 1e6
    got2 = losses.denoising_mse(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    np.testing.assert_allclose(got2, ref, rtol=1e-6)


def test_denoising_mse_uses_global_count_with_uneven_padding():
    """Over a [D, N, 3] batch the loss is sum / global count, not a mean of per-device means."""
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(2, 8, 3)).astype(np.float32)
    target = np.zeros_like(pred)
    mask = np.zeros((2, 8), bool)
    mask[0, :7] = True  # device 0: 7 atoms
    mask[1, :2] = True  # device 1: 2 atoms
    flat = np.concatenate([pred[0, :7], pred[1, :2]])
    got = losses.denoising_mse(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    np.testing.assert_allclose(got, np.mean(flat**2), rtol=1e-6)
    mean_of_means = 0.5 * (np.mean(pred[0, :7] ** 2) + np.mean(pred[1, :2] ** 2))
    assert abs(float(got) - mean_of_means) > 1e-3


def test_denoising_mse_empty_batch_is_zero_and_jittable():
    z = jnp.zeros((4, 3))
    assert float(jax.jit(losses.denoising_mse)(z, z + 1, jnp.zeros(4, bool))) == 0.0


def test_running_stats_match_numpy():
    rng = np.random.default_rng(2)
    stats = losses.running_stats_init()
    seen = []
    for _ in range(3):
        t = rng.normal(0.01, 0.04, size=(2, 6, 3)).astype(np.float32)
        m = rng.random((2, 6)) < 0.7
        stats = losses.running_stats_update(stats, jnp.asarray(t), jnp.asarray(m))
        seen.append(t[m])
    allv = np.concatenate(seen)
    mean, std = losses.running_stats_mean_std(stats)
    np.testing.assert_allclose(mean, allv.mean(0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(std, allv.std(0), rtol=1e-4)
    normed = losses.denoising_target(jnp.asarray(allv), "running", stats=stats)
    np.testing.assert_allclose(normed, (allv - allv.mean(0)) / allv.std(0), rtol=1e-3, atol=1e-4)


def test_denoising_target_modes():
    noise = jnp.full((2, 3), 0.02)
    np.testing.assert_allclose(losses.denoising_target(noise, "tau", tau=0.04), 0.5)
    np.testing.assert_allclose(losses.denoising_target(noise, "none"), 0.02)
    with pytest.raises(ValueError, match="unknown denoising target"):
        losses.denoising_target(noise, "sigma")
    with pytest.raises(ValueError, match="positive tau"):
        losses.denoising_target(noise, "tau")


def test_losses_module_depends_only_on_jax():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(losses))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"jax", "__future__", "typing"}, imported


@pytest.mark.parametrize("kind", ["mse", "smooth_l1"])
def test_property_and_force_losses_match_formulas_and_ignore_padding(kind):
    rng = np.random.default_rng(3)
    pred, target = rng.normal(size=(2, 5)) * 2, rng.normal(size=(2, 5))
    gm = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
    fp, ft = rng.normal(size=(2, 6, 3)) * 2, rng.normal(size=(2, 6, 3))
    nm = np.array([[1] * 4 + [0] * 2, [1] * 2 + [0] * 4], bool)

    def elementwise(err):  # torch: mse_loss / smooth_l1_loss(beta=1), reduction="none"
        a = np.abs(err)
        return err**2 if kind == "mse" else np.where(a < 1.0, 0.5 * err**2, a - 0.5)

    want_y = elementwise(pred - target)[gm].mean()
    want_f = elementwise(fp - ft)[nm].mean()
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got_y = losses.property_loss(f32(pred), f32(target), jnp.asarray(gm), kind)
    got_f = losses.force_loss(f32(fp), f32(ft), jnp.asarray(nm), kind)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5)
    np.testing.assert_allclose(got_f, want_f, rtol=1e-5)
    pred[~gm], fp[~nm] = 1e6, 1e6  # padding rows carry garbage: nothing changes
    np.testing.assert_allclose(losses.property_loss(f32(pred), f32(target), jnp.asarray(gm), kind), want_y, rtol=1e-5)
    np.testing.assert_allclose(losses.force_loss(f32(fp), f32(ft), jnp.asarray(nm), kind), want_f, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown loss kind 'l1'"):
        losses.property_loss(f32(pred), f32(target), jnp.asarray(gm), "l1")


def test_denoising_target_takes_a_traced_tau():
    noise = jnp.ones((4, 3))
    got = jax.jit(lambda n, t: losses.denoising_target(n, "tau", tau=t))(noise, jnp.float32(0.04))
    np.testing.assert_allclose(got, noise / 0.04, rtol=1e-6)
    for bad in (None, 0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="needs a positive tau"):
            losses.denoising_target(noise, "tau", tau=bad)
