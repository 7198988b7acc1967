"""Transposable N:M masks against brute force; prune/masked/compress with them; the training layer."""

import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparse_jax


@functools.lru_cache(maxsize=None)
def all_valid_masks(n: int, m: int) -> np.ndarray:
    """Every 0/1 m x m mask with n per row and column, by filtering all 2**(m*m)."""
    bits = (np.arange(2 ** (m * m))[:, None] >> np.arange(m * m)[None, :]) & 1
    masks = bits.reshape(-1, m, m)
    valid = (masks.sum(1) == n).all(1) & (masks.sum(2) == n).all(1)
    return masks[valid].astype(np.float64)


def brute_force_best(block: np.ndarray, n: int) -> tuple[float, float]:
    """(best, second best) kept |magnitude| over all 0/1 masks with n per row and column."""
    m = block.shape[0]
    kept = np.sort(np.einsum("kij,ij->k", all_valid_masks(n, m), np.abs(block.astype(np.float64))))
    return float(kept[-1]), float(kept[-2]) if len(kept) > 1 else -np.inf


def blocks_of(x: np.ndarray, m: int) -> np.ndarray:
    rows, cols = x.shape
    return x.reshape(rows // m, m, cols // m, m).swapaxes(1, 2).reshape(-1, m, m)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (1, 2)])
def test_exact_mask_matches_brute_force(n, m):
    rng = np.random.default_rng(n * 10 + m)
    w = rng.standard_normal((8 * m, 6 * m)).astype(np.float32)
    mask = np.asarray(sparse_jax.transposable_nm_mask(jnp.asarray(w), n, m))
    for block, kept in zip(blocks_of(w, m), blocks_of(mask, m)):
        assert (kept.sum(0) == n).all() and (kept.sum(1) == n).all()
        best, second = brute_force_best(block, n)
        got = float((np.abs(block.astype(np.float64)) * kept).sum())
        assert got == pytest.approx(best, rel=1e-6)
        if best - second > 1e-4 * best:  # a clear winner: the very same mask
            assert got == pytest.approx(best, rel=1e-9)


def test_pattern_counts_are_the_known_numbers():
    # 4x4 0/1 matrices with 2 ones per row and column: 90 (OEIS A001499);
    # with 1 (or 3): the 24 permutation matrices (or their complements).
    assert sparse_jax._transposable.block_patterns(2, 4).shape == (90, 16)
    assert sparse_jax._transposable.block_patterns(1, 4).shape == (24, 16)
    assert sparse_jax._transposable.block_patterns(3, 4).shape == (24, 16)


def test_conv_and_stacked_kernels_use_their_in_out_axes():
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((3, 2, 8, 12)).astype(np.float32)
    mask = np.asarray(sparse_jax.transposable_nm_mask(jnp.asarray(conv)))
    for i, j in itertools.product(range(3), range(2)):
        slice_mask = np.asarray(sparse_jax.transposable_nm_mask(jnp.asarray(conv[i, j])))
        np.testing.assert_array_equal(mask[i, j], slice_mask)
    assert bool(sparse_jax.is_transposable_nm(jnp.asarray(conv * mask)))
    # The pattern is symmetric in its two axes: naming them the other way round agrees.
    swapped = np.asarray(sparse_jax.transposable_nm_mask(jnp.asarray(conv), axes=(-1, -2)))
    np.testing.assert_array_equal(mask, swapped)


def test_zero_blocks_and_nan_still_give_valid_masks():
    w = np.zeros((8, 8), np.float32)
    w[0, 0] = np.nan
    mask = np.asarray(sparse_jax.transposable_nm_mask(jnp.asarray(w)))
    assert mask[0, 0]  # NaN ranks highest and stays visible
    for block in blocks_of(mask, 4):
        assert (block.sum(0) == 2).all() and (block.sum(1) == 2).all()


@pytest.mark.parametrize("n,m", [(4, 8), (2, 8)])
def test_greedy_for_larger_m_is_nm_both_ways_and_near_exact(n, m):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((4 * m, 2 * m)), jnp.float32)
    mask = sparse_jax.transposable_nm_mask(w, n, m)
    assert bool(sparse_jax.is_transposable_nm(w * mask, n, m))
    # The greedy is a 1/2-approximation of the best kept magnitude; the sum of
    # the n*m largest entries per block bounds that best from above.
    for block, kept in zip(blocks_of(np.abs(np.asarray(w)), m), blocks_of(np.asarray(mask), m)):
        upper = np.sort(block.ravel())[::-1][: n * m].sum()
        assert (block * kept).sum() >= 0.5 * upper


def test_greedy_never_beats_exact_for_2_4():
    w = jax.random.normal(jax.random.key(3), (32, 32))
    exact = jnp.sum(jnp.abs(w) * sparse_jax.transposable_nm_mask(w, method="exact"))
    greedy_mask = sparse_jax.transposable_nm_mask(w, method="greedy")
    assert bool(sparse_jax.is_transposable_nm(w * greedy_mask))
    assert float(jnp.sum(jnp.abs(w) * greedy_mask)) <= float(exact) * (1 + 1e-6)


def test_bad_input_raises_clearly():
    with pytest.raises(TypeError, match="floating-point"):
        sparse_jax.transposable_nm_mask(jnp.ones((4, 4), jnp.int32))
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        sparse_jax.transposable_nm_mask(jnp.ones((8, 6)))
    with pytest.raises(ValueError, match="at least 2 dims"):
        sparse_jax.transposable_nm_mask(jnp.ones((8,)))
    with pytest.raises(ValueError, match="method='greedy'"):
        sparse_jax.transposable_nm_mask(jnp.ones((8, 8)), 4, 8, method="exact")


def make_params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "dense": {"kernel": jax.random.normal(keys[0], (16, 8)), "bias": jnp.zeros(8)},
        "conv": {"kernel": jax.random.normal(keys[1], (3, 3, 8, 4))},
        "head": {"kernel": jax.random.normal(keys[2], (8, 10))},  # out 10: not transposable
    }


def test_prune_transposable_masked_keeps_it_and_compress_along_axis_1():
    params = make_params()
    pruned, masks = sparse_jax.prune(params, transposable=True)
    assert masks["dense"]["bias"] is None
    for name in ("dense", "conv"):
        kernel = pruned[name]["kernel"]
        assert bool(sparse_jax.is_transposable_nm(kernel))
        np.testing.assert_array_equal(
            masks[name]["kernel"], sparse_jax.transposable_nm_mask(params[name]["kernel"])
        )
    # The head cannot be blocked along its 10 outputs: ordinary 2:4 along in.
    np.testing.assert_array_equal(
        masks["head"]["kernel"], sparse_jax.nm_mask(params["head"]["kernel"], axis=0)
    )
    tx = sparse_jax.masked(optax.sgd(0.1, momentum=0.9), masks)
    state = tx.init(pruned)
    for step in range(3):
        grads = jax.tree.map(lambda x: jnp.full_like(x, step + 1.0), pruned)
        updates, state = tx.update(grads, state, pruned)
        pruned = optax.apply_updates(pruned, updates)
    kernel = pruned["dense"]["kernel"]
    assert bool(sparse_jax.is_transposable_nm(kernel))
    for axis in (0, 1):
        s = sparse_jax.compress(kernel, axis=axis)
        np.testing.assert_array_equal(sparse_jax.decompress(s), kernel)


def dense_reference_layer(kernel, mask, bias, x):
    return x @ jnp.where(mask, kernel, 0.0) + bias


@pytest.mark.slow
def test_transposable_sparse_linear_forward_and_gradients_equal_dense_masked():
    rng = np.random.default_rng(5)
    kernel = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(48), jnp.float32)
    mask = sparse_jax.transposable_nm_mask(kernel)
    kernel = kernel.at[0, jnp.argmax(mask[0])].set(0.0)  # a kept weight that is exactly 0
    layer = sparse_jax.nn.TransposableSparseLinear(kernel, bias, mask=mask)
    x = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((2, 5, 48)), jnp.float32)

    np.testing.assert_allclose(layer(x), dense_reference_layer(kernel, mask, bias, x), atol=1e-4)

    def dense_loss(kernel, bias, x):
        return jnp.sum(dense_reference_layer(kernel, mask, bias, x) * cotangent)

    grads = nnx.grad(lambda model: jnp.sum(model(x) * cotangent))(layer)
    d_values, d_bias = grads["values"][...], grads["bias"][...]
    d_x = jax.grad(lambda x: jnp.sum(layer(x) * cotangent))(x)
    r_kernel, r_bias, r_x = jax.grad(dense_loss, argnums=(0, 1, 2))(kernel, bias, x)
    np.testing.assert_allclose(d_x, r_x, atol=1e-4)
    np.testing.assert_allclose(d_bias, r_bias, atol=1e-4)
    d_kernel = sparse_jax.decompress(sparse_jax.Sparse24(d_values, layer.meta[...], (64, 48), 0))
    np.testing.assert_allclose(d_kernel, r_kernel, atol=1e-4)  # r_kernel is 0 off the mask
    # The backward operand is W.T, compressed along out, from the same values.
    np.testing.assert_array_equal(
        sparse_jax.decompress(layer.kernel_t), jnp.where(mask, kernel, 0.0).T
    )


def test_transposable_sparse_linear_trains_like_the_masked_dense_layer():
    rngs = nnx.Rngs(0)
    dense = nnx.Linear(32, 16, rngs=rngs)
    mask = sparse_jax.transposable_nm_mask(dense.kernel[...])
    dense.kernel[...] = jnp.where(mask, dense.kernel[...], 0.0)
    sparse = sparse_jax.nn.TransposableSparseLinear.from_linear(dense)
    x = jax.random.normal(jax.random.key(1), (8, 32))
    y = jax.random.normal(jax.random.key(2), (8, 16))

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    masks = {"bias": None, "kernel": mask}
    dense_opt = nnx.Optimizer(dense, sparse_jax.masked(optax.sgd(0.1, momentum=0.9), masks), wrt=nnx.Param)
    sparse_opt = nnx.Optimizer(sparse, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [(float(step(dense, dense_opt)), float(step(sparse, sparse_opt))) for _ in range(5)]
    np.testing.assert_allclose([a for a, _ in losses], [b for _, b in losses], rtol=1e-5)
    assert losses[-1][1] < losses[0][1]
    np.testing.assert_allclose(sparse_jax.decompress(sparse.kernel), dense.kernel[...], atol=1e-5)
    np.testing.assert_allclose(sparse.bias[...], dense.bias[...], atol=1e-5)


def test_transposable_sparse_linear_rejects_a_mask_that_is_not_2_4_both_ways():
    kernel = jax.random.normal(jax.random.key(0), (8, 8))
    with pytest.raises(ValueError, match="axis 1"):
        sparse_jax.nn.TransposableSparseLinear(kernel, mask=sparse_jax.nm_mask(kernel, axis=0))
    with pytest.raises(ValueError, match="multiples of 4"):
        sparse_jax.nn.TransposableSparseLinear(jnp.ones((8, 6)))


@pytest.mark.slow
def test_4096_square_kernel_takes_well_under_a_few_seconds():
    w = jax.random.normal(jax.random.key(0), (4096, 4096))
    jax.block_until_ready(sparse_jax.transposable_nm_mask(w))  # compile
    start = time.perf_counter()
    mask = jax.block_until_ready(sparse_jax.transposable_nm_mask(w))
    assert time.perf_counter() - start < 5.0  # loose: a shared CPU; see benchmarks/transposable.py
    assert bool(sparse_jax.is_transposable_nm(w * mask))

