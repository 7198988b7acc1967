"""sparse_jax._leafwise: which inner optimizers let `masked` skip zeroing pruned gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax
from sparse_jax._leafwise import is_leafwise_elementwise

PARAMS = {"a": jnp.ones((8, 4)), "b": jnp.ones((8, 4)), "bias": jnp.ones((4,))}


def leafwise(tx, **extra_args) -> bool:
    return is_leafwise_elementwise(tx.update, PARAMS, tx.init(PARAMS), PARAMS, **extra_args)


def stateless(update):
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@pytest.mark.parametrize("tx", [
    optax.sgd(0.1),
    optax.sgd(0.1, momentum=0.9, nesterov=True),
    optax.adamw(1e-3, weight_decay=1e-4, mask=lambda t: jax.tree.map(lambda x: x.ndim > 1, t)),
    optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)),
    optax.lion(1e-3, weight_decay=0.1),
    optax.rmsprop(1e-3, momentum=0.5),
    optax.chain(optax.clip(1.0), optax.adam(1e-3)),  # clips each entry: elementwise
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
    optax.multi_transform({"train": optax.sgd(0.1, momentum=0.9), "frozen": optax.set_to_zero()},
                          {"a": "train", "b": "frozen", "bias": "train"}),
], ids=["sgd", "nesterov", "adamw_decay_mask", "adamw_schedule", "lion", "rmsprop", "clip_adam",
        "inject_hyperparams", "multi_transform"])
def test_entry_by_entry_optimizers_are_leafwise(tx):
    assert leafwise(tx)


def test_scalar_extra_arguments_keep_it_leafwise():
    tx = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau())
    assert leafwise(tx, value=jnp.asarray(1.0))


@pytest.mark.parametrize("tx", [
    optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),  # a norm over all leaves
    optax.lamb(1e-3),  # a trust ratio per leaf: a reduction
    optax.adafactor(1e-2, min_dim_size_to_factor=4),  # factored moments
    stateless(lambda u, s, p=None: ({"a": u["b"], "b": u["a"], "bias": u["bias"]}, s)),
    stateless(lambda u, s, p=None: ({**u, "a": u["a"] + u["b"]}, s)),  # two leaves combined
    stateless(lambda u, s, p=None: ({**u, "a": u["a"][::-1]}, s)),  # entries moved
    stateless(lambda u, s, p=None: ({**u, "a": u["a"].T.T}, s)),  # a transpose: not proven
], ids=["clip_by_global_norm", "lamb", "adafactor", "swapped_leaves", "combined_leaves",
        "reversed_entries", "transposed"])
def test_optimizers_that_move_entries_or_reduce_are_not_leafwise(tx):
    assert not leafwise(tx)


def test_a_state_leaf_that_moves_to_another_parameter_is_not_leafwise():
    # Entry by entry within each step, but leaf "a"'s gradient goes to state "a", then to state
    # "b", then into leaf "b"'s update: a pruned entry of "a" reaches a kept entry of "b".
    def init(params):
        return {"a": jnp.zeros((8, 4)), "b": jnp.zeros((8, 4))}

    def moving(u, s, p=None):
        return {**u, "b": u["b"] + s["b"]}, {"a": u["a"], "b": s["a"]}

    def staying(u, s, p=None):  # the two state slots serve leaf "a" alone: safe
        return {**u, "a": u["a"] + s["b"]}, {"a": s["b"] + u["a"], "b": s["a"]}

    assert not leafwise(optax.GradientTransformation(init, moving))
    assert leafwise(optax.GradientTransformation(init, staying))


def reference_run(inner, params, masks, grads_list):
    """The inner optimizer alone on the gradient zeroed at pruned entries (NumPy masks)."""
    keep = jax.tree.map(lambda k: np.asarray(k, np.float32), masks)
    state = inner.init(params)
    for grads in grads_list:
        grads = jax.tree.map(lambda g, k: g * k, grads, keep)
        updates, state = inner.update(grads, state, params)
        params = jax.tree.map(lambda p, u, k: (p + u) * k, params, updates, keep)
    return params, state


@pytest.mark.parametrize("name", ["adamw", "clip_adamw"])
def test_masked_equals_the_inner_on_the_zeroed_gradient_and_zeroes_only_when_needed(name):
    make = {"adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
            "clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(0.5),
                                              optax.adamw(1e-2, weight_decay=0.1))}[name]
    rng = np.random.default_rng(0)
    params, masks = sparse_jax.prune({"a": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
                                      "b": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)})
    # Large gradients at the pruned entries: under a global-norm clip they would shrink the kept
    # entries' steps if they reached the inner optimizer.
    grads_list = [jax.tree.map(lambda k: jnp.where(k, 1.0, 100.0) * jnp.asarray(
        rng.standard_normal(k.shape), jnp.float32), masks) for _ in range(5)]
    tx = sparse_jax.masked(make(), masks)
    state = tx.init(params)
    ours = params
    for grads in grads_list:
        updates, state = tx.update(grads, state, ours)
        ours = optax.apply_updates(ours, updates)
    want, _ = reference_run(make(), params, masks, grads_list)
    for got, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, expected)  # kept weights bit for bit, pruned 0
    # Whether the pruned entries' gradient reached the inner state: skipped for AdamW (entry by
    # entry), zeroed under the global-norm clip.
    mu = state.inner_state[-1][0].mu if name == "clip_adamw" else state.inner_state[0].mu
    pruned_moments = np.concatenate([np.asarray(mu[k])[~np.asarray(masks[k])] for k in mu])
    if name == "adamw":
        assert np.abs(pruned_moments).min() > 0
    else:
        assert (pruned_moments == 0).all()
        # The test can fail: without the zeroing, the clip would give other kept weights.
        unzeroed = make()
        s, p = unzeroed.init(params), params
        for grads in grads_list:
            u, s = unzeroed.update(grads, s, p)
            p = jax.tree.map(lambda x, y, k: (x + y) * k, p, u, masks)
        assert not np.array_equal(np.asarray(p["a"]), np.asarray(ours["a"]))
