"""sparse_jax.matmul: values vs float64 NumPy, batched x, transposed, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax
from sparse_jax import Sparse24, compress, matmul
from sparse_jax.kernels import Tiles

from _sparse_data import REL_TOL, as_f64, random_24, random_x, rel_err

SMALL_TILES = Tiles(16, 32, 16)


@pytest.mark.parametrize(
    "impl, dtype, x_shape",
    [
        ("reference", jnp.bfloat16, (2, 3, 64)),
        ("reference", jnp.float32, (1, 64)),
        ("pallas", jnp.bfloat16, (1, 64)),
        ("pallas", jnp.float16, (2, 3, 64)),
        ("pallas", jnp.float32, (2, 3, 64)),
    ],
)
def test_matmul_matches_numpy(impl, dtype, x_shape):
    key = jax.random.key(len(x_shape))
    w = random_24(key, (64, 48), dtype)
    x = random_x(jax.random.fold_in(key, 9), x_shape, dtype)
    tiles = SMALL_TILES if impl == "pallas" else None
    y = matmul(x, compress(w), impl=impl, tiles=tiles)
    assert y.shape == x_shape[:-1] + (48,) and y.dtype == dtype
    ref = as_f64(x) @ as_f64(w)
    assert rel_err(y, ref) < REL_TOL[dtype]


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_matmul_transposed_matches_numpy(impl):
    w = random_24(jax.random.key(4), (64, 48))
    g = random_x(jax.random.key(5), (2, 5, 48))
    y = matmul(g, compress(w), transpose=True, impl=impl, tiles=SMALL_TILES if impl == "pallas" else None)
    assert y.shape == (2, 5, 64)
    assert rel_err(y, as_f64(g) @ as_f64(w).T) < REL_TOL[jnp.float32]


def test_mosaic_impl_in_interpret_mode():
    w = random_24(jax.random.key(6), (64, 64), jnp.bfloat16)
    x = random_x(jax.random.key(7), (3, 64), jnp.bfloat16)
    y = matmul(x, compress(w), impl="mosaic", interpret=True, tiles=Tiles(64, 64, 64))
    assert rel_err(y, as_f64(x) @ as_f64(w)) < REL_TOL[jnp.bfloat16]


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("transpose", [False, True])
def test_gradients_match_masked_dense(impl, transpose):
    w = random_24(jax.random.key(8), (64, 32))
    s = compress(w)
    x = random_x(jax.random.key(9), (3, 32 if transpose else 64))
    tiles = SMALL_TILES if impl == "pallas" else None

    def sparse_loss(x, values):
        y = matmul(x, Sparse24(values, s.meta, s.shape, 0), transpose=transpose, impl=impl, tiles=tiles)
        return jnp.sum(jnp.sin(y))

    def dense_loss(x, w):
        return jnp.sum(jnp.sin(x @ (w.T if transpose else w)))

    gx, gvalues = jax.jit(jax.grad(sparse_loss, argnums=(0, 1)))(x, s.values)
    dx, dw = jax.grad(dense_loss, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(dx), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(gvalues), np.asarray(sparse_jax.gather_kept(dw, s)), rtol=1e-4, atol=1e-4
    )


def test_matmul_under_jit_and_vmap():
    w = random_24(jax.random.key(10), (32, 16))
    s = compress(w)
    xs = random_x(jax.random.key(11), (4, 2, 32))
    y = jax.jit(jax.vmap(lambda x: matmul(x, s)))(xs)
    assert rel_err(y, as_f64(xs) @ as_f64(w)) < 1e-5


def test_matmul_errors_name_shapes():
    s = compress(random_24(jax.random.key(12), (32, 16)))
    with pytest.raises(ValueError, match=r"x has shape \(2, 16\); expected \(\.\.\., 32\)"):
        matmul(jnp.ones((2, 16)), s)
    with pytest.raises(ValueError, match=r"compressed along axis 0.*\(8, 32\).*axis 1"):
        matmul(jnp.ones((2, 8)), compress(random_24(jax.random.key(13), (32, 8)).T, axis=1))
    with pytest.raises(TypeError, match="Sparse24"):
        matmul(jnp.ones((2, 32)), jnp.ones((32, 16)))
    with pytest.raises(ValueError, match="impl='cuda'"):
        matmul(jnp.ones((2, 32)), s, impl="cuda")
    with pytest.raises(NotImplementedError, match="transposed"):
        matmul(jnp.ones((2, 16), jnp.bfloat16), s, transpose=True, impl="mosaic", interpret=True)
