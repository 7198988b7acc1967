"""The compressed 2:4 format: kept values plus 2-bit positions packed in uint32.

A tensor ``w`` that is 2:4 along ``axis`` (at most 2 non-zeros in every
contiguous group of 4 entries along that axis) is stored as a `Sparse24`:

* ``values``: ``w``'s shape with ``axis`` halved (after padding, see below), in
  ``w``'s dtype. Along ``axis``, group ``g`` contributes its two kept entries at
  rows ``2g`` (the lower position) and ``2g + 1`` (the higher position).
* ``meta``: ``w``'s shape with ``axis`` divided by 32, dtype ``uint32``. Word
  ``meta[k32]`` (along ``axis``; every other index as in ``w``) describes the 16
  kept values ``values[16 * k32 : 16 * k32 + 16]``, i.e. the 8 groups covering
  ``w[32 * k32 : 32 * k32 + 32]``: bits ``[2j, 2j + 2)`` hold the position
  (0..3) inside its group of kept value ``16 * k32 + j``. So each group is one
  4-bit nibble, lower position in the low 2 bits, nibble ``g % 8`` of its word.

Why this layout: the sparse tensor core instructions (``mma.sp`` and
``wgmma.mma_async.sp``) take the sparse operand as rows of A with the 2:4
groups along K, and for 16-bit types describe each row's kept values with one
such 4-bit nibble per group of 4 (two 2-bit indices, lower one first, in
increasing order), 32 bits covering 32 K-elements (``m16n8k32``). For a weight
``W`` of shape ``(K, N)`` compressed along ``axis=0``, column ``n`` of ``W`` is
row ``n`` of the sparse operand ``W.T``, and ``meta[:, n]`` is exactly that
row's metadata, one word per 32 K-elements. Keeping ``N`` as the fastest axis
of both arrays makes every tile a contiguous, TMA-friendly rectangle
``(tile_k / 2, tile_n)`` / ``(tile_k / 32, tile_n)``; a kernel that uses the
hardware's sparse MMA still has to shuffle the words into the per-thread
register order of the instruction (that order is a register layout, not a
memory one). The bytes: for bf16, ``K * N`` bytes of values plus ``K * N / 8``
of metadata, 56.25% of the dense ``2 * K * N``.

Padding: the axis size must be a multiple of 4; it is padded with zeros to a
multiple of 32 so that every metadata word is whole (zero groups store
positions 0 and 1 and zero values). ``shape`` keeps the original shape, and
`decompress` slices the padding off.

Groups with fewer than 2 non-zeros keep their non-zeros plus the lowest zero
positions, so `decompress` is exact for any 2:4 input.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

GROUP = 4  # entries per group along the compressed axis
KEPT = 2  # entries kept per group
KEPT_PER_WORD = 16  # 2-bit positions per uint32 metadata word
AXIS_ALIGN = GROUP * KEPT_PER_WORD // KEPT  # 32: the axis span one word covers


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "meta"],
    meta_fields=["shape", "axis"],
)
@dataclasses.dataclass(frozen=True)
class Sparse24:
    """A 2:4 sparse tensor: kept values and packed 2-bit positions.

    A pytree whose leaves are ``values`` and ``meta``; ``shape`` (the dense
    shape) and ``axis`` (the compressed axis, non-negative) are static, so it
    passes through ``jit``, ``jax.tree.map``, sharding and orbax checkpoints.
    See the module docstring for the exact layout.

    Attributes:
      values: kept values, ``shape`` with ``axis`` -> ``padded_size // 2``.
      meta: ``uint32`` positions, ``shape`` with ``axis`` -> ``padded_size // 32``.
      shape: shape of the dense tensor.
      axis: the axis the groups of 4 run along.
    """

    values: jax.Array
    meta: jax.Array
    shape: tuple[int, ...]
    axis: int

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def padded_size(self) -> int:
        """Size of the compressed axis after padding to a multiple of 32."""
        return _round_up(self.shape[self.axis], AXIS_ALIGN)

    @property
    def nbytes(self) -> int:
        """Bytes of ``values`` plus ``meta``."""
        return int(self.values.size * self.values.dtype.itemsize + self.meta.size * 4)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _to_front_2d(x: jax.Array, axis: int) -> jax.Array:
    """Moves ``axis`` first and flattens the rest: ``(size, prod(other dims))``."""
    x = jnp.moveaxis(x, axis, 0)
    return x.reshape(x.shape[0], -1)


def _from_front_2d(x2: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    """Inverse of `_to_front_2d` for an array whose ``axis`` has ``x2.shape[0]`` rows."""
    front_shape = (x2.shape[0],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return jnp.moveaxis(x2.reshape(front_shape), 0, axis)


def _kept_positions(keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Lower and higher kept position of each group.

    Args:
      keep: ``(groups, 4, cols)`` bool with exactly 2 True per group.

    Returns:
      Two ``(groups, cols)`` int32 arrays, ``lo < hi``.
    """
    position = jnp.arange(GROUP, dtype=jnp.int32).reshape(1, GROUP, 1)
    lo = jnp.min(jnp.where(keep, position, GROUP), axis=1)
    hi = jnp.max(jnp.where(keep, position, -1), axis=1)
    return lo, hi


def _exactly_two(priority: jax.Array) -> jax.Array:
    """Keeps the 2 highest-priority entries of each group; ties -> lower position.

    Args:
      priority: ``(groups, 4, cols)`` array of comparable scores.
    """
    slots = [priority[:, i] for i in range(GROUP)]
    keep = []
    for i, slot in enumerate(slots):
        beaten_by = sum(
            ((other > slot) if j > i else (other >= slot)).astype(jnp.int32)
            for j, other in enumerate(slots)
            if j != i
        )
        keep.append(beaten_by < KEPT)
    return jnp.stack(keep, axis=1)


def pack_positions(positions: jax.Array) -> jax.Array:
    """Packs 2-bit positions, 16 per uint32 word, along axis 0.

    Args:
      positions: ``(kept, cols)`` integers in ``[0, 4)``; ``kept`` a multiple of 16.

    Returns:
      ``(kept // 16, cols)`` uint32; position ``j`` of a word sits at bits ``2j``.
    """
    kept, cols = positions.shape
    grouped = positions.astype(jnp.uint32).reshape(kept // KEPT_PER_WORD, KEPT_PER_WORD, cols)
    shifts = (2 * jnp.arange(KEPT_PER_WORD, dtype=jnp.uint32)).reshape(1, KEPT_PER_WORD, 1)
    # The 2-bit fields do not overlap, so the sum is a bitwise or.
    return jnp.sum(grouped << shifts, axis=1, dtype=jnp.uint32)


def unpack_positions(meta: jax.Array) -> jax.Array:
    """Inverse of `pack_positions`: ``(words, cols)`` uint32 -> ``(16 * words, cols)`` int32."""
    words, cols = meta.shape
    shifts = (2 * jnp.arange(KEPT_PER_WORD, dtype=jnp.uint32)).reshape(1, KEPT_PER_WORD, 1)
    fields = (meta.astype(jnp.uint32).reshape(words, 1, cols) >> shifts) & jnp.uint32(3)
    return fields.reshape(words * KEPT_PER_WORD, cols).astype(jnp.int32)


def _check_compressible(w: jax.Array, axis: int) -> None:
    size = w.shape[axis]
    if size % GROUP:
        raise ValueError(
            f"compress: w of shape {w.shape} has size {size} along axis {axis}, "
            f"which is not a multiple of {GROUP}; 2:4 groups must tile that axis"
        )


def _violating_groups(w: jax.Array, axis: int) -> tuple[int, int]:
    """(groups with more than 2 non-zeros, total groups) along ``axis``; ``w`` concrete."""
    nonzero = np.moveaxis(np.asarray(w) != 0, axis, 0)
    per_group = nonzero.reshape(-1, GROUP, nonzero[0].size).sum(axis=1)
    return int((per_group > KEPT).sum()), int(per_group.size)


@functools.partial(jax.jit, static_argnames=("axis", "prune"))
def _compress(w: jax.Array, *, axis: int, prune: bool) -> Sparse24:
    w2 = _to_front_2d(w, axis)
    size, cols = w2.shape
    padded = _round_up(size, AXIS_ALIGN)
    w2 = jnp.pad(w2, ((0, padded - size), (0, 0)))
    groups = w2.reshape(padded // GROUP, GROUP, cols)
    if prune:
        magnitude = jnp.abs(groups).astype(jnp.float32)
        # NaN ranks highest, so it stays visible rather than silently dropped.
        priority = jnp.where(jnp.isnan(magnitude), jnp.inf, magnitude)
    else:
        priority = (groups != 0).astype(jnp.int32)
    lo, hi = _kept_positions(_exactly_two(priority))
    value_lo = jnp.take_along_axis(groups, lo[:, None, :], axis=1)[:, 0]
    value_hi = jnp.take_along_axis(groups, hi[:, None, :], axis=1)[:, 0]
    values = jnp.stack([value_lo, value_hi], axis=1).reshape(padded // 2, cols)
    positions = jnp.stack([lo, hi], axis=1).reshape(padded // 2, cols)
    meta = pack_positions(positions)
    return Sparse24(
        values=_from_front_2d(values, w.shape, axis),
        meta=_from_front_2d(meta, w.shape, axis),
        shape=tuple(w.shape),
        axis=axis,
    )


def compress(w: jax.Array, axis: int = 0, *, prune: bool = False) -> Sparse24:
    """Compresses a 2:4 tensor into kept values and packed 2-bit positions.

    Args:
      w: a floating-point array, 2:4 along ``axis``; that axis's size must be
        a multiple of 4.
      axis: the axis the groups of 4 run along: the reduction axis, 0 for a
        Flax ``Linear`` kernel ``(in, out)``.
      prune: if True, keep the 2 largest magnitudes of each group (ties ->
        lower position) instead of requiring ``w`` to be 2:4 already.

    Returns:
      A `Sparse24`.

    Raises:
      ValueError: if ``w`` is not 2:4 along ``axis`` and ``prune`` is False
        (checked when ``w`` is concrete; under ``jit`` a non-2:4 ``w`` keeps
        the first 2 non-zeros of each group, so check or prune beforehand).

    Example:
      >>> import jax.numpy as jnp, sparse_jax
      >>> w = jnp.array([[1.0], [0.0], [0.0], [-2.0]])
      >>> s = sparse_jax.compress(w, axis=0)
      >>> s.values.shape, s.meta.shape, s.meta.dtype.name
      ((16, 1), (1, 1), 'uint32')
      >>> bool((sparse_jax.decompress(s) == w).all())
      True
    """
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"compress: w must be floating point, got {w.dtype} with shape {w.shape}")
    if w.ndim == 0:
        raise ValueError("compress: w is a scalar; it needs an axis to compress along")
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"compress: axis {axis} is out of range for w of shape {w.shape}")
    axis %= w.ndim
    _check_compressible(w, axis)
    if not prune and not isinstance(w, jax.core.Tracer):
        bad, total = _violating_groups(w, axis)
        if bad:
            raise ValueError(
                f"compress: w of shape {w.shape} is not 2:4 along axis {axis}: "
                f"{bad} of {total} groups of 4 have more than 2 non-zeros. Prune "
                f"it first (sparse_jax.prune / nm_mask) or pass prune=True."
            )
    return _compress(w, axis=axis, prune=bool(prune))


def _expand_front_2d(values2: jax.Array, meta2: jax.Array) -> jax.Array:
    """Dense ``(padded, cols)`` from front-axis values ``(padded/2, cols)`` and meta."""
    half, cols = values2.shape
    positions = unpack_positions(meta2).reshape(half // 2, 2, cols)
    pairs = values2.reshape(half // 2, 2, cols)
    slot = jnp.arange(GROUP, dtype=jnp.int32).reshape(1, GROUP, 1)
    zero = jnp.zeros((), values2.dtype)
    # A select (not a sum) keeps every stored value bit-exact, NaN and -0.0 too.
    dense = jnp.where(
        positions[:, 0:1] == slot,
        pairs[:, 0:1],
        jnp.where(positions[:, 1:2] == slot, pairs[:, 1:2], zero),
    )
    return dense.reshape(2 * half, cols)


def decompress(s: Sparse24) -> jax.Array:
    """The dense tensor a `Sparse24` stands for; exact inverse of `compress`.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> w = jax.random.normal(jax.random.key(0), (8, 3))
      >>> w = w * sparse_jax.nm_mask(w, axis=0)
      >>> bool((sparse_jax.decompress(sparse_jax.compress(w)) == w).all())
      True
    """
    if not isinstance(s, Sparse24):
        raise TypeError(f"decompress: expected a Sparse24, got {type(s).__name__}")
    return _decompress(s)


@jax.jit
def _decompress(s: Sparse24) -> jax.Array:
    dense2 = _expand_front_2d(_to_front_2d(s.values, s.axis), _to_front_2d(s.meta, s.axis))
    size = s.shape[s.axis]
    return _from_front_2d(dense2[:size], s.shape, s.axis)


def gather_kept(dense: jax.Array, s: Sparse24) -> jax.Array:
    """Entries of ``dense`` (shape ``s.shape``) at ``s``'s kept positions, laid out like ``s.values``.

    This is the transpose of `decompress` in its values: the gradient of a
    loss with respect to ``s.values`` is ``gather_kept(gradient wrt the dense
    tensor, s)``.
    """
    if tuple(dense.shape) != tuple(s.shape):
        raise ValueError(f"gather_kept: dense has shape {dense.shape}, expected {s.shape}")
    return _gather_kept(dense, s)


@jax.jit
def _gather_kept(dense: jax.Array, s: Sparse24) -> jax.Array:
    dense2 = _to_front_2d(dense, s.axis)
    size, cols = dense2.shape
    dense2 = jnp.pad(dense2, ((0, s.padded_size - size), (0, 0)))
    positions = unpack_positions(_to_front_2d(s.meta, s.axis))
    group_start = (jnp.arange(positions.shape[0], dtype=jnp.int32) // KEPT * GROUP).reshape(-1, 1)
    kept2 = jnp.take_along_axis(dense2, group_start + positions, axis=0)
    return _from_front_2d(kept2, s.values.shape, s.axis)
