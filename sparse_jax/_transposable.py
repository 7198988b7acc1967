"""Transposable N:M masks: N:M along both axes of every m x m block.

A kernel ``W`` of shape ``(in, out)`` that is 2:4 along ``in`` lets sparse
tensor cores run the forward product ``x @ W``; the backward product
``dY @ W.T`` reduces over ``out`` and needs 2:4 along ``out`` too. Hubara et
al. (NeurIPS 2021, "Accelerated Sparse Neural Training") call a mask with
``n`` kept per row *and* per column of every ``m x m`` block *transposable*.

For ``m <= 4`` the mask is exact: every valid ``m x m`` pattern is enumerated
(90 for 2:4, 24 for 1:4 and 3:4) and each block takes the pattern keeping the
largest total magnitude, by one small matmul of the block magnitudes with the
pattern table. For larger ``m`` (2:8, 4:8, ...) it is the paper's greedy
(entries in decreasing magnitude, kept while their row and column have fewer
than ``n``), which may keep fewer than ``n`` in a few rows or columns.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _patterns

# Above this group size enumeration is hopeless (8x8 with 4 per row and column
# has ~10^14 patterns): use the greedy.
_EXACT_MAX_M = 4
METHODS = ("auto", "exact", "greedy")


@functools.lru_cache(maxsize=None)
def _pattern_rows(n: int, m: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """(row choices, patterns): the ``n``-subsets of a row, and every block
    pattern as the index of each of its ``m`` rows' subset, such that every
    column gets exactly ``n``."""
    choices = tuple(itertools.combinations(range(m), n))
    patterns = []
    for rows in itertools.product(range(len(choices)), repeat=m):
        per_column = np.zeros(m, int)
        for row in rows:
            per_column[list(choices[row])] += 1
        if (per_column == n).all():
            patterns.append(rows)
    return choices, tuple(patterns)


def block_patterns(n: int, m: int) -> np.ndarray:
    """All ``m x m`` 0/1 patterns with exactly ``n`` ones per row and per column.

    Returns:
      ``(count, m * m)`` bool, row-major blocks (90 patterns for 2:4).
    """
    choices, patterns = _pattern_rows(n, m)
    table = np.zeros((len(patterns), m, m), bool)
    for k, rows in enumerate(patterns):
        for i, row in enumerate(rows):
            table[k, i, list(choices[row])] = True
    return table.reshape(len(patterns), m * m)


def _to_blocks(x: jax.Array, m: int, axes: tuple[int, int]) -> tuple[jax.Array, tuple]:
    """``(blocks, m * m)`` row-major blocks over ``axes`` (rows along axes[0])."""
    moved = jnp.moveaxis(x, axes, (-2, -1))
    rows, cols = moved.shape[-2:]
    lead = moved.shape[:-2]
    grid = moved.reshape(lead + (rows // m, m, cols // m, m))
    grid = jnp.swapaxes(grid, -3, -2)  # (..., rows/m, cols/m, m, m)
    return grid.reshape(-1, m * m), moved.shape


def _from_blocks(blocks: jax.Array, m: int, axes: tuple[int, int], moved_shape) -> jax.Array:
    lead, (rows, cols) = moved_shape[:-2], moved_shape[-2:]
    grid = blocks.reshape(lead + (rows // m, cols // m, m, m))
    grid = jnp.swapaxes(grid, -3, -2).reshape(moved_shape)
    return jnp.moveaxis(grid, (-2, -1), axes)


def _magnitude(x: jax.Array) -> jax.Array:
    magnitude = jnp.abs(x).astype(jnp.float32)
    # NaN ranks highest (as in nm_mask), so it stays visible.
    return jnp.where(jnp.isnan(magnitude), jnp.inf, magnitude)


_CHUNK = 16384  # blocks per pass of the pattern search: its arrays stay in cache


def _exact_blocks(magnitude: jax.Array, n: int, m: int) -> jax.Array:
    choices, patterns = _pattern_rows(n, m)
    count = magnitude.shape[0]
    chunk = min(_CHUNK, count)
    padded = -(-count // chunk) * chunk
    rows = jnp.pad(magnitude, ((0, padded - count), (0, 0))).reshape(padded, m, m)
    # Kept magnitude of each row subset: (chunks, m * subsets, chunk).
    row_kept = jnp.stack([sum(rows[:, :, j] for j in choice) for choice in choices], axis=-1)
    row_kept = row_kept.reshape(padded // chunk, chunk, m * len(choices)).transpose(0, 2, 1)
    # Pattern k keeps, in row i, the subset at flat index table[k, i].
    table = jnp.asarray(
        np.asarray(patterns) + len(choices) * np.arange(m)[None, :], jnp.int32
    )

    def search(terms):  # terms: (m * subsets, chunk) -> index of the best pattern
        def visit(k, carry):
            best, best_index = carry
            kept = sum(terms[table[k, i]] for i in range(m))
            better = kept > best  # strict: ties go to the first pattern
            return jnp.where(better, kept, best), jnp.where(better, k, best_index)

        start = (jnp.full((chunk,), -1.0, jnp.float32), jnp.zeros((chunk,), jnp.int32))
        # A loop, not an unrolled chain: XLA would duplicate the chain's
        # shared terms into each of the two outputs, exponentially.
        return jax.lax.fori_loop(0, len(patterns), visit, start)[1]

    best_index = jax.lax.map(search, row_kept).reshape(padded)[:count]
    return jnp.asarray(block_patterns(n, m))[best_index]


def _greedy_blocks(magnitude: jax.Array, n: int, m: int) -> jax.Array:
    count = magnitude.shape[0]
    order = jnp.argsort(-magnitude, axis=1, stable=True)

    def visit(step, carry):
        row_kept, col_kept, mask = carry
        entry = order[:, step]
        row, col = entry // m, entry % m
        free = (jnp.take_along_axis(row_kept, row[:, None], 1)[:, 0] < n) & (
            jnp.take_along_axis(col_kept, col[:, None], 1)[:, 0] < n
        )
        row_kept = row_kept + (jax.nn.one_hot(row, m, dtype=jnp.int32) * free[:, None])
        col_kept = col_kept + (jax.nn.one_hot(col, m, dtype=jnp.int32) * free[:, None])
        mask = mask | (jax.nn.one_hot(entry, m * m, dtype=jnp.bool_) & free[:, None])
        return row_kept, col_kept, mask

    start = (
        jnp.zeros((count, m), jnp.int32),
        jnp.zeros((count, m), jnp.int32),
        jnp.zeros((count, m * m), jnp.bool_),
    )
    return jax.lax.fori_loop(0, m * m, visit, start)[2]


@functools.partial(jax.jit, static_argnames=("n", "m", "axes", "method"))
def _transposable_mask(x: jax.Array, *, n: int, m: int, axes: tuple[int, int], method: str):
    blocks, moved_shape = _to_blocks(_magnitude(x), m, axes)
    if method == "exact":
        kept = _exact_blocks(blocks, n, m)
    else:
        kept = _greedy_blocks(blocks, n, m)
    return _from_blocks(kept, m, axes, moved_shape)


def check_block_axes(
    shape: tuple[int, ...], n: int, m: int, axes, *, where: str = ""
) -> tuple[int, int]:
    """Validates a transposable request; returns the two block axes, non-negative."""
    if len(shape) < 2:
        raise ValueError(f"{where}a transposable mask needs at least 2 dims, got shape {shape}")
    if not (isinstance(axes, (tuple, list)) and len(axes) == 2):
        raise ValueError(f"{where}axes must be a pair of axes, got {axes!r}")
    first = _patterns.check_nm_args(shape, n, m, axes[0], where=where)
    second = _patterns.check_nm_args(shape, n, m, axes[1], where=where)
    if first == second:
        raise ValueError(f"{where}axes {tuple(axes)} name the same axis twice")
    return first, second


def transposable_nm_mask(
    w: jax.Array,
    n: int = 2,
    m: int = 4,
    axes: tuple[int, int] = (-2, -1),
    *,
    method: str = "auto",
) -> jax.Array:
    """Mask keeping ``n`` per row and per column of every ``m x m`` block.

    The blocks tile the two ``axes`` (by default the last two: ``(in, out)``
    of a Dense kernel, of a Conv kernel ``(h, w, in, out)`` and of stacked
    kernels ``(layers, in, out)``); every index of the other axes is a separate
    matrix. The mask is N:M along both axes, so the kernel can be compressed
    along either (`sparse_jax.compress` with ``axis=0`` for ``x @ W``,
    ``axis=1`` for ``dY @ W.T``).

    Args:
      w: a floating-point array with at least 2 dims.
      n: kept entries per row and per column of a block.
      m: block size; must divide both axes.
      axes: the two axes the blocks span.
      method: ``"exact"`` (enumerate every valid block pattern and keep the
        one with the largest kept magnitude; ``m <= 4``), ``"greedy"`` (the
        paper's greedy: may keep fewer than ``n`` in some rows or columns) or
        ``"auto"`` (exact up to ``m = 4``, greedy above).

    Returns:
      A bool array of ``w``'s shape, N:M along both ``axes``.

    Example:
      >>> import jax.numpy as jnp, sparse_jax
      >>> w = jnp.array([[9., 8., 1., 1.], [9., 8., 1., 1.], [1., 1., 9., 8.], [1., 1., 9., 8.]])
      >>> sparse_jax.transposable_nm_mask(w).astype(int).tolist()
      [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"transposable_nm_mask needs a floating-point array, got dtype {w.dtype} "
            f"with shape {w.shape}"
        )
    if method not in METHODS:
        raise ValueError(f"transposable_nm_mask: method={method!r}; expected one of {METHODS}")
    axes = check_block_axes(w.shape, n, m, axes)
    if method == "auto":
        method = "exact" if m <= _EXACT_MAX_M else "greedy"
    if method == "exact" and m > _EXACT_MAX_M:
        raise ValueError(
            f"transposable_nm_mask: method='exact' enumerates block patterns, which is "
            f"only feasible for m <= {_EXACT_MAX_M}, got m={m}; use method='greedy'"
        )
    return _transposable_mask(w, n=int(n), m=int(m), axes=axes, method=method)


def is_transposable_nm(x: jax.Array, n: int = 2, m: int = 4, axes: tuple[int, int] = (-2, -1)) -> jax.Array:
    """Whether ``x`` has at most ``n`` non-zeros per row and column of every ``m x m`` block.

    Example:
      >>> import jax, sparse_jax
      >>> w = jax.random.normal(jax.random.key(0), (8, 8))
      >>> bool(sparse_jax.is_transposable_nm(w * sparse_jax.transposable_nm_mask(w)))
      True
    """
    x = jnp.asarray(x)
    first, second = check_block_axes(x.shape, n, m, axes)
    return _patterns.is_nm_sparse(x, n, m, first) & _patterns.is_nm_sparse(x, n, m, second)


def block_axes_for(shape: tuple[int, ...], axis: int, stacked_axes: tuple[int, ...], m: int):
    """The (in, out) axes of a leaf pruned along ``axis``, or None if it has no such pair.

    A leaf with two non-stacked axes (a Dense kernel, stacked or not) pairs
    them; a Conv-like leaf reduced along its second-to-last non-stacked axis
    pairs it with the last (``(h, w, in, out)``). Both sizes must be
    multiples of ``m``.
    """
    free = [a for a in range(len(shape)) if a not in stacked_axes]
    if len(free) == 2:
        pair = (axis, free[1] if axis == free[0] else free[0])
    elif len(free) > 2 and axis == free[-2]:
        pair = (axis, free[-1])
    else:
        return None
    if shape[pair[1]] % m:
        return None
    return pair
