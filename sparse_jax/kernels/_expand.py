"""Expanding one compressed tile to its dense rows, inside a kernel.

Written with broadcasts, reshapes, shifts and selects only (no gathers or
slices of values), so the same code lowers through Triton and runs in Pallas's
interpret modes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def expand_tile(values: jax.Array, meta: jax.Array, dtype) -> jax.Array:
    """Dense ``(block_k, block_n)`` tile from its compressed pieces.

    Args:
      values: ``(block_k // 2, block_n)`` kept values.
      meta: ``(block_k // 32, block_n)`` int32 words (the uint32 metadata,
        bitcast), 16 two-bit positions each; see ``sparse_jax._compressed``.
      dtype: dtype of the returned tile (the MMA's operand dtype).

    Returns:
      The ``(block_k, block_n)`` dense tile in ``dtype``.
    """
    half, block_n = values.shape
    words = meta.shape[0]
    groups = half // 2
    # Word w, nibble t, slot s holds the position of kept value 16w + 2t + s.
    nibble = lax.broadcasted_iota(jnp.int32, (1, 8, 2, 1), 1)
    slot = lax.broadcasted_iota(jnp.int32, (1, 8, 2, 1), 2)
    shifts = jnp.broadcast_to(4 * nibble + 2 * slot, (words, 8, 2, block_n))
    words4 = jnp.broadcast_to(meta.reshape(words, 1, 1, block_n), (words, 8, 2, block_n))
    positions = lax.shift_right_logical(words4, shifts) & 3
    positions = positions.reshape(groups, 2, 1, block_n)
    pairs = values.astype(dtype).reshape(groups, 2, 1, block_n)
    candidate = lax.broadcasted_iota(jnp.int32, (groups, 2, 4, block_n), 2)
    chosen = jnp.broadcast_to(positions, candidate.shape) == candidate
    spread = jnp.where(chosen, jnp.broadcast_to(pairs, candidate.shape), jnp.zeros((), dtype))
    # The two slots of a group hold different positions: at most one term is non-zero.
    dense = jnp.sum(spread, axis=1, dtype=dtype)
    return dense.reshape(4 * groups, block_n)
