"""Model-level one-shot pruning (`sparse_jax.oneshot_prune`) against NumPy references."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import sparse_jax


def nm_counts(x, axis, m=4):
    """Nonzeros of every group of m along ``axis`` (NumPy)."""
    moved = np.moveaxis(np.asarray(x, np.float32), axis, -1)
    return (moved.reshape(*moved.shape[:-1], -1, m) != 0).sum(-1)


def assert_exactly_2_4(x, axis):
    counts = nm_counts(x, axis)
    assert counts.size and (counts == 2).all(), np.unique(counts)


def mlp(din=32, hidden=64, dout=16, *, dtype=jnp.float32, seed=0):
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(
        nnx.Linear(din, hidden, rngs=rngs, dtype=dtype, param_dtype=dtype), nnx.relu,
        nnx.Linear(hidden, hidden, rngs=rngs, dtype=dtype, param_dtype=dtype), nnx.relu,
        nnx.Linear(hidden, dout, rngs=rngs, dtype=dtype, param_dtype=dtype),
    )


def calibration(shape, count=2, seed=10, dtype=jnp.float32):
    return [jax.random.normal(jax.random.key(seed + i), shape, dtype) for i in range(count)]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_nnx_mlp_every_kernel_exactly_2_4(method):
    model = mlp()
    before = nnx.state(model, nnx.Param)
    result = sparse_jax.nn.oneshot_prune_model(
        model, calibration((48, 32)), method=method, progress=False)
    kernels = ["layers/0/kernel", "layers/2/kernel", "layers/4/kernel"]
    assert [row.path for row in result.report] == kernels
    assert all(row.tokens == 96 and row.method == method for row in result.report)
    for i in (0, 2, 4):
        kernel = result.params["layers"][i]["kernel"][...]
        mask = np.asarray(result.masks["layers"][i]["kernel"][...])
        assert_exactly_2_4(kernel, axis=0)
        assert_exactly_2_4(mask, axis=0)
        assert (np.asarray(kernel)[~mask] == 0).all()
        # Biases are not pruned and come back unchanged.
        assert result.masks["layers"][i]["bias"].get_value() is None
        np.testing.assert_array_equal(result.params["layers"][i]["bias"][...],
                                      before["layers"][i]["bias"][...])
        if method != "sparsegpt":  # kept weights unchanged
            dense = np.asarray(before["layers"][i]["kernel"][...])
            np.testing.assert_array_equal(np.asarray(kernel)[mask], dense[mask])
    if method != "sparsegpt":  # the masks are masked-ready: on the dense params, the result
        applied = sparse_jax.apply_masks(before, result.masks)
        for a, b in zip(jax.tree.leaves(applied), jax.tree.leaves(result.params)):
            np.testing.assert_array_equal(a, b)
    nnx.update(model, result.params)
    assert_exactly_2_4(model.layers[4].kernel[...], axis=0)


@pytest.mark.slow
def test_masks_drive_masked_training():
    params, fn = two_layer()
    batches = calibration((40, 32), count=2)
    pruned, masks, _ = sparse_jax.oneshot_prune(fn, params, batches, progress=False)
    assert masks["l1"]["bias"] is None
    optimizer = sparse_jax.masked(optax.adam(1e-2), masks)
    state = optimizer.init(pruned)
    grads = jax.grad(lambda p: jnp.sum(fn(p, batches[0]) ** 2))(pruned)
    updates, state = optimizer.update(grads, state, pruned)
    stepped = optax.apply_updates(pruned, updates)
    for name in ("l1", "l2"):
        kernel = np.asarray(stepped[name]["kernel"])
        assert_exactly_2_4(kernel, axis=0)
        assert (kernel[~np.asarray(masks[name]["kernel"])] == 0).all()
        assert not np.array_equal(kernel, np.asarray(pruned[name]["kernel"]))  # it trained


def two_layer(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    # The MLP's first and last layer shapes: the solves compile once for all tests.
    params = {"l1": {"kernel": jax.random.normal(k1, (32, 64)) / 6,
                     "bias": jax.random.normal(k3, (64,)) / 4},
              "l2": {"kernel": jax.random.normal(k2, (64, 16)) / 6}}

    def fn(p, x):
        h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
        return h @ p["l2"]["kernel"]

    return params, fn


def hidden_hessian(batches, kernel, bias):
    xtx = np.zeros((kernel.shape[1],) * 2)
    for x in batches:
        h = np.maximum(np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
                       + np.asarray(bias, np.float64), 0)
        xtx += h.T @ h
    return xtx


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_sequential_statistics_by_hand(method):
    params, fn = two_layer()
    batches = calibration((40, 32), count=3)
    seq = sparse_jax.oneshot_prune(fn, params, batches, method=method, keep_stats=True,
                                   progress=False)
    dense = sparse_jax.oneshot_prune(fn, params, batches, method=method, keep_stats=True,
                                     sequential=False, progress=False)
    rows = {r.path: r for r in seq.report}
    dense_rows = {r.path: r for r in dense.report}
    x = np.concatenate([np.asarray(b, np.float64) for b in batches])
    for r in (rows, dense_rows):
        np.testing.assert_allclose(r["l1/kernel"].stats.xtx, x.T @ x, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(r["l1/kernel"].stats.sq_norms, (x * x).sum(0), rtol=1e-5)
        assert int(r["l2/kernel"].stats.count) == 120
    # Sequential: layer 2 saw the hidden units of the *pruned* layer 1.
    pruned_l1 = seq.params["l1"]["kernel"]
    expect_seq = hidden_hessian(batches, pruned_l1, params["l1"]["bias"])
    np.testing.assert_allclose(rows["l2/kernel"].stats.xtx, expect_seq, rtol=1e-4, atol=1e-3)
    # Not sequential: the dense layer 1's.
    expect_dense = hidden_hessian(batches, params["l1"]["kernel"], params["l1"]["bias"])
    np.testing.assert_allclose(dense_rows["l2/kernel"].stats.xtx, expect_dense, rtol=1e-4,
                               atol=1e-3)
    assert np.abs(expect_seq - expect_dense).max() > 0.1 * np.abs(expect_dense).max()
    # Layer 1 is solved the same way either way; layer 2 from different statistics.
    np.testing.assert_array_equal(seq.masks["l1"]["kernel"], dense.masks["l1"]["kernel"])
    # The report's errors are the relative reconstruction errors over the calibration inputs.
    w = np.asarray(params["l2"]["kernel"], np.float64)
    if method == "wanda":
        w_pruned = np.asarray(seq.params["l2"]["kernel"], np.float64)
        h = np.maximum(x @ np.asarray(pruned_l1, np.float64)
                       + np.asarray(params["l1"]["bias"], np.float64), 0)
        expected = np.sum((h @ w - h @ w_pruned) ** 2) / np.sum((h @ w) ** 2)
        np.testing.assert_allclose(rows["l2/kernel"].error, expected, rtol=1e-3)
    else:
        assert rows["l2/kernel"].error < rows["l2/kernel"].masked_error


class Block(linen.Module):
    features: int = 32
    heads: int = 4

    @linen.compact
    def __call__(self, x, _):
        h = linen.LayerNorm(name="ln1")(x)
        x = x + linen.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h)
        h = linen.LayerNorm(name="ln2")(x)
        h = linen.Dense(4 * self.features, name="fc")(h)
        x = x + linen.Dense(self.features, name="proj")(jax.nn.gelu(h))
        return x, None


class Stack(linen.Module):
    layers: int = 3

    @linen.compact
    def __call__(self, x):
        scanned = linen.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                             length=self.layers)
        x, _ = scanned(name="blocks")(x, None)
        return x


@pytest.mark.slow  # 13 s of CPU (wanda) / more (sparsegpt); kept green by `pytest -m slow`
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_scan_stacked_transformer_per_layer_slice(method):
    model = Stack(layers=2)
    batches = calibration((2, 8, 32), count=2)
    params = model.init(jax.random.key(0), batches[0])["params"]

    def fn(p, x):
        return model.apply({"params": p}, x)

    result = sparse_jax.oneshot_prune(fn, params, batches, method=method, keep_stats=True,
                                      progress=False)
    plans = {p.path: p for p in sparse_jax.plan_tree(
        params, rules=sparse_jax.rules_from_computation(fn, params, batches[0]))}
    kernels = {path: plan for path, plan in plans.items() if plan.pruned}
    assert set(kernels) == {f"blocks/{name}/kernel" for name in
                            ("attn/query", "attn/key", "attn/value", "attn/out", "fc", "proj")}
    assert plans["blocks/attn/out/kernel"].axis == 2  # (layers, heads, head_dim, out)
    rows = [(r.path, r.index) for r in result.report]
    assert len(rows) == 6 * 2 and len(set(rows)) == len(rows)
    # Sequential order: layer by layer; q/k/v share their input and are one group.
    assert [index for _, index in rows] == [(0,)] * 6 + [(1,)] * 6
    flat = {sparse_jax._paths.path_to_str(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(result.params)[0]}
    for path, plan in kernels.items():
        assert plan.stacked_axes == (0,)
        for layer in range(2):
            assert_exactly_2_4(flat[path][layer], axis=plan.axis - 1)
    # Layer 0's query projection saw LayerNorm(x) (scale 1, bias 0 at init), per slice.
    x = np.concatenate([np.asarray(b, np.float64).reshape(-1, 32) for b in batches])
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    stats = {(r.path, r.index): r.stats for r in result.report}
    np.testing.assert_allclose(stats[("blocks/attn/query/kernel", (0,))].xtx, normed.T @ normed,
                               rtol=1e-4, atol=1e-3)
    assert int(stats[("blocks/attn/out/kernel", (1,))].count) == 32
    assert stats[("blocks/fc/kernel", (1,))].xtx.shape == (32, 32)
    assert stats[("blocks/proj/kernel", (1,))].xtx.shape == (128, 128)
    # Later slices' inputs differ from layer 0's (they are another layer's inputs).
    assert not np.allclose(stats[("blocks/attn/query/kernel", (1,))].xtx, normed.T @ normed,
                           rtol=1e-2)


def im2col_hessian(images, kh, kw):
    """X^T X of SAME-padded 'HWC' patches, features in (kh, kw, in) order (NumPy, float64)."""
    total = 0
    for image in images:
        image = np.asarray(image, np.float64)
        b, h, w, c = image.shape
        padded = np.pad(image, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
        rows = []
        for i in range(h):
            for j in range(w):
                rows.append(padded[:, i:i + kh, j:j + kw, :].reshape(b, -1))
        patches = np.concatenate(rows)
        total = total + patches.T @ patches
    return total


@pytest.mark.slow
def test_conv_statistics_are_the_im2col_hessian():
    conv = nnx.Conv(8, 16, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
    batches = calibration((2, 6, 6, 8), count=2)
    result = sparse_jax.nn.oneshot_prune_model(conv, batches, keep_stats=True, progress=False)
    (row,) = result.report
    assert row.path == "kernel" and row.stats.xtx.shape == (72, 72)
    np.testing.assert_allclose(row.stats.xtx, im2col_hessian(batches, 3, 3), rtol=1e-4,
                               atol=1e-3)
    assert_exactly_2_4(result.params["kernel"][...], axis=2)  # HWIO: input channels
    assert row.error < row.masked_error


def test_reversed_kernel_statistics_in_leaf_order():
    params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    batches = calibration((32, 8), count=1)

    def fn(p, x):
        return x @ jnp.flip(p["w"], 0)

    result = sparse_jax.oneshot_prune(fn, params, batches, keep_stats=True, progress=False)
    x = np.asarray(batches[0], np.float64)[:, ::-1]  # leaf row i meets input 7 - i
    np.testing.assert_allclose(result.report[0].stats.xtx, x.T @ x, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_bf16_model():
    model = mlp(dtype=jnp.bfloat16)
    result = sparse_jax.nn.oneshot_prune_model(
        model, calibration((48, 32), dtype=jnp.bfloat16), progress=False, keep_stats=True)
    for i in (0, 2, 4):
        kernel = result.params["layers"][i]["kernel"][...]
        assert kernel.dtype == jnp.bfloat16
        assert_exactly_2_4(kernel, axis=0)
    for row in result.report:
        assert row.stats.xtx.dtype == jnp.float32
        assert np.isfinite(row.error) and row.error < row.masked_error


@pytest.mark.slow
def test_sharded_params_same_masks_as_unsharded():
    assert len(jax.devices()) >= 8
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    params, fn = two_layer(seed=3)
    batches = calibration((64, 32), count=2)
    spec = {"l1": {"kernel": PartitionSpec(None, "model"), "bias": PartitionSpec("model")},
            "l2": {"kernel": PartitionSpec("model", None)}}
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, spec)
    sharded_batches = [jax.device_put(b, NamedSharding(mesh, PartitionSpec("data", None)))
                       for b in batches]
    for method in ("sparsegpt", "wanda"):
        plain = sparse_jax.oneshot_prune(fn, params, batches, method=method, progress=False)
        result = sparse_jax.oneshot_prune(fn, sharded, sharded_batches, method=method,
                                          progress=False)
        for name in ("l1", "l2"):
            np.testing.assert_array_equal(result.masks[name]["kernel"], plain.masks[name]["kernel"])
            np.testing.assert_allclose(result.params[name]["kernel"], plain.params[name]["kernel"],
                                       rtol=1e-4, atol=1e-5)
            assert result.params[name]["kernel"].sharding == sharded[name]["kernel"].sharding
            assert result.masks[name]["kernel"].sharding == sharded[name]["kernel"].sharding


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    # Correlated inputs with a few outlier channels: Wanda's input norms matter,
    # SparseGPT's compensation of the correlations matters more.
    key_mix, key_w, key_z = jax.random.split(jax.random.key(0), 3)
    mix = jax.random.normal(key_mix, (64, 64)) / 8 + jnp.eye(64)
    scale = jnp.ones(64).at[jnp.array([3, 17, 40, 41])].set(10.0)
    params = {"w": jax.random.normal(key_w, (64, 32))}
    batches = [(jax.random.normal(k, (512, 64)) @ mix) * scale
               for k in jax.random.split(key_z, 2)]

    def fn(p, x):
        return x @ p["w"]

    errors = {method: sparse_jax.oneshot_prune(fn, params, batches, method=method,
                                               progress=False).report[0].error
              for method in ("sparsegpt", "wanda", "magnitude")}
    x = np.concatenate([np.asarray(b, np.float64) for b in batches])
    w = np.asarray(params["w"], np.float64)
    for method in errors:  # the report's number is the error over the calibration tokens
        pruned = np.asarray(sparse_jax.oneshot_prune(fn, params, batches, method=method,
                                                     progress=False).params["w"], np.float64)
        expected = np.sum((x @ w - x @ pruned) ** 2) / np.sum((x @ w) ** 2)
        np.testing.assert_allclose(errors[method], expected, rtol=1e-3)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_bad_input_is_named():
    params, fn = two_layer()
    batches = calibration((8, 32), count=1)
    with pytest.raises(ValueError, match="method"):
        sparse_jax.oneshot_prune(fn, params, batches, method="obs", progress=False)
    with pytest.raises(ValueError, match="empty"):
        sparse_jax.oneshot_prune(fn, params, [], progress=False)
    stacked = {"w": jax.random.normal(jax.random.key(0), (2, 32, 32))}

    def python_loop(p, x):
        for layer in range(2):
            x = jnp.tanh(x @ p["w"][layer])
        return x

    with pytest.raises(ValueError, match=r"w \(shape \(2, 32, 32\)\).*outside a scan"):
        sparse_jax.oneshot_prune(python_loop, stacked, batches,
                                 rules=[("w", sparse_jax.Layout(axis=1, stacked=0))],
                                 progress=False)


class Layer(nnx.Module):
    def __init__(self, features, rngs):
        self.linear = nnx.Linear(features, features, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.linear(x))


class ScannedLayers(nnx.Module):
    def __init__(self, layers, features, seed=0):
        @nnx.vmap(in_axes=0, out_axes=0)
        def create(key):
            return Layer(features, nnx.Rngs(key))

        self.layers = create(jax.random.split(jax.random.key(seed), layers))

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def forward(layer, x):
            return layer(x)

        return forward(self.layers, x)


def test_nnx_scan_sequential_statistics_per_slice_by_hand():
    model = ScannedLayers(layers=2, features=16)
    batches = calibration((24, 16), count=2)
    result = sparse_jax.nn.oneshot_prune_model(model, batches, method="wanda", keep_stats=True,
                                               progress=False)
    assert [(r.path, r.index) for r in result.report] == [
        ("layers/linear/kernel", (0,)), ("layers/linear/kernel", (1,))]
    kernel = np.asarray(result.params["layers"]["linear"]["kernel"][...], np.float64)
    bias = np.asarray(result.params["layers"]["linear"]["bias"][...], np.float64)
    assert kernel.shape == (2, 16, 16)
    for layer in range(2):
        assert_exactly_2_4(kernel[layer], axis=0)
    # Slice 1 saw relu(x @ pruned slice 0 + bias 0).
    x = np.concatenate([np.asarray(b, np.float64) for b in batches])
    h = np.maximum(x @ kernel[0] + bias[0], 0)
    stats = result.report[1].stats
    np.testing.assert_allclose(stats.xtx, h.T @ h, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(result.report[0].stats.xtx, x.T @ x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec, kernel_shape, axis, to_leaf_order", [
    ("...NH,NHD->...D", (2, 8, 12), 1, (0, 1)),   # attention out kernel: K = (N, H)
    ("...NH,HND->...D", (2, 8, 12), 1, (1, 0)),   # stored (H, N, D): K in leaf order (H, N)
])
def test_einsum_statistics_over_all_contracted_axes(spec, kernel_shape, axis, to_leaf_order):
    params = {"w": jax.random.normal(jax.random.key(0), kernel_shape)}
    inputs = tuple(kernel_shape[i] for i in np.argsort(to_leaf_order))  # (N, H) as x has them
    batches = calibration((3, 5, *inputs), count=2)

    def fn(p, x):
        return jnp.einsum(spec, x, p["w"])

    result = sparse_jax.oneshot_prune(fn, params, batches, method="wanda", keep_stats=True,
                                      progress=False)
    (row,) = result.report
    x = np.concatenate([np.asarray(b, np.float64).reshape(-1, *inputs) for b in batches])
    x = x.transpose(0, *(1 + np.array(to_leaf_order))).reshape(len(x), -1)
    np.testing.assert_allclose(row.stats.xtx, x.T @ x, rtol=1e-5, atol=1e-4)
    assert_exactly_2_4(result.params["w"], axis=axis)
    # Wanda's score uses the matching input norm for every weight.
    w = np.asarray(params["w"], np.float64)
    norms = np.sqrt((x * x).sum(0)).reshape(w.shape[:2])[..., None]
    score = np.abs(w) * norms
    moved = np.moveaxis(score, axis, -1)
    kept = np.argsort(-moved.reshape(*moved.shape[:-1], -1, 4), axis=-1, kind="stable")[..., :2]
    expected = np.zeros(moved.reshape(*moved.shape[:-1], -1, 4).shape, bool)
    np.put_along_axis(expected, kept, True, axis=-1)
    expected = np.moveaxis(expected.reshape(moved.shape), -1, axis)
    np.testing.assert_array_equal(result.masks["w"], expected)


def test_layers_inside_jit_remat_cond_and_while():
    params, _ = two_layer(seed=1)

    @jax.jit
    @jax.checkpoint
    def first(p, x):
        return jax.nn.relu(x @ p["kernel"] + p["bias"])

    def fn(p, x):
        h = first(p["l1"], x)
        out = jax.lax.cond(jnp.sum(h) > -1e9, lambda h: h @ p["l2"]["kernel"],
                           lambda h: -(h @ p["l2"]["kernel"]), h)
        # A fori_loop (while) that uses the second kernel again does not change its layout.
        return jax.lax.fori_loop(0, 2, lambda i, o: o + 0.0 * (h @ p["l2"]["kernel"]), out)

    batches = calibration((40, 32), count=2)
    result = sparse_jax.oneshot_prune(fn, params, batches, method="wanda", keep_stats=True,
                                      progress=False)
    rows = {r.path: r for r in result.report}
    x = np.concatenate([np.asarray(b, np.float64) for b in batches])
    np.testing.assert_allclose(rows["l1/kernel"].stats.xtx, x.T @ x, rtol=1e-5, atol=1e-4)
    # l2 is contracted with h three times per batch (cond branch, then twice in the loop).
    expect = hidden_hessian(batches, result.params["l1"]["kernel"], params["l1"]["bias"])
    assert int(rows["l2/kernel"].stats.count) == 3 * 80
    np.testing.assert_allclose(rows["l2/kernel"].stats.xtx, 3 * expect, rtol=1e-4, atol=1e-3)


def test_vmapped_stacked_layers_are_named_in_the_error():
    stacked = {"w": jax.random.normal(jax.random.key(0), (2, 32, 32))}

    def fn(p, xs):  # layer i applied to xs[i]: the layer axis is a dot_general batch dim
        return jax.vmap(lambda w, x: x @ w)(p["w"], xs)

    with pytest.raises(ValueError, match=r"oneshot_prune: w \(shape \(2, 32, 32\)\).*vmap"):
        sparse_jax.oneshot_prune(fn, stacked, calibration((2, 8, 32), count=1), progress=False)
