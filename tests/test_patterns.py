"""nm_mask / is_nm_sparse against an independent NumPy reference."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_jax

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 2), (3, 4)]


def reference_mask(x: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keeps the n largest |x| per group of m along axis; ties go to the lower index."""
    moved = np.moveaxis(np.abs(x.astype(np.float64)), axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
    groups = np.where(np.isnan(groups), np.inf, groups)
    order = np.argsort(-groups, axis=-1, kind="stable")  # stable: lower index wins ties
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


@st.composite
def nm_cases(draw):
    n, m = draw(st.sampled_from(PATTERNS))
    ndim = draw(st.integers(1, 4))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
    shape[axis] = m * draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    seed = draw(st.integers(0, 2**31 - 1))
    # Small integers make ties common, so the tie-break rule is exercised too.
    ties = draw(st.booleans())
    return n, m, axis, tuple(shape), dtype, seed, ties


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(nm_cases())
def test_nm_mask_matches_numpy_reference(case):
    n, m, axis, shape, dtype, seed, ties = case
    rng = np.random.default_rng(seed)
    values = rng.integers(-3, 4, shape) if ties else rng.standard_normal(shape)
    x = values.astype(DTYPES[dtype])
    mask = np.asarray(sparse_jax.nm_mask(jnp.asarray(x), n, m, axis))
    np.testing.assert_array_equal(mask, reference_mask(x, n, m, axis))
    kept_per_group = np.moveaxis(mask, axis, -1).reshape(-1, m).sum(-1)
    assert (kept_per_group == n).all()


def test_hand_worked_example_with_ties():
    # Columns are groups along axis 0; the tie in column 1 goes to the lower rows.
    w = jnp.array(
        [[0.1, 1.0, -5.0],
         [-3.0, 1.0, 0.0],
         [2.0, 1.0, 0.0],
         [0.5, 1.0, 4.0]]
    )
    expected = np.array(
        [[False, True, True],
         [True, True, False],
         [True, False, False],
         [False, False, True]]
    )
    np.testing.assert_array_equal(np.asarray(sparse_jax.nm_mask(w, 2, 4, axis=0)), expected)


def test_nan_counts_as_largest():
    w = jnp.array([1.0, jnp.nan, 3.0, 2.0])
    assert np.asarray(sparse_jax.nm_mask(w, 2, 4, axis=0)).tolist() == [False, True, True, False]


def test_large_m_uses_sort_path_and_matches_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(-5, 6, (64, 3)).astype(np.float32)
    got = np.asarray(sparse_jax.nm_mask(jnp.asarray(x), 8, 32, axis=0))
    np.testing.assert_array_equal(got, reference_mask(x, 8, 32, 0))


def test_is_nm_sparse_and_violations():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    x = x * reference_mask(x, 2, 4, 0)
    assert bool(sparse_jax.is_nm_sparse(x, 2, 4, axis=0))
    assert not bool(sparse_jax.is_nm_sparse(x, 1, 4, axis=0))
    x[0, 0] = x[1, 0] = x[2, 0] = 1.0  # one group now has 3 non-zeros
    assert int(sparse_jax.nm_violations(x, 2, 4, axis=0)) == 1
    assert not bool(sparse_jax.is_nm_sparse(x, 2, 4, axis=0))
    # A dense tensor is not 2:4 along axis 1 either (6 is not a multiple of 4).
    with pytest.raises(ValueError, match="size 6.*not a multiple of m=4"):
        sparse_jax.is_nm_sparse(x, 2, 4, axis=1)


def test_default_axis_is_the_input_axis_of_dense_and_conv():
    rng = np.random.default_rng(2)
    dense = rng.standard_normal((8, 3)).astype(np.float32)
    conv = rng.standard_normal((3, 3, 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(sparse_jax.nm_mask(dense), reference_mask(dense, 2, 4, 0))
    np.testing.assert_array_equal(sparse_jax.nm_mask(conv), reference_mask(conv, 2, 4, 2))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n=5, m=4), ValueError, "n=5 is larger than m=4"),
        (dict(n=2, m=4, axis=1), ValueError, "size 6, which is not a multiple of m=4"),
        (dict(n=2, m=4, axis=3), ValueError, "out of range"),
        (dict(n=2.0, m=4), TypeError, "must be integers"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        sparse_jax.nm_mask(jnp.ones((8, 6)), **kwargs)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="floating-point.*int32"):
        sparse_jax.nm_mask(jnp.ones((8, 4), dtype=jnp.int32))
