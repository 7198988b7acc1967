"""The engine's one optimizer step (recipes/engine/workflow.py jit_train_step)."""

import jax.numpy as jnp
import numpy as np
import optax

from recipes.engine import workflow


def test_one_step_by_hand_on_a_data_parallel_mesh():
    # Least squares with momentum SGD, a batch split over 4 devices, a state entry the loss
    # replaces (a running mean of the predictions) and one extra argument (a loss scale).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3))
    y = rng.standard_normal(8)
    w0 = rng.standard_normal(3)
    lr, momentum, scale = 0.1, 0.9, 0.5
    mesh = workflow.create_mesh(4)

    def loss_fn(params, state, batch, loss_scale):
        pred = batch["x"] @ params["w"]
        loss = loss_scale * jnp.mean((pred - batch["y"]) ** 2)
        new_mean = 0.5 * state["running_mean"] + 0.5 * jnp.mean(pred)
        return loss, ({"max_error": jnp.max(jnp.abs(pred - batch["y"]))},
                      {"running_mean": new_mean})

    tx = optax.sgd(lr, momentum=momentum)
    step = workflow.jit_train_step(loss_fn, tx, mesh, num_args=1)
    params = {"w": jnp.asarray(w0, jnp.float32)}
    state = {"params": params, "running_mean": jnp.float32(2.0), "opt_state": tx.init(params)}
    batch = workflow.shard_batch({"x": x.astype(np.float32), "y": y.astype(np.float32)}, mesh)
    for _ in range(2):
        state, metrics = step(state, batch, jnp.float32(scale))

    # By hand in float64: two momentum steps from the same point, the second at the new weights.
    w, velocity, running_mean = w0.copy(), np.zeros(3), 2.0
    for _ in range(2):
        pred = x @ w
        loss = scale * np.mean((pred - y) ** 2)
        grad = scale * 2 * x.T @ (pred - y) / len(y)
        velocity = grad + momentum * velocity
        running_mean = 0.5 * running_mean + 0.5 * pred.mean()
        max_error = np.abs(pred - y).max()
        w = w - lr * velocity
    np.testing.assert_allclose(np.asarray(state["params"]["w"]), w, rtol=1e-5)
    np.testing.assert_allclose(float(state["running_mean"]), running_mean, rtol=1e-5)
    assert list(metrics) == ["loss", "max_error"]  # the loss first, then the task's metrics
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["max_error"]), max_error, rtol=1e-5)
    assert set(state) == {"params", "running_mean", "opt_state"}


def test_the_input_state_is_donated_unless_asked_not_to():
    mesh = workflow.create_mesh(1)
    tx = optax.sgd(0.1)

    def loss_fn(params, state, batch):
        return jnp.sum(params["w"] * batch["x"]), ({}, {})

    def run(donate):
        params = {"w": jnp.ones((4,))}
        state = {"params": params, "opt_state": tx.init(params)}
        step = workflow.jit_train_step(loss_fn, tx, mesh, donate=donate)
        new_state, _ = step(state, {"x": jnp.ones((1, 4))})
        np.testing.assert_allclose(np.asarray(new_state["params"]["w"]), 0.9)
        return state["params"]["w"].is_deleted()

    assert run(donate=True) and not run(donate=False)
