"""Portable Pallas kernel (Triton lowering on GPU) for ``x @ W`` and ``x @ W.T``, W compressed 2:4.

Each program owns one output tile and walks the reduction in ``block_k``
steps. Per step it loads the compressed tile of ``W`` (``block_k / 2`` rows of
values plus ``block_k / 32`` rows of uint32 metadata, so ~56% of the dense
bytes for bf16), expands it on chip with `expand_phase_major` and feeds the
dense tile to the MMA, accumulating in float32. The dense weight never exists
in HBM.

The lower and higher kept values of the groups are two rectangles of a free
reshape of ``values`` to ``(K/4, 2 * N)`` (columns ``[0, N)`` and ``[N, 2N)``),
so the kernel loads them as two plain blocks. The expanded tile is K-permuted
(phase-major), so ``x``'s columns are permuted to match in the wrapper (one
pass over x, small next to the weight for decode shapes), and the transposed
kernel's output is permuted back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sparse_jax.kernels._expand import expand_phase_major, permute_k, unpermute_k
from sparse_jax.kernels._tiles import Tiles, choose_tiles, pad_to, round_up

_METADATA_ROWS = 32  # rows of the dense tile one metadata row covers


def _triton_params(num_warps: int, num_stages: int):
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # pragma: no cover - a jax without the Triton backend
        return None
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _nn_kernel(x_ref, lo_ref, hi_ref, meta_ref, out_ref, *, block_k, k_steps, compute_dtype):
    """out tile (bm, bn) = x rows (bm, K), K-permuted, @ W columns (K, bn)."""
    groups = block_k // 4

    def step(k, acc):
        x = x_ref[:, pl.ds(pl.multiple_of(k * block_k, block_k), block_k)].astype(compute_dtype)
        rows = pl.ds(pl.multiple_of(k * groups, groups), groups)
        words = meta_ref[pl.ds(k * (block_k // _METADATA_ROWS), block_k // _METADATA_ROWS), :]
        w = expand_phase_major(lo_ref[rows, :], hi_ref[rows, :], words, compute_dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    acc = lax.fori_loop(0, k_steps, step, acc)
    out_ref[...] = acc.astype(out_ref.dtype)


def _nt_kernel(x_ref, lo_ref, hi_ref, meta_ref, out_ref, *, block_n, n_steps, compute_dtype):
    """out tile (bm, bk), K-permuted = x rows (bm, N) @ W rows (bk, N).T."""

    def step(j, acc):
        cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
        x = x_ref[:, cols].astype(compute_dtype)
        w = expand_phase_major(lo_ref[:, cols], hi_ref[:, cols], meta_ref[:, cols], compute_dtype)
        return acc + lax.dot_general(
            x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    acc = lax.fori_loop(0, n_steps, step, acc)
    out_ref[...] = acc.astype(out_ref.dtype)


def _check_operands(x, values, meta, k_dense, transpose, where):
    if x.ndim != 2 or values.ndim != 2 or meta.ndim != 2:
        raise ValueError(
            f"{where}: expected 2-d x, values and meta, got shapes {x.shape}, "
            f"{values.shape}, {meta.shape}"
        )
    k_padded = 2 * values.shape[0]
    if meta.shape != (k_padded // _METADATA_ROWS, values.shape[1]):
        raise ValueError(
            f"{where}: meta has shape {meta.shape}, expected "
            f"{(k_padded // _METADATA_ROWS, values.shape[1])} for values {values.shape}"
        )
    contracted = values.shape[1] if transpose else k_dense
    if x.shape[1] != contracted:
        what = "N (columns of W)" if transpose else "K (rows of W)"
        raise ValueError(
            f"{where}: x has shape {x.shape}; its last axis must be {what} = {contracted}"
        )


@functools.partial(
    jax.jit,
    static_argnames=("k_dense", "transpose", "tiles", "interpret", "num_warps", "num_stages"),
)
def sparse24_matmul_pallas(
    x: jax.Array,
    values: jax.Array,
    meta: jax.Array,
    *,
    k_dense: int,
    transpose: bool = False,
    tiles: Tiles | None = None,
    interpret: bool = False,
    num_warps: int = 4,
    num_stages: int = 3,
) -> jax.Array:
    """``x @ W`` (or ``x @ W.T``) for ``W`` of shape ``(k_dense, N)`` compressed along axis 0.

    Args:
      x: ``(M, K)`` (or ``(M, N)`` when ``transpose``), any M.
      values: ``(K_padded / 2, N)`` kept values of ``W`` (``Sparse24.values``).
      meta: ``(K_padded / 32, N)`` uint32 positions (``Sparse24.meta``).
      k_dense: K, the dense number of rows of ``W`` (``K_padded`` rounds it up to 32).
      transpose: compute ``x @ W.T`` (shape ``(M, K)``) instead of ``x @ W``.
      tiles: block sizes; chosen from the shape when None. Dimensions the
        tiles do not divide are zero-padded (a copy of the operand).
      interpret: run with Pallas's interpreter (CPU).
      num_warps, num_stages: Triton launch parameters (GPU only).

    Returns:
      ``(M, N)`` (or ``(M, K)``) in the promoted dtype of ``x`` and ``values``,
      accumulated in float32.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> from sparse_jax.kernels import sparse24_matmul_pallas, Tiles
      >>> s = sparse_jax.compress(jax.random.normal(jax.random.key(0), (64, 32)), prune=True)
      >>> x = jax.random.normal(jax.random.key(1), (3, 64))
      >>> y = sparse24_matmul_pallas(x, s.values, s.meta, k_dense=64,
      ...     tiles=Tiles(16, 32, 16), interpret=True)
      >>> bool(jnp.allclose(y, x @ sparse_jax.decompress(s), atol=1e-4))
      True
    """
    where = "sparse24_matmul_pallas"
    _check_operands(x, values, meta, k_dense, transpose, where)
    compute_dtype = jnp.result_type(x.dtype, values.dtype)
    m = x.shape[0]
    k_padded, n = 2 * values.shape[0], values.shape[1]
    if tiles is None:
        tiles = choose_tiles(m, k_padded, n) if not transpose else choose_tiles(m, n, k_padded)
        if transpose:  # choose_tiles names the reduction k; here it is n
            tiles = Tiles(tiles.block_m, max(tiles.block_n, _METADATA_ROWS), tiles.block_k)
    tiles.check()
    bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
    m_t, k_t, n_t = round_up(m, bm), round_up(k_padded, bk), round_up(n, bn)
    # (K/4, 2N): row g is [lower kept values of group g | higher ones].
    pairs = pad_to(values, (k_t // 2, n_t)).reshape(k_t // 4, 2 * n_t)
    # Zero metadata on padded rows puts both zero values at position 0: zero rows.
    meta = lax.bitcast_convert_type(pad_to(meta, (k_t // _METADATA_ROWS, n_t)), jnp.int32)
    params = None if interpret else _triton_params(num_warps, num_stages)
    n_blocks = n_t // bn
    if not transpose:
        x = permute_k(pad_to(x, (m_t, k_t)), bk)
        kernel = functools.partial(
            _nn_kernel, block_k=bk, k_steps=k_t // bk, compute_dtype=compute_dtype
        )
        out = pl.pallas_call(
            kernel,
            grid=(m_t // bm, n_t // bn),
            in_specs=[
                pl.BlockSpec((bm, k_t), lambda i, j: (i, 0)),
                pl.BlockSpec((k_t // 4, bn), lambda i, j: (0, j)),
                pl.BlockSpec((k_t // 4, bn), lambda i, j: (0, n_blocks + j)),
                pl.BlockSpec((k_t // _METADATA_ROWS, bn), lambda i, j: (0, j)),
            ],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
            out_shape=jax.ShapeDtypeStruct((m_t, n_t), compute_dtype),
            interpret=interpret,
            compiler_params=params,
            name="sparse24_matmul_nn",
        )(x, pairs, pairs, meta)
        return out[:m, :n]
    x = pad_to(x, (m_t, n_t))
    kernel = functools.partial(
        _nt_kernel, block_n=bn, n_steps=n_t // bn, compute_dtype=compute_dtype
    )
    out = pl.pallas_call(
        kernel,
        grid=(m_t // bm, k_t // bk),
        in_specs=[
            pl.BlockSpec((bm, n_t), lambda i, j: (i, 0)),
            pl.BlockSpec((bk // 4, n_t), lambda i, j: (j, 0)),
            pl.BlockSpec((bk // 4, n_t), lambda i, j: (j, 1)),
            pl.BlockSpec((bk // _METADATA_ROWS, n_t), lambda i, j: (j, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_t, k_t), compute_dtype),
        interpret=interpret,
        compiler_params=params,
        name="sparse24_matmul_nt",
    )(x, pairs, pairs, meta)
    return unpermute_k(out, bk)[:m, :k_dense]
