"""Bit-packing of boolean masks: 8 mask entries per uint8.

A mask of 2 or more dimensions is packed along its second-to-last axis: bit
``r % 8`` of byte row ``r // 8`` holds row ``r`` (little-endian). Rows, not the
last axis, so that unpacking inside an optimizer step reads one byte row per 8
rows and the innermost, contiguous axis stays a plain vectorizable loop; every
other axis keeps its size, so the packed array can carry the parameter's
sharding. 1-D masks are packed along their only axis. An axis that is not a
multiple of 8 is padded with zeros, so the cost is exactly one bit per weight
when it is, and at most ``ceil(d / 8) * 8 / d`` bits otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BIT_WEIGHTS = tuple(1 << i for i in range(8))


def _packed_axis(ndim: int) -> int:
    return ndim - 2 if ndim >= 2 else 0


def _bit_weights(ndim: int, axis: int) -> jax.Array:
    """The 8 bit values along axis ``axis + 1`` of an ``ndim``-d array of ones."""
    shape = [1] * ndim
    shape[axis + 1] = 8
    return jnp.asarray(_BIT_WEIGHTS, dtype=jnp.uint8).reshape(shape)


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of ``pack_bits`` applied to a mask of ``shape``."""
    if not shape:
        return (1,)
    axis = _packed_axis(len(shape))
    return shape[:axis] + (-(-shape[axis] // 8),) + shape[axis + 1 :]


def pack_bits(mask: jax.Array) -> jax.Array:
    """Packs a bool array into uint8, 8 entries a byte (see the module docstring)."""
    mask = jnp.asarray(mask, dtype=jnp.bool_)
    if mask.ndim == 0:
        mask = mask[None]
    axis = _packed_axis(mask.ndim)
    size = mask.shape[axis]
    padded = -(-size // 8) * 8
    if padded != size:
        pad = [(0, 0)] * mask.ndim
        pad[axis] = (0, padded - size)
        mask = jnp.pad(mask, pad)
    bits = mask.reshape(mask.shape[:axis] + (padded // 8, 8) + mask.shape[axis + 1 :])
    weighted = bits.astype(jnp.uint8) * _bit_weights(bits.ndim, axis)
    return jnp.sum(weighted, axis=axis + 1, dtype=jnp.uint8)


def unpack_bits(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `pack_bits`: the bool array of ``shape`` that was packed."""
    axis = _packed_axis(packed.ndim)
    expanded = jnp.expand_dims(packed, axis + 1)
    bits = (expanded & _bit_weights(expanded.ndim, axis)) != 0
    rows = bits.reshape(packed.shape[:axis] + (packed.shape[axis] * 8,) + packed.shape[axis + 1 :])
    size = shape[axis] if shape else 1
    return jax.lax.slice_in_dim(rows, 0, size, axis=axis).reshape(shape)
