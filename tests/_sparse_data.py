"""Shared test data for the compressed-format tests: random 2:4 weights, float64 references."""

import jax
import jax.numpy as jnp
import numpy as np

import sparse_jax

# Relative Frobenius error allowed per operand dtype (float32 accumulation;
# the output is rounded to the operand dtype).
REL_TOL = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}


def random_24(key, shape, dtype=jnp.float32):
    """(K, N) weight, 2:4 along axis 0, kept entries of magnitude >= 0.5 (never zero)."""
    magnitude = jnp.abs(jax.random.normal(key, shape)) + 0.5
    sign = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, shape), 1.0, -1.0)
    w = (magnitude * sign).astype(dtype)
    return w * sparse_jax.nm_mask(w, axis=0).astype(dtype)


def random_x(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape).astype(dtype)


def as_f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def rel_err(y, ref) -> float:
    y = as_f64(y)
    assert np.isfinite(y).all(), "output has NaN/inf: an unwritten (poisoned) tile?"
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
