"""N:M patterns on single arrays: the mask that keeps the N largest of every M.

A tensor is N:M sparse along ``axis`` when every contiguous group of ``m``
entries along that axis has at most ``n`` non-zeros. Sparse Tensor Cores need
2:4 along the reduction (input) dimension of a matmul, so for a Flax ``Dense``
kernel ``(in, out)`` that is axis 0 and for a ``Conv`` kernel
``(H, W, in, out)`` axis -2. The default ``axis=-2`` covers both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Above this group size the pairwise comparison (m*m per group) costs more than a sort.
_PAIRWISE_MAX_M = 16


def normalize_axis(axis: int, ndim: int, *, where: str = "") -> int:
    """Returns ``axis`` as a non-negative index, or raises naming ``where``."""
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{where}axis {axis} is out of range for a {ndim}-d array"
        )
    return axis % ndim


def check_nm_args(
    shape: tuple[int, ...], n: int, m: int, axis: int, *, where: str = ""
) -> int:
    """Validates an N:M request for an array of ``shape``; returns the axis >= 0.

    Args:
      shape: the array's shape.
      n: entries kept per group.
      m: group size.
      axis: the axis the groups run along.
      where: a prefix for error messages, e.g. ``"params/dense/kernel (64, 10): "``.
    """
    if not isinstance(n, (int, np.integer)) or not isinstance(m, (int, np.integer)):
        raise TypeError(f"{where}n and m must be integers, got n={n!r}, m={m!r}")
    if m < 1 or n < 0:
        raise ValueError(f"{where}need m >= 1 and n >= 0, got n={n}, m={m}")
    if n > m:
        raise ValueError(f"{where}n={n} is larger than m={m}: cannot keep {n} of {m}")
    if len(shape) == 0:
        raise ValueError(f"{where}a scalar has no axis to group along")
    axis = normalize_axis(axis, len(shape), where=where)
    if shape[axis] % m:
        raise ValueError(
            f"{where}axis {axis} has size {shape[axis]}, which is not a multiple "
            f"of m={m}; groups of {m} must tile it exactly"
        )
    return axis


def _grouped_shape(shape: tuple[int, ...], m: int, axis: int) -> tuple[int, ...]:
    return shape[:axis] + (shape[axis] // m, m) + shape[axis + 1 :]


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def _nm_mask(x: jax.Array, *, n: int, m: int, axis: int) -> jax.Array:
    magnitude = jnp.abs(x)
    # NaN compares false with everything; rank it as the largest so it is kept
    # (and shows up) rather than silently dropping a finite weight instead.
    magnitude = jnp.where(jnp.isnan(magnitude), jnp.inf, magnitude)
    grouped = magnitude.reshape(_grouped_shape(x.shape, m, axis))
    slot_axis = axis + 1
    if m <= _PAIRWISE_MAX_M:
        slots = [jax.lax.index_in_dim(grouped, i, slot_axis) for i in range(m)]
        keep = []
        for i, slot in enumerate(slots):
            # rank = how many entries beat this one; earlier entries win ties.
            rank = sum(
                (other > slot) if j > i else (other >= slot)
                for j, other in enumerate(slots)
                if j != i
            )
            keep.append(rank < n)
        mask = jnp.concatenate(keep, axis=slot_axis)
    else:
        order = jnp.argsort(-grouped, axis=slot_axis, stable=True)
        rank = jnp.argsort(order, axis=slot_axis, stable=True)
        mask = rank < n
    return mask.reshape(x.shape)


def nm_mask(x: jax.Array, n: int = 2, m: int = 4, axis: int = -2) -> jax.Array:
    """Boolean mask keeping the ``n`` largest magnitudes in each group of ``m``.

    Groups are contiguous runs of ``m`` entries along ``axis``. Ties are broken
    deterministically in favour of the lower index; NaNs count as the largest.

    Args:
      x: a floating-point array.
      n: entries kept per group.
      m: group size; must divide ``x.shape[axis]``.
      axis: the reduction axis. The default, -2, is the input axis of both a
        Flax ``Dense`` kernel ``(in, out)`` and a ``Conv`` kernel
        ``(..., in, out)``.

    Returns:
      A bool array of ``x``'s shape with exactly ``n`` True per group.

    Example:
      >>> import jax.numpy as jnp, sparse_jax
      >>> w = jnp.array([[0.1], [-3.0], [2.0], [0.5]])
      >>> sparse_jax.nm_mask(w, 2, 4, axis=0).ravel().tolist()
      [False, True, True, False]
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"nm_mask needs a floating-point array, got dtype {x.dtype} "
            f"with shape {x.shape}"
        )
    axis = check_nm_args(x.shape, n, m, axis)
    return _nm_mask(x, n=int(n), m=int(m), axis=axis)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def _violations(x: jax.Array, *, n: int, m: int, axis: int) -> jax.Array:
    nonzero = (x != 0).reshape(_grouped_shape(x.shape, m, axis))
    per_group = jnp.sum(nonzero, axis=axis + 1, dtype=jnp.int32)
    return jnp.sum(per_group > n, dtype=jnp.int32)


def nm_violations(x: jax.Array, n: int = 2, m: int = 4, axis: int = -2) -> jax.Array:
    """Number of groups of ``m`` along ``axis`` with more than ``n`` non-zeros."""
    x = jnp.asarray(x)
    axis = check_nm_args(x.shape, n, m, axis)
    return _violations(x, n=int(n), m=int(m), axis=axis)


def is_nm_sparse(x: jax.Array, n: int = 2, m: int = 4, axis: int = -2) -> jax.Array:
    """Whether every group of ``m`` along ``axis`` has at most ``n`` non-zeros.

    Returns a scalar bool array (so it also works under ``jit``); ``bool()`` it
    for a Python bool.

    Example:
      >>> import jax.numpy as jnp, sparse_jax
      >>> bool(sparse_jax.is_nm_sparse(jnp.array([[1.0], [0.0], [0.0], [2.0]]), axis=0))
      True
    """
    return nm_violations(x, n, m, axis) == 0
