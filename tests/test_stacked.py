"""Stacked (scan/vmap) layers: the layer axis is never a group axis; every slice is one layer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import sparse_jax
from sparse_jax._paths import path_to_str
from sparse_jax._selection import AMBIGUOUS


def numpy_nm_mask(w, axis, n=2, m=4):
    """Independent reference: keep the n largest |w| of every m along ``axis``; ties to the lower index."""
    w = np.moveaxis(np.abs(np.asarray(w, np.float64)), axis, 0)
    mask = np.zeros(w.shape, bool)
    flat_w = w.reshape(w.shape[0], -1)
    flat_mask = mask.reshape(w.shape[0], -1)
    for start in range(0, w.shape[0], m):
        for col in range(flat_w.shape[1]):
            group = flat_w[start:start + m, col]
            order = sorted(range(m), key=lambda i: (-group[i], i))
            for i in order[:n]:
                flat_mask[start + i, col] = True
    return np.moveaxis(flat_mask.reshape(w.shape), 0, axis)


def check_every_layer_slice(stacked_leaf, stacked_mask, layer_axis, slice_axis):
    """Each layer slice's mask equals the one-layer NumPy mask along its own input axis."""
    for layer in range(stacked_leaf.shape[layer_axis]):
        w = np.take(np.asarray(stacked_leaf), layer, axis=layer_axis)
        k = np.take(np.asarray(stacked_mask), layer, axis=layer_axis)
        np.testing.assert_array_equal(k, numpy_nm_mask(w, slice_axis), err_msg=f"layer {layer}")


def plans_by_path(params, **kwargs):
    return {p.path: p for p in sparse_jax.plan_tree(params, **kwargs)}


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(x)
        y = nn.Dense(32)(nn.relu(nn.Dense(64)(x)))
        return x + y, None


class LinenStack(nn.Module):
    num_layers: int

    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(
            LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.num_layers
        )
        return blocks(name="layers")(x, None)[0]


@pytest.mark.parametrize("num_layers", [8, 6])
def test_linen_scan_transformer_is_pruned_per_layer(num_layers):
    model = LinenStack(num_layers)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    params = model.init(jax.random.key(0), x)["params"]
    attention = "layers/MultiHeadDotProductAttention_0"
    query = params["layers"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    assert query.shape == (num_layers, 32, 4, 8)

    plans = plans_by_path(params)
    for name in ("query", "key", "value"):
        plan = plans[f"{attention}/{name}/kernel"]
        assert (plan.axis, plan.stacked_axes) == (1, (0,)), plan  # in, not the layer axis
    assert (plans[f"{attention}/out/kernel"].axis, plans[f"{attention}/out/kernel"].stacked_axes) == (2, (0,))
    assert (plans["layers/Dense_0/kernel"].axis, plans["layers/Dense_0/kernel"].stacked_axes) == (1, (0,))
    assert plans["layers/Dense_0/bias"].axis is None  # (layers, out): 1 non-stacked dim

    pruned, masks = sparse_jax.prune(params)
    block_masks = masks["layers"]
    for name in ("query", "key", "value"):
        check_every_layer_slice(
            params["layers"]["MultiHeadDotProductAttention_0"][name]["kernel"],
            block_masks["MultiHeadDotProductAttention_0"][name]["kernel"], 0, 0,
        )
    check_every_layer_slice(
        params["layers"]["MultiHeadDotProductAttention_0"]["out"]["kernel"],
        block_masks["MultiHeadDotProductAttention_0"]["out"]["kernel"], 0, 1,
    )
    check_every_layer_slice(params["layers"]["Dense_1"]["kernel"], block_masks["Dense_1"]["kernel"], 0, 0)

    report = sparse_jax.sparsity_report(pruned, masks)
    rows = {r.path: r for r in report.rows}
    assert report.all_nm and rows[f"{attention}/query/kernel"].stacked_axes == (0,)
    assert f"{attention}/query/kernel" in str(report)
    sparse_jax.check_masks(pruned, masks)
    model.apply({"params": pruned}, x)  # the pruned stack still runs under scan


@pytest.mark.slow  # over ~8 s of CPU; kept green by `pytest -m slow`
def test_linen_scan_masked_training_and_compressed_checkpoint(tmp_path):
    model = LinenStack(4)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    params, masks = sparse_jax.prune(model.init(jax.random.key(0), x)["params"])
    tx = sparse_jax.masked(optax.adam(1e-2), masks, check_masks=True)
    state = tx.init(params)
    for _ in range(2):
        grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    query = params["layers"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    for layer in range(4):
        assert bool(sparse_jax.is_nm_sparse(query[layer], axis=0))

    sparse_jax.save_compressed(tmp_path / "ckpt", params, masks)
    restored = sparse_jax.restore_compressed(tmp_path / "ckpt", params)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)
    as_sparse = sparse_jax.restore_compressed(tmp_path / "ckpt", params, as_sparse=True)
    sparse_query = as_sparse["layers"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    assert isinstance(sparse_query, sparse_jax.Sparse24) and sparse_query.axis == 1


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attention = nnx.MultiHeadAttention(
            num_heads=4, in_features=32, qkv_features=32, decode=False, rngs=rngs
        )
        self.linear1 = nnx.Linear(32, 64, rngs=rngs)
        self.linear2 = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(x)
        return x + self.linear2(nnx.relu(self.linear1(x)))


def make_nnx_stack(num_layers: int):
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return NNXBlock(rngs)

    return create(nnx.Rngs(0))


def run_nnx_stack(blocks, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
        return block(x)

    return forward(x, blocks)


def test_nnx_vmap_created_blocks_run_under_scan_are_pruned_per_layer():
    blocks = make_nnx_stack(8)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    dense_out = run_nnx_stack(blocks, x)
    state = nnx.state(blocks, nnx.Param)
    plans = plans_by_path(state)
    assert (plans["attention/query/kernel"].axis, plans["attention/query/kernel"].stacked_axes) == (1, (0,))
    assert (plans["attention/out/kernel"].axis, plans["attention/out/kernel"].stacked_axes) == (2, (0,))
    assert (plans["linear1/kernel"].axis, plans["linear1/kernel"].stacked_axes) == (1, (0,))

    pruned, masks = sparse_jax.prune(state)
    kernels = nnx.to_pure_dict(state)
    mask_dict = nnx.to_pure_dict(masks)
    check_every_layer_slice(kernels["attention"]["query"]["kernel"], mask_dict["attention"]["query"]["kernel"], 0, 0)
    check_every_layer_slice(kernels["attention"]["out"]["kernel"], mask_dict["attention"]["out"]["kernel"], 0, 1)
    check_every_layer_slice(kernels["linear2"]["kernel"], mask_dict["linear2"]["kernel"], 0, 0)
    nnx.update(blocks, pruned)
    sparse_out = run_nnx_stack(blocks, x)
    assert sparse_out.shape == dense_out.shape and not np.allclose(sparse_out, dense_out)
    assert sparse_jax.sparsity_report(nnx.state(blocks, nnx.Param), masks).all_nm


def maxtext_like_params(rng, boxed):
    """MaxText's layout: the layer axis is not leading; logical names say which it is."""
    layers, embed, mlp, heads, kv = 3, 16, 32, 2, 8
    shapes = {
        "mlp/wi/kernel": ((embed, layers, mlp), ("embed", "layers", "mlp")),
        "mlp/wo/kernel": ((mlp, layers, embed), ("mlp", "layers", "embed")),
        "self_attention/query/kernel": ((embed, layers, heads, kv), ("embed", "layers", "q_heads", "kv")),
        "self_attention/out/kernel": ((heads, layers, kv, embed), ("heads", "layers", "kv", "embed")),
        "pre_norm/scale": ((embed, layers), ("norm", "layers")),
    }
    params, arrays = {}, {}
    for path, (shape, names) in shapes.items():
        value = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        arrays[path] = value
        *parents, leaf = path.split("/")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = boxed(value, names)
    return params, arrays


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_maxtext_like_tree_with_logical_names(kind):
    if kind == "linen":
        box = lambda value, names: nn.LogicallyPartitioned(value, names)  # noqa: E731
    else:
        box = lambda value, names: nnx.Param(value, out_sharding=names, eager_sharding=False)  # noqa: E731
    params, arrays = maxtext_like_params(np.random.default_rng(0), box)
    plans = plans_by_path(params)
    expected = {  # (axis, stacked axes)
        "mlp/wi/kernel": (0, (1,)),
        "mlp/wo/kernel": (0, (1,)),
        "self_attention/query/kernel": (0, (1,)),
        "self_attention/out/kernel": (2, (1,)),
    }
    for path, (axis, stacked) in expected.items():
        plan = plans[path]
        assert (plan.axis, plan.stacked_axes, plan.source) == (axis, stacked, "names"), plan
    assert plans["pre_norm/scale"].axis is None

    pruned, masks = sparse_jax.prune(params)
    mask_leaves = {
        path_to_str(path): mask
        for path, mask in jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
    }
    for path, (axis, stacked) in expected.items():
        slice_axis = axis - sum(1 for s in stacked if s < axis)
        check_every_layer_slice(arrays[path], mask_leaves[path], stacked[0], slice_axis)
    # Without the names, the same arrays have no way to tell the layer axis: 3-d ones are ambiguous.
    plain = plans_by_path({"mlp": {"wi": {"kernel": arrays["mlp/wi/kernel"]}}})
    assert plain["mlp/wi/kernel"].stacked_axes == (0,)  # a known kind: stacked over the leading axis
    unknown = plans_by_path({"w": arrays["mlp/wi/kernel"]})["w"]
    assert unknown.axis is None and unknown.reason == AMBIGUOUS


def test_layout_rules_declare_stacked_axes():
    rng = np.random.default_rng(3)
    params = {
        "block": {"w": jnp.asarray(rng.standard_normal((5, 16, 8)), jnp.float32)},  # unknown kind
        "moved": {"w": jnp.asarray(rng.standard_normal((16, 5, 8)), jnp.float32)},
        "named": {"w": nn.LogicallyPartitioned(jnp.ones((16, 6, 8)), ("embed", "stage", "mlp"))},
    }
    assert plans_by_path(params)["block/w"].reason == AMBIGUOUS
    rules = [
        ("^block/", sparse_jax.Layout(stacked=1)),
        ("^moved/", sparse_jax.Layout(axis=0, stacked=(1,))),
        (".*", sparse_jax.Layout(stacked=("stage",))),
    ]
    plans = plans_by_path(params, rules=rules)
    assert (plans["block/w"].axis, plans["block/w"].stacked_axes, plans["block/w"].source) == (1, (0,), "rule")
    assert (plans["moved/w"].axis, plans["moved/w"].stacked_axes) == (0, (1,))
    assert (plans["named/w"].axis, plans["named/w"].stacked_axes) == (0, (1,))
    pruned, masks = sparse_jax.prune({k: v for k, v in params.items() if k != "named"}, rules=rules)
    check_every_layer_slice(params["block"]["w"], masks["block"]["w"], 0, 0)
    check_every_layer_slice(params["moved"]["w"], masks["moved"]["w"], 1, 0)


def test_layout_rule_errors_name_the_leaf():
    params = {"w": jnp.ones((4, 8, 8))}
    with pytest.raises(ValueError, match=r"w \(4, 8, 8\): .*axis 0, a stacked axis"):
        sparse_jax.plan_tree(params, rules=[("w", sparse_jax.Layout(axis=0, stacked=1))])
    with pytest.raises(ValueError, match=r"w \(4, 8, 8\): Layout\(stacked=3\)"):
        sparse_jax.plan_tree(params, rules=[("w", sparse_jax.Layout(stacked=3))])
    with pytest.raises(ValueError, match=r"w \(4, 8, 8\): axis 2 has size 8|w \(4, 8, 6\)"):
        sparse_jax.plan_tree({"w": jnp.ones((4, 8, 6))}, rules=[("w", sparse_jax.Layout(axis=2))])
