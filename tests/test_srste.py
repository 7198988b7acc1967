"""SR-STE: projection, straight-through gradient, sparse-refined decay, mask schedule, NNX and Linen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparse_jax


def numpy_nm_mask(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keeps the n largest |w| of every m along axis (ties: lower index), in NumPy."""
    moved = np.moveaxis(np.abs(w), axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (-1, m))
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def make_params(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return {
        "dense": {"kernel": jax.random.normal(keys[0], (16, 8)), "bias": jax.random.normal(keys[1], (8,))},
        "conv": {"kernel": jax.random.normal(keys[2], (3, 3, 8, 4))},
    }


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_projected_forward_is_exactly_nm(n, m):
    params = make_params()
    projected = sparse_jax.srste_project(params, n=n, m=m)
    np.testing.assert_array_equal(projected["dense"]["bias"], params["dense"]["bias"])
    for name, axis in (("dense", 0), ("conv", 2)):
        w = np.asarray(params[name]["kernel"])
        expected = np.where(numpy_nm_mask(w, n, m, axis), w, 0.0)
        np.testing.assert_array_equal(projected[name]["kernel"], expected)
        assert bool(sparse_jax.is_nm_sparse(projected[name]["kernel"], n, m, axis))


def test_straight_through_gradient_is_the_dense_gradient():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    y = rng.standard_normal((5, 8)).astype(np.float32)

    def loss(params):
        kernel = sparse_jax.srste_project(params)["kernel"]
        return jnp.sum((x @ kernel - y) ** 2)

    grad = jax.grad(loss)({"kernel": jnp.asarray(w)})["kernel"]
    # By hand: d/dW sum((x Wp - y)^2) = 2 x^T (x Wp - y), for every entry of W.
    sparse = np.where(numpy_nm_mask(w, 2, 4, 0), w, 0.0).astype(np.float64)
    expected = 2 * x.T.astype(np.float64) @ (x @ sparse - y)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)
    assert np.count_nonzero(np.asarray(grad)) == grad.size  # pruned entries get it too


def test_decay_touches_only_pruned_entries():
    params = make_params(1)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.25), params)
    tx = sparse_jax.srste(decay=0.1)
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["dense"]["bias"], grads["dense"]["bias"])
    for name, axis in (("dense", 0), ("conv", 2)):
        w = np.asarray(params[name]["kernel"], np.float64)
        kept = numpy_nm_mask(w, 2, 4, axis)
        expected = 0.25 + 0.1 * (~kept) * w
        np.testing.assert_allclose(updates[name]["kernel"], expected, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(updates[name]["kernel"])[kept], 0.25)
    assert int(state.count) == 1 and float(state.flip_fraction) == 0.0


def test_training_follows_the_papers_update_rule():
    """w <- w - lr * (g(mask * w) + lambda * (1 - mask) * w), the mask from w each step."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 4))
    x = rng.standard_normal((16, 8))
    y = rng.standard_normal((16, 4))
    lr, lam = 0.05, 0.3
    tx = optax.chain(sparse_jax.srste(decay=lam), optax.sgd(lr))
    params = {"kernel": jnp.asarray(w, jnp.float32)}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            kernel = sparse_jax.srste_project(p)["kernel"]
            return jnp.mean((x.astype(np.float32) @ kernel - y.astype(np.float32)) ** 2)

        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    reference = w.copy()
    flips = []
    for _ in range(6):
        mask = numpy_nm_mask(reference, 2, 4, 0)
        grad = 2 * x.T @ (x @ np.where(mask, reference, 0.0) - y) / y.size
        reference = reference - lr * (grad + lam * (~mask) * reference)
        params, state = step(params, state)
        flips.append(float(sparse_jax.srste_flip_fraction(state)))
        np.testing.assert_allclose(params["kernel"], reference, rtol=1e-4, atol=1e-5)
    assert flips[0] == 0.0  # the first step's mask is the one init recorded


def test_flip_fraction_counts_changed_mask_entries():
    w0 = jnp.array([[4.0], [3.0], [1.0], [0.5], [4.0], [3.0], [1.0], [0.5]])
    w1 = jnp.array([[4.0], [0.1], [1.0], [0.5], [4.0], [3.0], [1.0], [0.5]])  # rows 1, 2 swap
    tx = sparse_jax.srste()
    state = tx.init({"k": w0})
    _, state = tx.update({"k": jnp.zeros_like(w0)}, state, {"k": w0})
    assert float(sparse_jax.srste_flip_fraction(state)) == 0.0
    _, state = tx.update({"k": jnp.zeros_like(w0)}, state, {"k": w1})
    old = numpy_nm_mask(np.asarray(w0), 2, 4, 0)
    new = numpy_nm_mask(np.asarray(w1), 2, 4, 0)
    assert np.mean(old != new) == 0.25  # 2 of the 8 entries
    assert float(sparse_jax.srste_flip_fraction((state, optax.EmptyState()))) == 0.25
    assert float(sparse_jax.mask_flip_fraction({"k": old, "b": None}, {"k": new, "b": None})) == 0.25


def test_mask_refreshed_every_k_steps_and_dense_before_start():
    tx = optax.chain(sparse_jax.srste(update_every=3, start_step=2, decay=0.5), optax.sgd(0.2))
    params = {"k": jax.random.normal(jax.random.key(0), (8, 4))}
    state = tx.init(params)
    rng = np.random.default_rng(4)
    seen = []
    for step in range(9):
        masks = sparse_jax.srste_masks(state, params)
        if step < 2:
            assert bool(masks["k"].all())
        elif (step - 2) % 3 == 0:
            np.testing.assert_array_equal(masks["k"], numpy_nm_mask(np.asarray(params["k"]), 2, 4, 0))
        else:
            np.testing.assert_array_equal(masks["k"], seen[-1])
        seen.append(np.asarray(masks["k"]))
        grads = {"k": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)}
        updates, state = tx.update(grads, state, params)
        if step < 2:  # dense phase: no decay, plain SGD
            np.testing.assert_allclose(updates["k"], -0.2 * grads["k"], rtol=1e-6)
        params = optax.apply_updates(params, updates)
        if step == 2:  # the first sparse step: everything pruned counts as flipped
            assert float(sparse_jax.srste_flip_fraction(state)) == 0.5


def test_final_mask_goes_to_masked_and_compress():
    params = make_params(3)
    tx = optax.chain(sparse_jax.srste(), optax.sgd(0.1))
    state = tx.init(params)
    for _ in range(2):
        grads = jax.grad(lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(sparse_jax.srste_project(p))))(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    pruned, masks = sparse_jax.srste_finalize(params, state)
    sparse_jax.check_masks(pruned, masks)
    np.testing.assert_array_equal(
        masks["dense"]["kernel"], numpy_nm_mask(np.asarray(params["dense"]["kernel"]), 2, 4, 0)
    )
    tune = sparse_jax.masked(optax.sgd(0.1), masks)
    tune_state = tune.init(pruned)
    updates, _ = tune.update(jax.tree.map(jnp.ones_like, pruned), tune_state, pruned)
    tuned = optax.apply_updates(pruned, updates)
    assert bool(sparse_jax.is_nm_sparse(tuned["dense"]["kernel"], 2, 4, axis=0))
    s = sparse_jax.compress(pruned["dense"]["kernel"], axis=0)
    np.testing.assert_array_equal(sparse_jax.decompress(s), pruned["dense"]["kernel"])


def test_transposable_srste_masks_are_nm_both_ways():
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}}
    projected = sparse_jax.srste_project(params, transposable=True)
    assert bool(sparse_jax.is_transposable_nm(projected["dense"]["kernel"]))
    tx = sparse_jax.srste(transposable=True)
    state = tx.init(params)
    masks = sparse_jax.srste_masks(state, params)
    np.testing.assert_array_equal(masks["dense"]["kernel"], sparse_jax.transposable_nm_mask(params["dense"]["kernel"]))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.out = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x))))


@pytest.mark.slow  # over ~8 s of CPU; kept green by `pytest -m slow`
def test_nnx_mlp_trains_with_srste_model():
    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (64, 8))
    y = jnp.sin(x[:, :4] * 2.0)
    optimizer = nnx.Optimizer(model, optax.chain(sparse_jax.srste(), optax.adam(1e-2)), wrt=nnx.Param)

    def loss_fn(model):
        with sparse_jax.srste_model(model) as sparse:
            return jnp.mean((sparse(x) - y) ** 2)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    # The gradient equals the functional path: merge the projected params into a copy.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def functional_loss(params, rest):
        copy = nnx.merge(graphdef, sparse_jax.srste_project(params), rest, copy=True)
        return jnp.mean((copy(x) - y) ** 2)

    expected = jax.grad(functional_loss)(params, rest)
    got = nnx.grad(loss_fn)(model)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert float(model.norm.mean[...].std()) > 0  # batch statistics were updated in place
    params = nnx.state(model, nnx.Param)
    # Dense weights stay dense; the final mask comes from the optimizer state.
    assert not bool(sparse_jax.is_nm_sparse(params["hidden"]["kernel"][...], 2, 4, axis=0))
    pruned, masks = sparse_jax.srste_finalize(params, optimizer.opt_state)
    report = sparse_jax.sparsity_report(pruned, masks)
    assert report.all_nm and report.pruned_size == 8 * 32 + 32 * 4


def test_linen_params_train_with_the_projection():
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    x = jax.random.normal(jax.random.key(0), (32, 8))
    y = jnp.cos(x[:, :4])
    params = model.init(jax.random.key(1), x)["params"]
    tx = optax.chain(sparse_jax.srste(update_every=2), optax.adam(1e-2))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        masks = sparse_jax.srste_masks(state, params)

        def loss(p):
            return jnp.mean((model.apply({"params": sparse_jax.srste_project(p, masks)}, x) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    losses = []
    for _ in range(20):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    pruned, masks = sparse_jax.srste_finalize(params, state)
    assert sparse_jax.sparsity_report(pruned, masks).all_nm


def test_bad_use_raises_clearly():
    params = make_params()
    tx = sparse_jax.srste()
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the current params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="initialised for 3 leaves"):
        tx.update({"k": jnp.ones((4, 4))}, state, {"k": jnp.ones((4, 4))})
    with pytest.raises(ValueError, match="update_every"):
        sparse_jax.srste(update_every=0)
    with pytest.raises(ValueError, match="no sparse_jax.srste state"):
        sparse_jax.srste_masks(optax.EmptyState(), params)

