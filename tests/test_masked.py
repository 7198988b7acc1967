"""sparse_jax.masked: exact N:M under any inner optimizer, composition, jit, sharding."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sparse_jax

# sgd and adamw (plain and decoupled-decay updates) run by default; the other optimizers
# take 10-50 s each on 2 cores and run with -m slow.
FAST_INNER = ("adamw",)
INNER = {
    "sgd": lambda: optax.sgd(0.05),
    "sgd_nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.5),
    "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
    "lamb": lambda: optax.lamb(1e-2, weight_decay=0.1),
    "rmsprop": lambda: optax.rmsprop(1e-2, momentum=0.5),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4, weight_decay_rate=0.1),
}


def make_params(key, in_features, out_features, channels):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "dense": {
            "kernel": jax.random.normal(k1, (in_features, out_features)),
            "bias": jax.random.normal(k2, (out_features,)),
        },
        "conv": {"kernel": jax.random.normal(k3, (3, 3, channels, 4))},
    }


def loss_fn(params, x, image, target):
    """A tiny model on random data: a dense layer and a conv."""
    dense = x @ params["dense"]["kernel"] + params["dense"]["bias"][None, :]
    conv = jax.lax.conv_general_dilated(
        image, params["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.mean((dense - target) ** 2) + jnp.mean(jnp.tanh(conv) ** 2)


def random_batch(rng, in_features, out_features, channels):
    return (
        jnp.asarray(rng.standard_normal((5, in_features)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 4, 4, channels)), jnp.float32),
        jnp.asarray(rng.standard_normal((5, out_features)), jnp.float32),
    )


def reference_run(inner, params, numpy_masks, batches):
    """Inner optimizer alone, fed the masked gradient; params re-masked after each step."""
    state = inner.init(params)
    for batch in batches:
        grads = jax.grad(loss_fn)(params, *batch)
        grads = jax.tree.map(
            lambda g, k: g if k is None else g * k, grads, numpy_masks, is_leaf=lambda x: x is None
        )
        updates, state = inner.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        params = jax.tree.map(
            lambda p, k: p if k is None else p * k, params, numpy_masks, is_leaf=lambda x: x is None
        )
    return params


def masked_run(tx, params, batches):
    state = tx.init(params)
    for batch in batches:
        grads = jax.grad(loss_fn)(params, *batch)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@settings(max_examples=3, deadline=None)
@given(
    in_features=st.sampled_from([4, 8, 12]),
    out_features=st.integers(1, 6),
    channels=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**31 - 1),
    pattern=st.sampled_from([(2, 4), (1, 4)]),
)
@pytest.mark.parametrize("name", [
    name if name in FAST_INNER else pytest.param(name, marks=pytest.mark.slow)
    for name in sorted(INNER)])
def test_exactly_nm_and_equal_to_inner_on_masked_gradient(
    name, in_features, out_features, channels, seed, pattern
):
    n, m = pattern
    rng = np.random.default_rng(seed)
    params = make_params(jax.random.key(seed), in_features, out_features, channels)
    params, masks = sparse_jax.prune(params, n, m)
    numpy_masks = jax.tree.map(
        lambda k: None if k is None else np.asarray(k, np.float32), masks,
        is_leaf=lambda x: x is None,
    )
    batches = [random_batch(rng, in_features, out_features, channels) for _ in range(20)]

    ours, _ = masked_run(sparse_jax.masked(INNER[name](), masks), params, batches)
    reference = reference_run(INNER[name](), params, numpy_masks, batches)

    for path, axis in (("dense", 0), ("conv", 2)):
        w, mask = np.asarray(ours[path]["kernel"]), np.asarray(masks[path]["kernel"])
        assert (w[~mask] == 0).all(), f"{name}: pruned weights of {path} moved"
        assert bool(sparse_jax.is_nm_sparse(w, n, m, axis))
        assert (w[mask] != 0).mean() > 0.9, f"{name}: kept weights of {path} were zeroed"
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(got, want)  # bit for bit, kept weights and bias too


def test_masks_none_and_callable_and_tree_agree():
    params = make_params(jax.random.key(0), 8, 4, 8)
    batches = [random_batch(np.random.default_rng(0), 8, 4, 8) for _ in range(3)]
    pruned, masks = sparse_jax.prune(params)
    results = [
        masked_run(sparse_jax.masked(optax.sgd(0.1), spec), params, batches)[0]
        for spec in (None, masks, lambda p: sparse_jax.prune(p)[1])
    ]
    for other in results[1:]:
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(a, b)
    # Unpruned params are pruned by the first step.
    assert bool(sparse_jax.is_nm_sparse(results[0]["dense"]["kernel"], axis=0))
    _, state = masked_run(sparse_jax.masked(optax.sgd(0.1)), params, batches[:1])
    recovered = sparse_jax.masks_from_state(state, params)
    for a, b in zip(jax.tree.leaves(recovered), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(a, b)


def check_step_keeps_pattern(tx, steps=4, jit=True):
    params, masks = sparse_jax.prune(make_params(jax.random.key(1), 8, 4, 8))
    rng = np.random.default_rng(1)
    state = tx.init(params)

    def step(params, state, batch):
        grads = jax.grad(loss_fn)(params, *batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    start = params
    for _ in range(steps):
        params, state = step(params, state, random_batch(rng, 8, 4, 8))
    for path in ("dense", "conv"):
        w = params[path]["kernel"]
        assert not np.asarray(w)[~np.asarray(masks[path]["kernel"])].any()
    moved = not np.array_equal(start["dense"]["kernel"], params["dense"]["kernel"])
    return params, state, moved


def test_chain_after_a_transform_and_inside():
    outer = optax.chain(optax.clip_by_global_norm(0.5), sparse_jax.masked(optax.adam(0.1)))
    inner = sparse_jax.masked(optax.chain(optax.clip_by_global_norm(0.5), optax.adam(0.1)))
    assert check_step_keeps_pattern(outer)[2]
    assert check_step_keeps_pattern(inner)[2]


def test_under_inject_hyperparams():
    masks = sparse_jax.prune(make_params(jax.random.key(1), 8, 4, 8))[1]
    tx = optax.inject_hyperparams(
        lambda learning_rate: sparse_jax.masked(optax.sgd(learning_rate, momentum=0.9), masks)
    )(learning_rate=0.1)
    params, state, moved = check_step_keeps_pattern(tx)
    assert moved
    # Setting the injected learning rate to 0 freezes the (kept) weights.
    state.hyperparams["learning_rate"] = jnp.zeros([])
    grads = jax.grad(loss_fn)(params, *random_batch(np.random.default_rng(3), 8, 4, 8))
    updates, _ = tx.update(grads, state, params)
    assert not any(np.asarray(u).any() for u in jax.tree.leaves(updates))
    # And the other way round: an injected inner.
    wrapped = sparse_jax.masked(optax.inject_hyperparams(optax.adam)(learning_rate=0.1))
    assert check_step_keeps_pattern(wrapped)[2]


def test_under_multisteps():
    tx = optax.MultiSteps(sparse_jax.masked(optax.sgd(0.1, momentum=0.9)), every_k_schedule=2)
    params, masks = sparse_jax.prune(make_params(jax.random.key(1), 8, 4, 8))
    state = tx.init(params)
    batches = [random_batch(np.random.default_rng(4), 8, 4, 8) for _ in range(4)]
    history = [params]
    for batch in batches:
        updates, state = tx.update(jax.grad(loss_fn)(params, *batch), state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    # Mini-steps 1 and 3 accumulate only; 2 and 4 apply.
    same = lambda a, b: np.array_equal(a["dense"]["kernel"], b["dense"]["kernel"])  # noqa: E731
    assert same(history[0], history[1]) and not same(history[1], history[2])
    assert same(history[2], history[3]) and not same(history[3], history[4])
    w = np.asarray(params["dense"]["kernel"])
    assert not w[~np.asarray(masks["dense"]["kernel"])].any()


def test_nnx_optimizer_trains_and_stays_2_4():
    model = nnx.Sequential(
        nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(32, 4, rngs=nnx.Rngs(1))
    )
    pruned, masks = sparse_jax.prune(nnx.state(model, nnx.Param))
    nnx.update(model, pruned)
    optimizer = nnx.Optimizer(model, sparse_jax.masked(optax.adamw(1e-2), masks), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    y = x[:, :4] * 2.0 - x[:, 4:8]

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    report = sparse_jax.sparsity_report(nnx.state(model, nnx.Param), masks)
    assert report.all_nm and report.pruned_size == 16 * 32 + 32 * 4


@pytest.mark.slow
def test_sharded_params_on_8_devices_match_the_inner_optimizer_alone():
    assert jax.device_count() >= 8, "conftest should give 8 CPU devices"
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    params, masks = sparse_jax.prune(make_params(jax.random.key(2), 16, 64, 8))
    specs = {
        "dense": {"kernel": P("data", "model"), "bias": P("model")},
        "conv": {"kernel": P(None, None, "data", "model")},
    }
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    sharded = jax.device_put(params, shardings)
    tx = sparse_jax.masked(optax.adamw(1e-2, weight_decay=0.1), masks)
    state = tx.init(sharded)
    packed_dense = state.packed_masks["dense"]["kernel"].bits
    assert packed_dense.sharding.spec == P("data", "model")  # the mask follows the param
    np.testing.assert_array_equal(  # and holds numpy's packing of the mask
        packed_dense, np.packbits(np.asarray(masks["dense"]["kernel"]), axis=0, bitorder="little")
    )

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(loss_fn)(params, *batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(5)
    batches = [random_batch(rng, 16, 64, 8) for _ in range(3)]
    for batch in batches:
        sharded, state = step(sharded, state, batch)
    numpy_masks = jax.tree.map(
        lambda k: None if k is None else np.asarray(k, np.float32), masks, is_leaf=lambda x: x is None
    )
    # Reference: unsharded adamw alone on the masked gradient, params re-masked after each step.
    reference = reference_run(optax.adamw(1e-2, weight_decay=0.1), params, numpy_masks, batches)
    for got, want, sharding in zip(
        jax.tree.leaves(sharded), jax.tree.leaves(reference), jax.tree.leaves(shardings)
    ):
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    w = np.asarray(sharded["dense"]["kernel"])
    assert not w[~np.asarray(masks["dense"]["kernel"])].any()
    assert bool(sparse_jax.is_nm_sparse(w, axis=0))


def test_mask_state_is_one_bit_per_pruned_weight():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 64, 128))},
        "fc": {"kernel": jnp.ones((256, 1000))},
        # BERT-base attention: q/k/v kernels split into 12 heads, output kernel from them.
        "query": {"kernel": jnp.ones((768, 12, 64))},
        "out": {"kernel": jnp.ones((12, 64, 768))},
    }
    rules = [(r"query/kernel", 0), (r"out/kernel", 1)]  # reduction axes: 768 in, 64 per head
    state = sparse_jax.masked(optax.sgd(0.1), rules=rules).init(params)
    packed = [p for p in jax.tree.leaves(state.packed_masks, is_leaf=lambda x: isinstance(x, sparse_jax.PackedMask))]
    assert len(packed) == 4
    packed_bytes = sum(p.bits.nbytes for p in packed)
    assert packed_bytes * 8 == 3 * 3 * 64 * 128 + 256 * 1000 + 2 * 768 * 12 * 64


def test_update_without_params_raises():
    params, masks = sparse_jax.prune(make_params(jax.random.key(0), 8, 4, 8))
    tx = sparse_jax.masked(optax.sgd(0.1), masks)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the current params"):
        tx.update(params, state)


def test_bad_masks_raise_at_init_with_the_path():
    params, masks = sparse_jax.prune(make_params(jax.random.key(0), 8, 4, 8))
    transposed = dict(masks, dense=dict(masks["dense"], kernel=masks["dense"]["kernel"].T))
    with pytest.raises(ValueError, match=r"dense/kernel \(8, 4\): mask has shape \(4, 8\)"):
        sparse_jax.masked(optax.sgd(0.1), transposed).init(params)
    dense_mask = dict(masks, dense=dict(masks["dense"], kernel=jnp.ones((8, 4), bool)))
    sparse_jax.masked(optax.sgd(0.1), dense_mask).init(params)  # allowed unless checked
    with pytest.raises(ValueError, match=r"dense/kernel \(8, 4\): mask is not 2:4 along axis 0"):
        sparse_jax.masked(optax.sgd(0.1), dense_mask, check_masks=True).init(params)


def scale_by_keyword():
    """A transformation that needs an extra argument: multiplies updates by ``scale``."""

    def update(updates, state, params=None, *, scale):
        del params
        return jax.tree.map(lambda u: -u * scale, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def test_jit_of_init_and_extra_args_are_passed_through():
    params, masks = sparse_jax.prune(make_params(jax.random.key(0), 8, 4, 8))
    tx = sparse_jax.masked(scale_by_keyword(), masks)
    state = jax.jit(tx.init)(params)
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(TypeError, match="scale"):
        tx.update(grads, state, params)  # the inner needs it, so it must be passed on
    updates, _ = jax.jit(functools.partial(tx.update, scale=jnp.float32(3.0)))(grads, state, params)
    kernel_mask = np.asarray(masks["dense"]["kernel"])
    kernel_update = np.asarray(updates["dense"]["kernel"])
    np.testing.assert_array_equal(kernel_update[kernel_mask], -3.0)
    np.testing.assert_array_equal(
        kernel_update[~kernel_mask], -np.asarray(params["dense"]["kernel"])[~kernel_mask]
    )
    np.testing.assert_array_equal(updates["dense"]["bias"], -3.0 * np.ones(4))  # not pruned
    new = optax.apply_updates(params, updates)
    assert bool(sparse_jax.is_nm_sparse(new["conv"]["kernel"], axis=2))


def test_orbax_round_trip_of_the_optimizer_state_keeps_masks(tmp_path):
    import orbax.checkpoint as ocp

    params, masks = sparse_jax.prune(make_params(jax.random.key(6), 8, 4, 8))
    tx = sparse_jax.masked(optax.adam(1e-2), masks)
    rng = np.random.default_rng(6)
    batches = [random_batch(rng, 8, 4, 8) for _ in range(4)]
    params, state = masked_run(tx, params, batches[:2])

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    with ocp.StandardCheckpointer() as checkpointer:
        target = {"params": params, "opt_state": tx.init(params)}
        restored = checkpointer.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, target))

    recovered = sparse_jax.masks_from_state(restored["opt_state"], restored["params"])
    for a, b in zip(jax.tree.leaves(recovered), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(a, b)
    # Training resumed from the checkpoint matches training that never stopped.
    def run_on(p, s):
        for batch in batches[2:]:
            updates, s = tx.update(jax.grad(loss_fn)(p, *batch), s, p)
            p = optax.apply_updates(p, updates)
        return p

    for a, b in zip(jax.tree.leaves(run_on(params, state)),
                    jax.tree.leaves(run_on(restored["params"], restored["opt_state"]))):
        np.testing.assert_array_equal(a, b)


def two_leaf_params():
    return {
        "a": jax.random.normal(jax.random.key(10), (8, 4)),
        "b": jax.random.normal(jax.random.key(11), (8, 4)),
    }


def test_renamed_leaves_of_the_same_shapes_are_refused_with_the_path():
    params = two_leaf_params()
    tx = sparse_jax.masked(optax.sgd(0.1))
    state = tx.init(params)
    # Same shapes, same leaf count, but other names: position-only matching would
    # apply a's mask to a2.
    renamed = {"a2": params["b"], "a3": params["a"]}
    with pytest.raises(ValueError, match=r"params leaf 0 is 'a2' \(8, 4\), but the params at init had 'a' \(8, 4\)"):
        tx.update(renamed, state, renamed)
    with pytest.raises(ValueError, match=r"updates leaf 0 is 'a2' \(8, 4\), but the params at init had 'a'"):
        tx.update(renamed, state, params)
    fewer = {"a": params["a"]}
    with pytest.raises(ValueError, match=r"params has 1 leaves but the params at init had 2; the first one missing is 'b' \(8, 4\)"):
        tx.update(fewer, state, fewer)


def test_a_shape_change_is_refused_with_the_path_and_both_shapes():
    params = two_leaf_params()
    tx = sparse_jax.masked(optax.sgd(0.1))
    state = tx.init(params)
    # (4, 8) packs into as many bytes as (8, 4): only the stored shape tells them apart.
    transposed = {"a": params["a"], "b": params["b"].T}
    with pytest.raises(ValueError, match=r"params leaf 'b' has shape \(4, 8\), but its mask was built at init for shape \(8, 4\)"):
        jax.jit(tx.update)(transposed, state, transposed)  # caught at trace time
    with pytest.raises(ValueError, match=r"'b' has shape \(4, 8\)"):
        sparse_jax.masks_from_state(state, transposed)


def test_tree_map_params_maps_the_inner_state_and_leaves_the_masks():
    params, masks = sparse_jax.prune(make_params(jax.random.key(0), 8, 4, 8))
    tx = sparse_jax.masked(optax.adam(1e-2), masks)
    state = tx.init(params)
    # Cast every params-shaped part of the state to bfloat16.
    cast = optax.tree_map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
    mu = cast.inner_state[0].mu
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(mu))
    assert jax.tree.structure(mu) == jax.tree.structure(params)
    assert cast.inner_state[0].count.dtype == jnp.int32  # not params-shaped: untouched
    kernel = cast.packed_masks["dense"]["kernel"]
    assert kernel.bits.dtype == jnp.uint8 and cast.packed_masks["dense"]["bias"] is None
    np.testing.assert_array_equal(kernel.unpack(), masks["dense"]["kernel"])
    # Map with a second params-shaped tree (as for sharding specs): f sees each
    # params leaf with its spec; the non-params parts go to transform_non_params.
    specs = jax.tree.map(lambda x: P(*([None] * x.ndim)), params)
    seen = []
    spec_state = optax.tree_map_params(
        tx,
        lambda x, spec: seen.append(x.shape) or spec,
        state,
        specs,
        transform_non_params=lambda _: "not params",
        is_leaf=lambda x: isinstance(x, P),
    )
    assert sorted(seen) == sorted([x.shape for x in jax.tree.leaves(params)] * 2)  # mu and nu
    assert spec_state.packed_masks == "not params"
    assert spec_state.inner_state[0].nu["conv"]["kernel"] == P(None, None, None, None)
    # The cast state still steps, and still keeps the pattern.
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), cast, params)
    assert bool(sparse_jax.is_nm_sparse(optax.apply_updates(params, updates)["dense"]["kernel"], axis=0))


@pytest.mark.parametrize("inner", ["sgd_nesterov", "adamw"])
def test_non_finite_pruned_weights_end_exactly_zero_with_apply_updates(inner):
    params, masks = sparse_jax.prune(make_params(jax.random.key(3), 8, 4, 8))
    mask = np.asarray(masks["dense"]["kernel"])
    kernel = np.array(params["dense"]["kernel"])
    pruned_positions = np.argwhere(~mask)
    poison = [np.nan, np.inf, -np.inf]
    for (i, j), value in zip(pruned_positions, itertools.cycle(poison)):
        kernel[i, j] = value
    poisoned = dict(params, dense=dict(params["dense"], kernel=jnp.asarray(kernel)))
    tx = sparse_jax.masked(INNER[inner](), masks)
    state = tx.init(poisoned)
    rng = np.random.default_rng(3)
    numpy_masks = jax.tree.map(
        lambda k: None if k is None else np.asarray(k, np.float32), masks, is_leaf=lambda x: x is None
    )
    ref_inner = INNER[inner]()
    ref_params, ref_state = params, ref_inner.init(params)
    current = poisoned
    for step in range(3):
        batch = random_batch(rng, 8, 4, 8)
        # The gradient at the poisoned params (finite: masked to 0 at pruned positions).
        grads = jax.grad(loss_fn)(params if step == 0 else current, *batch)
        updates, state = tx.update(grads, state, current)
        current = sparse_jax.apply_updates(current, updates, state)
        w = np.asarray(current["dense"]["kernel"])
        assert (w[~mask] == 0).all() and np.isfinite(w).all(), f"step {step}"
        # Kept weights: the inner update bit for bit (reference: inner alone on
        # the masked gradient, from the clean params).
        masked_grads = jax.tree.map(
            lambda g, k: g if k is None else g * k, grads, numpy_masks, is_leaf=lambda x: x is None
        )
        ref_updates, ref_state = ref_inner.update(masked_grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_updates)
        ref_params = jax.tree.map(
            lambda p, k: p if k is None else p * k, ref_params, numpy_masks, is_leaf=lambda x: x is None
        )
        if inner == "sgd_nesterov":  # no weight decay: the poison never reaches a kept weight
            for got, want in zip(jax.tree.leaves(current), jax.tree.leaves(ref_params)):
                np.testing.assert_array_equal(got, want)
    # With optax.apply_updates the documented limit shows: p + (-p) is NaN for non-finite p.
    updates, _ = tx.update(grads, tx.init(poisoned), poisoned)
    plain = np.asarray(optax.apply_updates(poisoned, updates)["dense"]["kernel"])
    assert np.isnan(plain[~mask]).all() and np.isfinite(plain[mask]).all()


def test_apply_updates_matches_optax_where_nothing_is_pruned_or_poisoned():
    params, masks = sparse_jax.prune(make_params(jax.random.key(4), 8, 4, 8))
    tx = sparse_jax.masked(optax.adamw(1e-2, weight_decay=0.5), masks)
    state = tx.init(params)
    grads = jax.grad(loss_fn)(params, *random_batch(np.random.default_rng(4), 8, 4, 8))
    updates, state = tx.update(grads, state, params)
    for got, want in zip(
        jax.tree.leaves(sparse_jax.apply_updates(params, updates, state)),
        jax.tree.leaves(optax.apply_updates(params, updates)),
    ):
        np.testing.assert_array_equal(got, want)


def test_check_masks_at_init_refuses_an_all_false_mask():
    params, masks = sparse_jax.prune(make_params(jax.random.key(0), 8, 4, 8))
    dead = dict(masks, dense=dict(masks["dense"], kernel=jnp.zeros((8, 4), bool)))
    sparse_jax.masked(optax.sgd(0.1), dead).init(params)  # allowed unless checked
    with pytest.raises(ValueError, match=r"dense/kernel \(8, 4\): mask is not 2:4 along axis 0: 8 of 8 groups of 4 keep other than exactly 2 \(they keep 0\)"):
        sparse_jax.masked(optax.sgd(0.1), dead, check_masks=True).init(params)
