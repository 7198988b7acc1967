"""Expanding one compressed tile to dense rows inside a kernel, K-permuted.

The expansion is elementwise (shifts, compares, selects) plus broadcasts and
reshapes, so it lowers through Triton and runs in Pallas's interpreter. It
writes the dense rows *phase-major*: dense row ``4g + p`` (group ``g``,
position ``p``) of the tile lands at row ``p * G + g`` (``G`` groups per
tile), which needs no interleaving of values. Callers permute the columns of
the other operand the same way (`permute_k`), leaving the product unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

GROUPS_PER_WORD = 8


def expand_phase_major(lo: jax.Array, hi: jax.Array, words: jax.Array, dtype) -> jax.Array:
    """Dense ``(4 * G, block_n)`` tile, phase-major, from its compressed pieces.

    Args:
      lo: ``(G, block_n)``: the lower-position kept value of each group
        (rows ``2g`` of ``Sparse24.values``).
      hi: ``(G, block_n)``: the higher-position kept value (rows ``2g + 1``).
      words: ``(G / 8, block_n)`` int32, the metadata words (uint32 bitcast).
      dtype: dtype of the returned tile.

    Returns:
      ``(4 * G, block_n)`` with row ``p * G + g`` = dense row ``4g + p``.

    Example (8 groups, one column; `permute_k` of the dense rows is the same tile):
      >>> import jax, jax.numpy as jnp, numpy as np, sparse_jax
      >>> from sparse_jax.kernels import expand_phase_major, permute_k
      >>> w = sparse_jax.prune({"w": jax.random.normal(jax.random.key(0), (32, 1))})[0]["w"]
      >>> s = sparse_jax.compress(w, axis=0)
      >>> words = jax.lax.bitcast_convert_type(s.meta, jnp.int32)
      >>> tile = expand_phase_major(s.values[0::2], s.values[1::2], words, jnp.float32)
      >>> bool(np.array_equal(tile, permute_k(w.T, 32).T))
      True
    """
    groups, block_n = lo.shape
    word_rows = words.shape[0]
    expanded = (word_rows, GROUPS_PER_WORD, block_n)
    # Group g reads word g // 8, nibble g % 8: low 2 bits lo's position, high 2 hi's.
    word_per_group = jnp.broadcast_to(words.reshape(word_rows, 1, block_n), expanded)
    shift = jnp.broadcast_to(4 * lax.broadcasted_iota(jnp.int32, (1, GROUPS_PER_WORD, 1), 1), expanded)
    word_per_group = word_per_group.reshape(groups, block_n)
    shift = shift.reshape(groups, block_n)
    lo_at = lax.shift_right_logical(word_per_group, shift) & 3
    hi_at = lax.shift_right_logical(word_per_group, shift + 2) & 3
    shape = (4, groups, block_n)
    position = lax.broadcasted_iota(jnp.int32, shape, 0)
    zero = jnp.zeros(shape, dtype)
    dense = jnp.where(
        jnp.broadcast_to(lo_at.reshape(1, groups, block_n), shape) == position,
        jnp.broadcast_to(lo.astype(dtype).reshape(1, groups, block_n), shape),
        jnp.where(
            jnp.broadcast_to(hi_at.reshape(1, groups, block_n), shape) == position,
            jnp.broadcast_to(hi.astype(dtype).reshape(1, groups, block_n), shape),
            zero,
        ),
    )
    return dense.reshape(4 * groups, block_n)


def permute_k(x: jax.Array, block_k: int) -> jax.Array:
    """Columns of ``x`` (``(M, K)``, ``K`` a multiple of ``block_k``) in phase-major order
    per ``block_k`` tile: column ``4g + p`` of a tile moves to ``p * block_k/4 + g``.

    Example:
      >>> import jax.numpy as jnp
      >>> from sparse_jax.kernels import permute_k, unpermute_k
      >>> x = jnp.arange(8.0).reshape(1, 8)
      >>> permute_k(x, 8).astype(int).tolist(), bool((unpermute_k(permute_k(x, 8), 8) == x).all())
      ([[0, 4, 1, 5, 2, 6, 3, 7]], True)
    """
    m, k = x.shape
    return x.reshape(m, k // block_k, block_k // 4, 4).swapaxes(2, 3).reshape(m, k)


def unpermute_k(y: jax.Array, block_k: int) -> jax.Array:
    """Inverse of `permute_k`."""
    m, k = y.shape
    return y.reshape(m, k // block_k, 4, block_k // 4).swapaxes(2, 3).reshape(m, k)
