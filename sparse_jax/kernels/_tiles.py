"""Tile choice and padding for the compressed matmul kernels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_jax._compressed import AXIS_ALIGN

# Programs wanted in flight: about two per SM of an H100 (132 SMs).
_TARGET_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Block sizes of one kernel launch: rows of ``x``, the reduction, output columns."""

    block_m: int
    block_k: int
    block_n: int

    def check(self) -> None:
        for name in ("block_m", "block_k", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"Tiles.{name}={value}: expected a power of two >= 16")
        if self.block_k % AXIS_ALIGN:
            raise ValueError(
                f"Tiles.block_k={self.block_k}: expected a multiple of {AXIS_ALIGN} "
                "(one metadata word covers 32 rows)"
            )


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _largest_dividing(size: int, candidates: tuple[int, ...]) -> int | None:
    for c in candidates:
        if size % c == 0:
            return c
    return None


def choose_tiles(m: int, k: int, n: int, *, min_block_m: int = 16) -> Tiles:
    """Tiles for ``(m, k) @ (k, n)``: small ``block_m`` for decode shapes, ``block_n``
    shrunk until there are enough programs, ``block_k`` dividing ``k`` when possible.

    ``k`` is the padded reduction size (a multiple of 32); the wrapper pads any
    dimension the tiles do not divide.

    Example (one decode row: the smallest ``block_m``, ``block_n`` shrunk for parallelism):
      >>> from sparse_jax.kernels import choose_tiles
      >>> choose_tiles(1, 4096, 4096)
      Tiles(block_m=16, block_k=128, block_n=32)
    """
    block_m = min_block_m
    while block_m < min(m, 128):
        block_m *= 2
    block_k = _largest_dividing(k, (128, 64, 32)) or 64
    block_n = _largest_dividing(n, (128, 64, 32, 16)) or 64
    m_blocks = -(-m // block_m)
    while block_n > 32 and m_blocks * (-(-n // block_n)) < _TARGET_PROGRAMS:
        block_n //= 2
    return Tiles(block_m=block_m, block_k=block_k, block_n=block_n)


def pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Zero-pads ``x`` at the end of each axis up to ``shape`` (no copy if equal)."""
    if tuple(x.shape) == tuple(shape):
        return x
    return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)])
