"""Pallas kernels (interpret mode on CPU) against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import sparse_jax
from sparse_jax.kernels import (
    Tiles,
    choose_tiles,
    expand_phase_major,
    permute_k,
    unpermute_k,
    sparse24_matmul_mosaic,
    sparse24_matmul_pallas,
)

from _sparse_data import REL_TOL, as_f64, random_24, random_x, rel_err


def test_expand_phase_major_equals_permuted_decompress():
    w = random_24(jax.random.key(0), (64, 16))
    s = sparse_jax.compress(w)
    pairs = s.values.reshape(16, 2, 16)
    meta = jax.lax.bitcast_convert_type(s.meta, jnp.int32)
    dense = expand_phase_major(pairs[:, 0], pairs[:, 1], meta, jnp.float32)
    # Row p * 16 + g holds dense row 4g + p.
    expected = np.asarray(w).reshape(16, 4, 16).transpose(1, 0, 2).reshape(64, 16)
    np.testing.assert_array_equal(np.asarray(dense), expected)


def test_permute_k_round_trip_and_product():
    x = random_x(jax.random.key(1), (3, 128))
    w = random_x(jax.random.key(2), (128, 5))
    xp = permute_k(x, 64)
    np.testing.assert_array_equal(np.asarray(unpermute_k(xp, 64)), np.asarray(x))
    # Permuting W's rows the same way keeps the product.
    wp = permute_k(w.T, 64).T
    np.testing.assert_allclose(np.asarray(xp @ wp), np.asarray(x @ w), rtol=1e-5, atol=1e-5)


def test_interpret_mode_poisons_unwritten_output():
    """The NaN poison our finiteness checks rely on: a tile nobody writes stays NaN."""

    def write_first_tile_only(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    out = pl.pallas_call(
        write_first_tile_only,
        grid=(2,),
        in_specs=[pl.BlockSpec((8, 8), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 8), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((16, 8), jnp.float32),
        interpret=True,
    )(jnp.ones((16, 8)))
    assert np.isfinite(np.asarray(out[:8])).all() and np.isnan(np.asarray(out[8:])).all()


# (M, K, N, tiles): M=1, ragged M, K not a multiple of the tile (padded), N ragged.
NN_CASES = [
    (1, 64, 32, Tiles(16, 32, 16)),
    (37, 96, 48, Tiles(16, 64, 32)),
    (16, 128, 64, Tiles(16, 64, 64)),
    (20, 44, 16, None),
]


@pytest.mark.parametrize("m, k, n, tiles", NN_CASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_portable_kernel_matches_numpy(m, k, n, tiles, dtype):
    key = jax.random.key(m * 1000 + k + n)
    w = random_24(key, (k, n), dtype)
    x = random_x(jax.random.fold_in(key, 7), (m, k), dtype)
    s = sparse_jax.compress(w)
    y = sparse24_matmul_pallas(x, s.values, s.meta, k_dense=k, tiles=tiles, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, as_f64(x) @ as_f64(w)) < REL_TOL[dtype]


@pytest.mark.parametrize("m, k, n, tiles", [(1, 64, 32, Tiles(16, 32, 16)), (21, 96, 40, Tiles(16, 64, 16))])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_portable_kernel_transposed_matches_numpy(m, k, n, tiles, dtype):
    key = jax.random.key(m + k + n)
    w = random_24(key, (k, n), dtype)
    g = random_x(jax.random.fold_in(key, 3), (m, n), dtype)
    s = sparse_jax.compress(w)
    y = sparse24_matmul_pallas(g, s.values, s.meta, k_dense=k, transpose=True, tiles=tiles, interpret=True)
    assert y.shape == (m, k)
    assert rel_err(y, as_f64(g) @ as_f64(w).T) < REL_TOL[dtype]


@pytest.mark.parametrize(
    "m, k, n, dtype, tiles",
    [
        pytest.param(70, 256, 128, jnp.bfloat16, Tiles(64, 128, 64), marks=pytest.mark.slow),
        (1, 96, 64, jnp.float16, Tiles(64, 64, 64)),
    ],
)
def test_mosaic_kernel_matches_numpy(m, k, n, dtype, tiles):
    key = jax.random.key(m + 2 * k + n)
    w = random_24(key, (k, n), dtype)
    x = random_x(jax.random.fold_in(key, 5), (m, k), dtype)
    s = sparse_jax.compress(w)
    y = sparse24_matmul_mosaic(x, s.values, s.meta, k_dense=k, tiles=tiles, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, as_f64(x) @ as_f64(w)) < REL_TOL[dtype]


def test_mosaic_kernel_rejects_float32():
    s = sparse_jax.compress(random_24(jax.random.key(1), (64, 64)))
    with pytest.raises(NotImplementedError, match="bf16 or f16"):
        sparse24_matmul_mosaic(jnp.ones((2, 64)), s.values, s.meta, k_dense=64, interpret=True)


def test_mosaic_kernel_lowers_for_hopper():
    """Mosaic GPU's lowering (layouts, shared-memory budget) runs without a GPU."""
    s = sparse_jax.compress(random_24(jax.random.key(3), (256, 256), jnp.bfloat16))
    x = jnp.ones((8, 256), jnp.bfloat16)
    for tiles in (Tiles(64, 128, 128), Tiles(128, 128, 128), Tiles(64, 128, 64)):
        fn = jax.jit(lambda x, v, m, tiles=tiles: sparse24_matmul_mosaic(x, v, m, k_dense=256, tiles=tiles))
        fn.trace(x, s.values, s.meta).lower(lowering_platforms=("cuda",))
    with pytest.raises(ValueError, match="block_n=32 .* at least 128 bytes"):
        sparse24_matmul_mosaic(x, s.values, s.meta, k_dense=256, tiles=Tiles(64, 128, 32))


def test_kernel_shape_errors_name_shapes():
    s = sparse_jax.compress(random_24(jax.random.key(2), (64, 32)))
    with pytest.raises(ValueError, match=r"x has shape \(2, 48\).*K \(rows of W\) = 64"):
        sparse24_matmul_pallas(jnp.ones((2, 48)), s.values, s.meta, k_dense=64, interpret=True)
    with pytest.raises(ValueError, match="block_k=48"):
        sparse24_matmul_pallas(
            jnp.ones((2, 64)), s.values, s.meta, k_dense=64, tiles=Tiles(16, 48, 16), interpret=True
        )


def test_choose_tiles_divides_benchmark_shapes():
    for m in (1, 16, 4096):
        for k, n in ((4096, 14336), (14336, 4096)):
            tiles = choose_tiles(m, k, n)
            tiles.check()
            assert k % tiles.block_k == 0 and n % tiles.block_n == 0
    assert choose_tiles(1, 4096, 4096).block_m == 16  # decode: the smallest MMA tile


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas", "mosaic"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m, k, n", [(37, 512, 384), (1, 1024, 512), (130, 256, 200)])
def test_kernels_on_gpu(impl, dtype, m, k, n):
    key = jax.random.key(m + k + n)
    w = random_24(key, (k, n), dtype)
    x = random_x(jax.random.fold_in(key, 1), (m, k), dtype)
    y = sparse_jax.matmul(x, sparse_jax.compress(w), impl=impl, interpret=False)
    assert rel_err(y, as_f64(x) @ as_f64(w)) < REL_TOL[dtype]


@pytest.mark.gpu
def test_transposed_kernel_on_gpu():
    w = random_24(jax.random.key(21), (512, 384), jnp.bfloat16)
    g = random_x(jax.random.key(22), (37, 384), jnp.bfloat16)
    y = sparse_jax.matmul(g, sparse_jax.compress(w), transpose=True, impl="pallas", interpret=False)
    assert rel_err(y, as_f64(g) @ as_f64(w).T) < REL_TOL[jnp.bfloat16]
