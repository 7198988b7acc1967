"""sparse_jax.rules_from_computation: axes read from the jaxpr, checked per layer slice in NumPy."""

import doctest
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparse_jax
from sparse_jax import _trace
from sparse_jax.nn import _rules


def numpy_nm_mask(w, axis, n=2, m=4):
    """Keeps the n largest |w| of every m consecutive entries along `axis`; ties to the lower index."""
    a = np.moveaxis(np.abs(np.asarray(w, np.float64)), axis, -1)
    groups = a.reshape(-1, m)
    order = np.argsort(-groups, axis=1, kind="stable")  # stable: equal |w| keep the lower index
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return np.moveaxis(keep.reshape(a.shape), -1, axis)


def layer_slices(shape, stacked):
    """Index tuples, one per layer: every combination of the stacked axes."""
    ranges = [range(shape[a]) for a in stacked]
    for combo in np.ndindex(*[len(r) for r in ranges]) if stacked else [()]:
        index = [slice(None)] * len(shape)
        for a, i in zip(stacked, combo):
            index[a] = i
        yield tuple(index)


def check_layers_against_numpy(params, masks, pruned, expected):
    """Every expected leaf: each layer slice's mask equals the NumPy mask of that slice.

    ``expected`` maps a path to (reduction axis, stacked axes) of the whole leaf.
    """
    flat_params = {sparse_jax._paths.path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    flat_masks = {
        sparse_jax._paths.path_to_str(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
    }
    flat_pruned = {sparse_jax._paths.path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(pruned)[0]}
    for path, (axis, stacked) in expected.items():
        w = np.asarray(flat_params[path], np.float64)
        mask = np.asarray(flat_masks[path])
        count = 0
        for index in layer_slices(w.shape, stacked):
            layer = w[index]
            layer_axis = axis - sum(1 for a in stacked if a < axis)
            np.testing.assert_array_equal(mask[index], numpy_nm_mask(layer, layer_axis), err_msg=path)
            count += 1
        assert count == int(np.prod([w.shape[a] for a in stacked]))
        np.testing.assert_array_equal(np.asarray(flat_pruned[path], np.float64), np.where(mask, w, 0.0))


def rule_map(rules):
    out = {}
    for pattern, layout in rules:
        path = re.sub(r"\\(.)", r"\1", pattern[1:-1])
        assert pattern == f"^{re.escape(path)}$"
        out[path] = layout
    return out


def random_tree(shapes, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.standard_normal(shape), dtype) for name, shape in shapes.items()}


def filled(abstract_tree, seed=0):
    """Random values for a tree of jax.ShapeDtypeStruct (eager Flax init is slow on a busy CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), abstract_tree)


# --- einsum weights --------------------------------------------------------------------


def test_einsum_reduction_axis_is_the_contracted_one():
    params = random_tree({"nfh": (2, 16, 8), "nhf": (2, 8, 16), "fnh": (16, 2, 8)})

    def fn(p, x):
        a = jnp.einsum("...F,NFH->...NH", x, p["nfh"])
        b = jnp.einsum("...F,NHF->...NH", x, p["nhf"])
        c = jnp.einsum("...F,FNH->...NH", x, p["fnh"])
        return a + b + c

    rules = sparse_jax.rules_from_computation(fn, params, jnp.ones((3, 16)))
    by_path = rule_map(rules)
    assert (by_path["nfh"].axis, by_path["nhf"].axis, by_path["fnh"].axis) == (1, 2, 0)
    assert all(r.source == "computation" and r.stacked == () for r in by_path.values())
    pruned, masks = sparse_jax.prune(params, rules=rules)
    check_layers_against_numpy(params, masks, pruned, {"nfh": (1, ()), "nhf": (2, ()), "fnh": (0, ())})


def test_nnx_einsum_and_plan_tree_source():
    model = nnx.eval_shape(lambda: nnx.Einsum("...F,NHF->...NH", (2, 8, 16), rngs=nnx.Rngs(0)))
    rules = sparse_jax.nn.rules_from_model(model, jnp.ones((3, 16)))
    state = filled(nnx.state(model, nnx.Param))
    plans = {p.path: p for p in sparse_jax.plan_tree(state, rules=rules)}
    assert plans["kernel"].axis == 2 and plans["kernel"].source == "computation"
    pruned, masks = sparse_jax.prune(state, rules=rules)
    check_layers_against_numpy(state, masks, pruned, {"kernel": (2, ())})
    sparse_jax.check_masks(state, masks, rules=rules)
    # The defaults' guess (axis 1) is not 2:4 along the contracted axis: check_masks says so.
    wrong = jax.tree.map(lambda x: jnp.asarray(numpy_nm_mask(x, 1)), state)
    with pytest.raises(ValueError, match="kernel.*axis 2"):
        sparse_jax.check_masks(state, wrong, rules=rules)


# --- Linen nn.scan transformer ---------------------------------------------------------


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        y = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(x)
        x = nn.LayerNorm()(x + y)
        h = nn.gelu(nn.Dense(64)(x))
        return x + nn.Dense(32)(h), None


class LinenModel(nn.Module):
    layers: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(50, 32)(tokens)
        stack = nn.scan(
            LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
        )
        x, _ = stack()(x, None)
        return nn.Dense(12)(x)


@pytest.mark.parametrize("layers", [8, 6])
def test_linen_scan_transformer(layers):
    model = LinenModel(layers)
    tokens = jnp.zeros((2, 5), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(1), tokens)["params"])
    rules = sparse_jax.rules_from_computation(lambda p, t: model.apply({"params": p}, t), abstract, tokens)
    params = filled(abstract, seed=layers)
    by_path = rule_map(rules)
    attn = "ScanLinenBlock_0/MultiHeadDotProductAttention_0"
    expected = {
        f"{attn}/query/kernel": (1, (0,)),  # (L, in=32, heads=4, head_dim=8)
        f"{attn}/key/kernel": (1, (0,)),
        f"{attn}/value/kernel": (1, (0,)),
        f"{attn}/out/kernel": (2, (0,)),  # (L, heads, head_dim, out): head_dim
        "ScanLinenBlock_0/Dense_0/kernel": (1, (0,)),
        "ScanLinenBlock_0/Dense_1/kernel": (1, (0,)),
        "Dense_0/kernel": (0, ()),
    }
    for path, (axis, stacked) in expected.items():
        assert (by_path[path].axis, by_path[path].stacked) == (axis, stacked), path
    assert "lookup table" in by_path["Embed_0/embedding"].skip
    for path in ("ScanLinenBlock_0/LayerNorm_0/scale", f"{attn}/query/bias", "Dense_0/bias"):
        assert by_path[path].skip == "feeds no contraction"
    plans = {p.path: p for p in sparse_jax.plan_tree(params, rules=rules)}
    assert {p.source for p in plans.values()} == {"computation"}
    assert plans[f"{attn}/query/kernel"].stacked_axes == (0,)
    pruned, masks = sparse_jax.prune(params, rules=rules)
    check_layers_against_numpy(params, masks, pruned, expected)
    assert masks["Embed_0"]["embedding"] is None
    if layers == 8:  # (a report compiles per shape: once is enough)
        report = sparse_jax.sparsity_report(pruned, masks, rules=rules)
        assert report.all_nm and report.pruned_size == sum(
            np.asarray(flat).size for path, flat in
            ((p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0])
            if sparse_jax._paths.path_to_str(path) in expected
        )


# --- NNX: nnx.vmap-created blocks, run with nnx.scan ---------------------------------------


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(
            num_heads=4, in_features=32, qkv_features=32, decode=False, rngs=rngs
        )
        self.up = nnx.Linear(32, 64, rngs=rngs)
        self.heads = nnx.Einsum("...F,NFH->...NH", (2, 64, 16), rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)

    def __call__(self, x):
        x = self.norm(x + self.attn(x))
        h = self.heads(self.up(x))
        return x + h.reshape(x.shape)


class NNXStack(nnx.Module):
    def __init__(self, layers, rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NNXBlock(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        return run(x, self.blocks)


def test_nnx_vmap_blocks_run_with_scan():
    model = nnx.eval_shape(lambda: NNXStack(3, nnx.Rngs(0)))
    x = jnp.ones((2, 5, 32))
    rules = sparse_jax.nn.rules_from_model(model, x)
    state = filled(nnx.state(model, nnx.Param))
    plan_paths = [p.path for p in sparse_jax.plan_tree(state)]
    assert sorted(rule_map(rules)) == sorted(plan_paths)
    expected = {
        "blocks/attn/query/kernel": (1, (0,)),
        "blocks/attn/key/kernel": (1, (0,)),
        "blocks/attn/value/kernel": (1, (0,)),
        "blocks/attn/out/kernel": (2, (0,)),
        "blocks/up/kernel": (1, (0,)),
        "blocks/heads/kernel": (2, (0,)),  # (L, 2, F=64, H=16) contracted over F
    }
    by_path = rule_map(rules)
    for path, (axis, stacked) in expected.items():
        assert (by_path[path].axis, by_path[path].stacked) == (axis, stacked), path
    assert by_path["blocks/norm/scale"].skip == "feeds no contraction"
    pruned, masks = sparse_jax.prune(state, rules=rules)
    check_layers_against_numpy(state, masks, pruned, expected)


def test_rules_from_model_leaves_the_model_alone():
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    before = np.asarray(model.kernel[...])
    rules = sparse_jax.nn.rules_from_model(model, jnp.ones((2, 8)))
    assert rule_map(rules)["kernel"].axis == 0
    np.testing.assert_array_equal(np.asarray(model.kernel[...]), before)


# --- MaxText-like layout: (embed, layers, mlp), scanned over axis 1 ------------------------


def test_maxtext_layout_scanned_over_axis_1():
    layers, embed, mlp = 4, 16, 32
    params = random_tree({"wi": (embed, layers, mlp), "wo": (mlp, layers, embed)}, seed=3)

    def fn(p, x):
        def body(h, w):
            wi, wo = w
            return h + jax.nn.relu(h @ wi) @ wo, None

        h, _ = jax.lax.scan(body, x, (jnp.moveaxis(p["wi"], 1, 0), jnp.moveaxis(p["wo"], 1, 0)))
        return h

    rules = sparse_jax.rules_from_computation(fn, params, jnp.ones((2, embed)))
    by_path = rule_map(rules)
    expected = {"wi": (0, (1,)), "wo": (0, (1,))}
    for path, (axis, stacked) in expected.items():
        assert (by_path[path].axis, by_path[path].stacked) == (axis, stacked)
    pruned, masks = sparse_jax.prune(params, rules=rules)
    check_layers_against_numpy(params, masks, pruned, expected)


def test_fori_loop_indexing_layers_and_ys_of_a_scan():
    params = random_tree({"stack": (3, 16, 16), "cast": (4, 8, 16)}, seed=4)

    def fn(p, x):
        def layer(i, h):
            return jnp.tanh(h @ p["stack"][i])

        h = jax.lax.fori_loop(0, 3, layer, x)
        # ys of a scan: a per-layer bf16 copy, stacked again, then indexed.
        _, casted = jax.lax.scan(lambda c, w: (c, w.astype(jnp.bfloat16)), 0.0, p["cast"])
        return h[:, :8] @ casted[2].astype(jnp.float32)

    by_path = rule_map(sparse_jax.rules_from_computation(fn, params, jnp.ones((2, 16))))
    assert (by_path["stack"].axis, by_path["stack"].stacked) == (1, (0,))
    assert (by_path["cast"].axis, by_path["cast"].stacked) == (1, (0,))


# --- lookups, convolutions, reshapes and casts ---------------------------------------------


def test_embedding_lookup_and_tied_embedding_skipped():
    params = random_tree({"embed": (20, 8), "tied": (20, 8), "pos": (5, 8)}, seed=5)

    def fn(p, tokens):
        x = p["embed"][tokens] + jnp.take(p["tied"], tokens, axis=0) + p["pos"]
        return x @ p["tied"].T

    by_path = rule_map(sparse_jax.rules_from_computation(fn, params, jnp.zeros((2, 5), jnp.int32)))
    assert by_path["embed"].skip == "used as a lookup table (gather)"
    assert by_path["tied"].skip.startswith("used as a lookup table") and "axis 1" in by_path["tied"].skip
    assert by_path["pos"].skip == "feeds no contraction"
    plans = {p.path: p for p in sparse_jax.plan_tree(params, rules=list(by_path_items(by_path)))}
    assert all(p.axis is None and p.source == "computation" for p in plans.values())
    assert plans["embed"].reason == "used as a lookup table (gather)"


def by_path_items(by_path):
    return [(f"^{re.escape(k)}$", v) for k, v in by_path.items()]


def test_grouped_and_depthwise_conv():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.grouped = nnx.Conv(8, 16, (3, 3), feature_group_count=2, rngs=rngs)
            self.depthwise = nnx.Conv(16, 16, (3, 3), feature_group_count=16, rngs=rngs)
            self.pointwise = nnx.Conv(16, 8, (1, 1), rngs=rngs)

        def __call__(self, x):
            return self.pointwise(self.depthwise(self.grouped(x)))

    model = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    rules = sparse_jax.nn.rules_from_model(model, jnp.ones((1, 6, 6, 8)))
    by_path = rule_map(rules)
    assert model.grouped.kernel.shape == (3, 3, 4, 16)
    assert by_path["grouped/kernel"].axis == 2
    assert by_path["pointwise/kernel"].axis == 2
    assert "1 input channel per group" in by_path["depthwise/kernel"].skip
    state = filled(nnx.state(model, nnx.Param))
    pruned, masks = sparse_jax.prune(state, rules=rules)
    check_layers_against_numpy(state, masks, pruned, {"grouped/kernel": (2, ()), "pointwise/kernel": (2, ())})


def test_linen_conv_nchw_kernel_layout():
    params = random_tree({"w": (16, 8, 3, 3)}, seed=6)  # OIHW

    def fn(p, x):
        return jax.lax.conv_general_dilated(
            x, p["w"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )

    by_path = rule_map(sparse_jax.rules_from_computation(fn, params, jnp.ones((1, 8, 5, 5))))
    assert by_path["w"].axis == 1


def test_rgb_stem_conv_gets_its_axis_whatever_m():
    # The rules do not depend on m: a 3-channel stem still gets axis 2; plan_tree decides.
    params = random_tree({"stem": (7, 7, 3, 16)}, seed=19)

    def fn(p, x):
        return jax.lax.conv_general_dilated(
            x, p["stem"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    rules = sparse_jax.rules_from_computation(fn, params, jnp.ones((1, 16, 16, 3)))
    by_path = rule_map(rules)
    assert (by_path["stem"].axis, by_path["stem"].skip) == (2, None)
    # plan_tree skips it (3 is not a multiple of 4), as the defaults would, instead of raising.
    (plan,) = sparse_jax.plan_tree(params, rules=rules)
    assert plan.axis is None and plan.source == "computation"
    assert plan.reason.startswith("reduction size 3 (axis 2) not a multiple of 4")


def test_reshapes_transposes_and_casts():
    params = random_tree(
        {
            "qkv": (16, 3 * 32),  # fused (in, 3*heads*head_dim), split at run time
            "out_flat": (32, 16),  # (heads*head_dim, out), reshaped to (heads, head_dim, out)
            "heads": (4, 8, 16),  # (heads, head_dim, out), flattened to (heads*head_dim, out)
            "torch": (24, 16),  # (out, in), used as x @ w.T
            "bf16": (16, 24),
        },
        seed=7,
    )

    def fn(p, x):
        q, k, v = jnp.split(p["qkv"].astype(jnp.bfloat16), 3, axis=1)
        qkv = [(x.astype(jnp.bfloat16) @ w).reshape(2, 4, 8) for w in (q, k, v)]
        a = jnp.einsum("bhd,hdo->bo", qkv[0].astype(jnp.float32), p["out_flat"].reshape(4, 8, 16))
        b = qkv[1].reshape(2, 32).astype(jnp.float32) @ p["heads"].reshape(32, 16)
        c = x @ jnp.transpose(p["torch"])[:, :16]
        d = (x.astype(jnp.bfloat16) @ (p["bf16"].astype(jnp.bfloat16) * 0.5)).astype(jnp.float32)
        return a + b + c + d[:, :16] + qkv[2].reshape(2, 32)[:, :16]

    by_path = rule_map(sparse_jax.rules_from_computation(fn, params, jnp.ones((2, 16))))
    assert by_path["qkv"].axis == 0
    assert by_path["out_flat"].axis == 0
    assert by_path["heads"].axis == 1  # head_dim: innermost of the contracted heads*head_dim
    assert by_path["torch"].axis == 1
    assert by_path["bf16"].axis == 0
    pruned, masks = sparse_jax.prune(params, rules=by_path_items(by_path))
    check_layers_against_numpy(
        params, masks, pruned,
        {"qkv": (0, ()), "out_flat": (0, ()), "heads": (1, ()), "torch": (1, ()), "bf16": (0, ())},
    )


def test_bfloat16_params_and_abstract_params():
    params = {"w": jnp.ones((3, 16, 8), jnp.bfloat16)}

    def fn(p, x):
        h, _ = jax.lax.scan(lambda h, w: (h + jnp.sum(h @ w.astype(jnp.float32)), None), x, p["w"])
        return h

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    for tree in (params, abstract):
        by_path = rule_map(sparse_jax.rules_from_computation(fn, tree, jnp.ones((2, 16))))
        assert (by_path["w"].axis, by_path["w"].stacked) == (1, (0,))


def test_inner_jit_remat_cond_and_custom_vjp():
    params = random_tree({"a": (16, 8), "b": (8, 16), "c": (16, 8)}, seed=8)

    @jax.custom_vjp
    def project(w, x):
        return x @ w

    project.defvjp(lambda w, x: (x @ w, (w, x)), lambda res, g: (res[1].T @ g, g @ res[0].T))

    def fn(p, x):
        h = jax.jit(jax.checkpoint(lambda w, x: jnp.tanh(x @ w)))(p["a"], x)
        h = jax.lax.cond(x[0, 0] > 0, lambda w: h @ w, lambda w: h @ (2 * w), p["b"])
        return project(p["c"], h)

    by_path = rule_map(sparse_jax.rules_from_computation(fn, params, jnp.ones((2, 16))))
    assert {k: v.axis for k, v in by_path.items()} == {"a": 0, "b": 0, "c": 0}


def test_two_axes_skipped_and_unfollowed_leaf_left_to_the_defaults():
    params = random_tree({"square": (16, 16), "scattered": (16, 8), "plain": (16, 8)}, seed=9)
    params["count"] = jnp.zeros((), jnp.int32)

    def fn(p, x):
        y = x @ p["square"] + x @ p["square"].T
        z = x @ p["scattered"].at[0, 0].set(0.0)
        return y[:, :8] + z + x @ p["plain"] + p["count"]

    with pytest.warns(UserWarning, match=r"scattered \(scatter"):
        rules = sparse_jax.rules_from_computation(fn, params, jnp.ones((2, 16)))
    by_path = rule_map(rules)
    assert "different axes" in by_path["square"].skip
    assert "scattered" not in by_path and "count" not in by_path
    plans = {p.path: p for p in sparse_jax.plan_tree(params, rules=rules)}
    assert plans["scattered"].source == "default"
    assert plans["plain"].source == "computation" and plans["plain"].axis == 0


def test_params_mixed_with_the_inputs_are_not_contracted():
    # x * scale then a matmul: the scale is not the matmul's weight.
    params = random_tree({"scale": (16,), "gate": (2, 16), "w": (16, 8)}, seed=10)

    def fn(p, x):
        return (x * p["scale"] * p["gate"]) @ p["w"]

    by_path = rule_map(sparse_jax.rules_from_computation(fn, params, jnp.ones((2, 16))))
    assert by_path["scale"].skip == by_path["gate"].skip == "feeds no contraction"
    assert by_path["w"].axis == 0


def test_masked_takes_the_rules():
    params = random_tree({"w": (2, 8, 16)}, seed=11)
    fn = lambda p, x: jnp.einsum("...F,NHF->...NH", x, p["w"])  # noqa: E731
    rules = sparse_jax.rules_from_computation(fn, params, jnp.ones((3, 16)))
    import optax

    tx = sparse_jax.masked(optax.sgd(0.1), rules=rules)
    state = tx.init(params)
    masks = sparse_jax.masks_from_state(state, params)
    np.testing.assert_array_equal(np.asarray(masks["w"]), numpy_nm_mask(params["w"], 2))


def test_bad_params_leaf_named():
    with pytest.raises(TypeError, match="w/0: params leaves must be arrays"):
        sparse_jax.rules_from_computation(lambda p, x: x, {"w": [1.0]}, jnp.ones(2))


@pytest.mark.parametrize("module", [_trace, _rules])
def test_docstring_examples(module):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_weight_noise_from_a_key_argument_and_a_select_on_the_inputs():
    params = random_tree({"noisy": (16, 8), "switched": (16, 8)}, seed=12)

    def fn(p, x, key, train):
        noisy = p["noisy"] + 0.01 * jax.random.normal(key, p["noisy"].shape)
        switched = jnp.where(train, p["switched"], 0.5 * p["switched"]).astype(jnp.bfloat16)
        return x @ noisy + (x.astype(jnp.bfloat16) @ switched).astype(jnp.float32)

    by_path = rule_map(
        sparse_jax.rules_from_computation(fn, params, jnp.ones((2, 16)), jax.random.key(0), jnp.array(True))
    )
    assert by_path["noisy"].axis == 0 and by_path["switched"].axis == 0


def test_unused_leaf_and_a_fn_that_ignores_its_params():
    params = random_tree({"used": (16, 8), "unused": (16, 8)}, seed=13)
    by_path = rule_map(sparse_jax.rules_from_computation(lambda p, x: x @ p["used"], params, jnp.ones((2, 16))))
    assert by_path["unused"].skip == "not used by the computation"
    with pytest.raises(ValueError, match="does not use any of the 2"):
        sparse_jax.rules_from_computation(lambda p, x: x @ params["used"], params, jnp.ones((2, 16)))


def test_class_token_joined_to_the_inputs_is_not_a_weight():
    params = random_tree({"cls": (1, 1, 16), "w": (16, 8), "a": (16, 4), "b": (4, 8)}, seed=14)

    def fn(p, x):
        tokens = jnp.concatenate([jnp.broadcast_to(p["cls"], (x.shape[0], 1, 16)), x], axis=1)
        return tokens @ (p["w"] + p["a"] @ p["b"])  # a LoRA-style update of w

    by_path = rule_map(sparse_jax.rules_from_computation(fn, params, jnp.ones((2, 5, 16))))
    assert by_path["cls"].skip == "feeds no contraction"
    # a (16, 4) @ b (4, 8): a is contracted over its axis 1, b over its axis 0.
    assert (by_path["w"].axis, by_path["a"].axis, by_path["b"].axis) == (0, 1, 0)


def test_nested_scans_and_linen_vmap_batch_dims():
    params = random_tree({"w": (2, 3, 16, 16)}, seed=15)

    def fn(p, x):
        def outer(h, group):
            h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, group)
            return h, None

        return jax.lax.scan(outer, x, p["w"])[0]

    by_path = rule_map(sparse_jax.rules_from_computation(fn, params, jnp.ones((2, 16))))
    assert (by_path["w"].axis, by_path["w"].stacked) == (2, (0, 1))
    pruned, masks = sparse_jax.prune(params, rules=by_path_items(by_path))
    check_layers_against_numpy(params, masks, pruned, {"w": (2, (0, 1))})

    class Dense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(x)

    model = nn.vmap(Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0)()
    x = jnp.ones((3, 5, 16))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x)["params"])
    by_path = rule_map(sparse_jax.rules_from_computation(lambda p, x: model.apply({"params": p}, x), abstract, x))
    assert (by_path["Dense_0/kernel"].axis, by_path["Dense_0/kernel"].stacked) == (1, (0,))


def test_partly_contracted_axes_are_skipped_with_the_reason():
    params = random_tree({"split": (16, 8), "sliced": (16, 8), "table": (10, 16)}, seed=16)

    def fn(p, x, token):
        a = jnp.einsum("bj,ijk->bik", x[:, :4], p["split"].reshape(4, 4, 8)).sum(1)  # half of axis 0
        b = x[:, :8] @ p["sliced"][:8]  # a sub-range of axis 0
        row = jax.lax.dynamic_index_in_dim(p["table"], token, keepdims=False)  # one row, chosen by the input
        return a + b + row[:8]

    by_path = rule_map(sparse_jax.rules_from_computation(fn, params, jnp.ones((2, 16)), jnp.int32(3)))
    assert by_path["split"].skip == "dot_general contracts only part of axis 0 (a reshape splits it)"
    assert by_path["sliced"].skip == "dot_general contracts a slice or concatenation of axis 0"
    assert by_path["table"].skip.startswith("used as a lookup table (dynamic_slice at an index")


def test_params_on_the_activation_side_of_a_matmul_are_skipped():
    params = random_tree({"h0": (16,), "latents": (4, 16), "w": (16, 16), "wq": (16, 8)}, seed=17)

    def fn(p, xs):
        h, _ = jax.lax.scan(lambda h, x: (jnp.tanh(h @ p["w"] + x), None), p["h0"], xs)
        queries = jnp.broadcast_to(p["latents"], (xs.shape[1], 4, 16)) @ p["wq"]
        return h.sum() + queries.sum()

    by_path = rule_map(sparse_jax.rules_from_computation(fn, params, jnp.ones((3, 16))))
    assert by_path["h0"].skip.startswith("a vector")
    assert "broadcast over a batch" in by_path["latents"].skip
    assert by_path["w"].axis == 0 and by_path["wq"].axis == 0


def test_gather_at_fixed_indices_is_left_to_the_defaults():
    params = random_tree({"w": (16, 8)}, seed=18)
    fn = lambda p, x: x @ p["w"][:, jnp.array([1, 0, 3, 2, 5, 4, 7, 6])]  # noqa: E731
    with pytest.warns(UserWarning, match="gather at indices that do not come from the inputs"):
        rules = sparse_jax.rules_from_computation(fn, params, jnp.ones((2, 16)))
    assert rules == []
