"""Bit-packing of boolean masks: 8 mask entries per uint8 along the last axis.

Packing along the last axis keeps every other axis of the mask intact, so the
packed array can carry the parameter's sharding on those axes. Entry ``j`` of
the last axis is bit ``j % 8`` (little-endian) of byte ``j // 8``; a last axis
that is not a multiple of 8 is padded with zeros, so the cost is exactly one bit
per weight when it is, and at most ``ceil(d / 8) * 8 / d`` bits otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BIT_WEIGHTS = tuple(1 << i for i in range(8))


def pack_bits(mask: jax.Array) -> jax.Array:
    """Packs a bool array into uint8 along its last axis (8 entries a byte)."""
    mask = jnp.asarray(mask, dtype=jnp.bool_)
    if mask.ndim == 0:
        mask = mask[None]
    last = mask.shape[-1]
    padded = -(-last // 8) * 8
    if padded != last:
        pad = [(0, 0)] * (mask.ndim - 1) + [(0, padded - last)]
        mask = jnp.pad(mask, pad)
    bits = mask.reshape(mask.shape[:-1] + (padded // 8, 8)).astype(jnp.uint8)
    weights = jnp.asarray(_BIT_WEIGHTS, dtype=jnp.uint8).reshape((1,) * (bits.ndim - 1) + (8,))
    return jnp.sum(bits * weights, axis=-1, dtype=jnp.uint8)


def unpack_bits(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `pack_bits`: the bool array of ``shape`` that was packed."""
    weights = jnp.asarray(_BIT_WEIGHTS, dtype=jnp.uint8).reshape((1,) * packed.ndim + (8,))
    bits = (packed[..., None] & weights) != 0
    flat_last = bits.reshape(packed.shape[:-1] + (packed.shape[-1] * 8,))
    last = shape[-1] if shape else 1
    return flat_last[..., :last].reshape(shape)


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of ``pack_bits`` applied to a mask of ``shape``."""
    if not shape:
        return (1,)
    return tuple(shape[:-1]) + (-(-shape[-1] // 8),)
