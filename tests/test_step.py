"""mspec.training.step: the update pieces every trainer shares."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mspec.training import step


def _loss(params, key, batch):
    """A weighted least-squares loss with a random term, so the per-sub-batch key matters."""
    noise = jax.random.normal(key, batch["x"].shape)
    pred = (batch["x"] + 0.1 * noise) @ params["w"] + params["b"]
    err = jnp.sum(batch["mask"][:, None] * jnp.square(pred - batch["y"]))
    count = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
    return err / count, {"mean_abs": jnp.sum(batch["mask"][:, None] * jnp.abs(pred - batch["y"])) / count}


def test_accumulated_gradients_are_the_share_weighted_sum_over_sub_batches():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros(2)}
    k = 4
    batches = {"x": jnp.asarray(rng.normal(size=(k, 5, 3)), jnp.float32),
               "y": jnp.asarray(rng.normal(size=(k, 5, 2)), jnp.float32),
               "mask": jnp.asarray(rng.random((k, 5)) > 0.3, jnp.float32)}
    counts = jnp.sum(batches["mask"], axis=1)
    shares = counts / jnp.sum(counts)
    key = jax.random.key(3)
    (loss, aux), grads = step.accumulated_value_and_grad(_loss, params, key, batches, shares)
    keys = jax.random.split(key, k)
    expected_loss, expected_aux, expected_grads = 0.0, 0.0, jax.tree.map(jnp.zeros_like, params)
    for i in range(k):
        sub = jax.tree.map(lambda x: x[i], batches)
        (l_i, a_i), g_i = jax.value_and_grad(_loss, has_aux=True)(params, keys[i], sub)
        expected_loss += shares[i] * l_i
        expected_aux += shares[i] * a_i["mean_abs"]
        expected_grads = jax.tree.map(lambda e, g: e + shares[i] * g, expected_grads, g_i)
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)
    assert float(aux["mean_abs"]) == pytest.approx(float(expected_aux), rel=1e-6)
    for name in params:
        np.testing.assert_allclose(grads[name], expected_grads[name], rtol=1e-5, atol=1e-7)


def test_apply_gradients_steps_the_optimiser_and_reports_norms():
    tx = optax.adam(1e-2)
    schedule = optax.constant_schedule(1e-2)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.asarray([1.0, -2.0, 0.0])}
    state = {"params": params, "opt": tx.init(params), "step": jnp.asarray(0)}
    new, opt, m = step.apply_gradients(tx, schedule, state, grads)
    updates, expected_opt = tx.update(grads, state["opt"], params)
    for name in params:
        np.testing.assert_array_equal(new[name], params[name] + updates[name])
    assert float(m["grad_norm"]) == pytest.approx(np.sqrt(6 * 0.25 + 1 + 4))
    assert float(m["param_norm"]) == pytest.approx(float(optax.tree.norm(new)), rel=1e-6)
    assert float(m["update_norm"]) == pytest.approx(float(optax.tree.norm(updates)), rel=1e-6)
    assert float(m["lr"]) == pytest.approx(1e-2)
    # A plateau factor scales the update and the reported learning rate; not the optimiser state.
    half, opt_half, m_half = step.apply_gradients(tx, schedule, state, grads, lr_scale=jnp.float32(0.5))
    for name in params:
        np.testing.assert_allclose(half[name] - params[name], 0.5 * updates[name], atol=1e-6)
    assert float(m_half["lr"]) == pytest.approx(5e-3)
    jax.tree.map(np.testing.assert_array_equal, opt_half, opt)


def test_the_step_key_depends_only_on_seed_and_step():
    a = jax.random.key_data(step.step_key(7, jnp.asarray(12)))
    b = jax.random.key_data(step.step_key(7, jnp.asarray(12)))
    c = jax.random.key_data(step.step_key(7, jnp.asarray(13)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


class _ToyTrainer:
    """The interface :func:`step.update` needs: a least-squares model with a running count."""

    def __init__(self):
        self.config = type("Config", (), {"seed": 5})()
        self.tx = optax.sgd(0.1)
        self.schedule = optax.constant_schedule(0.1)
        self.traces = 0
        self.keys = []

    def objective_and_grads(self, state, rng, batch):
        self.keys.append(rng)
        (loss, aux), grads = jax.value_and_grad(_loss, has_aux=True)(state["params"], rng, batch)
        return (loss, (aux, {"seen": state["seen"] + jnp.sum(batch["mask"])})), grads


def test_update_steps_params_carries_the_trainer_state_and_keeps_the_rest():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros(2)}
    batch = {"x": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32), "mask": jnp.ones(5)}
    trainer = _ToyTrainer()
    state = {"params": params, "opt": trainer.tx.init(params), "step": jnp.asarray(3),
             "seen": jnp.asarray(10.0), "best": jnp.asarray(7.0)}
    new, m = jax.jit(lambda s, b: step.update(trainer, s, b))(state, batch)
    assert trainer.traces == 1
    key = step.step_key(5, jnp.asarray(3))
    (loss, aux), grads = jax.value_and_grad(_loss, has_aux=True)(params, key, batch)
    for name in params:  # plain SGD: params - 0.1 * grads, with the step's own key
        np.testing.assert_allclose(new["params"][name], params[name] - 0.1 * grads[name], rtol=1e-5,
                                   atol=1e-6)
    assert int(new["step"]) == 4 and float(new["seen"]) == 15.0 and float(new["best"]) == 7.0
    assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert set(m) == {"loss", "mean_abs", "lr", "grad_norm", "param_norm", "update_norm"}
    # Fine-tuning's plateau factor in the state scales the update.
    scaled, m_scaled = step.update(trainer, {**state, "lr_scale": jnp.float32(0.5)}, batch)
    for name in params:
        np.testing.assert_allclose(scaled["params"][name], params[name] - 0.05 * grads[name],
                                   rtol=1e-5, atol=1e-6)
    assert float(m_scaled["lr"]) == pytest.approx(0.05) and float(scaled["lr_scale"]) == 0.5
