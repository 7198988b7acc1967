"""Hopper kernel (Pallas Mosaic GPU) for ``x @ W``, W compressed 2:4 along K.

One program per ``(block_m, block_n)`` output tile. A TMA pipeline
(``plgpu.emit_pipeline``, ``max_concurrent_steps`` shared-memory stages) brings
in, per ``block_k`` step, the x tile, the metadata tile and the compressed
values (~56% of the dense weight bytes for bf16) as 16 two-dimensional blocks:
block ``j`` holds kept value ``j`` of every metadata word (a free reshape of
``values`` to ``(K/32, 16 * N)`` makes each one rectangle). The warpgroup
expands them with elementwise shifts and selects only, one ``(block_k/32,
block_n)`` piece per (nibble, position), stages the dense tile in shared memory,
re-reads it in the MMA register layout into a swizzled buffer and issues
``wgmma`` with float32 accumulation. The dense weight never exists in HBM.

The pieces are written K-permuted (dense row ``32w + c`` lands at row
``c * block_k/32 + w``), and the wrapper permutes x's columns the same way
(`_permute_k`), which leaves the product unchanged.

Supports 16-bit inputs (bf16, f16): wgmma on float32 operands would run as
tf32 with K-major operands only; use the portable kernel for float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sparse_jax.kernels._interpret import mosaic_gpu_interpret_mode
from sparse_jax.kernels._tiles import Tiles, pad_to, round_up

_METADATA_ROWS = 32
_WGMMA_M = 64  # rows of one warpgroup MMA
_VEC = 4  # elements per thread per register vector while expanding


def _swizzled(plgpu, minor_elems: int, dtype) -> tuple:
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor_elems * bits)
    return (
        plgpu.TilingTransform((8, swizzle * 8 // bits)),
        plgpu.SwizzleTransform(swizzle),
    )


def default_mosaic_tiles(m: int, k_padded: int, n: int) -> Tiles:
    """``block_m`` 64 (one warpgroup MMA), 128 for large M; ``block_k`` 128;
    ``block_n`` 128, or 64 when that leaves fewer programs than SMs."""
    block_m = 128 if m >= 512 else _WGMMA_M
    block_k = 128
    block_n = 128 if (-(-m // block_m)) * (-(-n // 128)) >= 132 else 64
    return Tiles(block_m=block_m, block_k=block_k, block_n=block_n)


def _call(
    x, values, meta, *, tiles: Tiles, out_dtype, max_concurrent_steps: int, semantics: str,
    interpret: bool,
):
    """The kernel on padded operands; ``x`` already permuted by `_permute_k`."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    # Each of the 128 threads holds whole vectors of the (block_k/32, block_n) pieces.
    piece = (tiles.block_k // _METADATA_ROWS) * tiles.block_n
    vec_size = next((v for v in (_VEC, 2, 1) if piece % (128 * v) == 0), None)
    if vec_size is None:
        raise ValueError(
            f"sparse24_matmul_mosaic: tiles {tiles} give {piece}-element expansion pieces; "
            "block_k / 32 * block_n must be a multiple of 128"
        )
    if interpret:  # the interpreter knows neither plgpu.load nor layouts
        def to_registers(ref, mma_layout=False):
            return ref[...]
    else:
        def to_registers(ref, mma_layout=False):
            if mma_layout:  # what a tiled, swizzled store needs
                return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=False)
            # One register layout for metadata and values, so their selects line up.
            layout = plgpu.Layout.WG_STRIDED(tuple(ref.shape), vec_size=vec_size)
            return plgpu.load(ref, (), layout=layout)

    m_t, k_t = x.shape
    n_t = values.shape[1]
    bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
    words = bk // _METADATA_ROWS  # metadata rows per K step
    dtype = x.dtype
    x_transforms = _swizzled(plgpu, bk, dtype)
    w_transforms = _swizzled(plgpu, bn, dtype)
    out_transforms = _swizzled(plgpu, bn, out_dtype)
    k_steps = k_t // bk
    n_blocks = n_t // bn
    # Row q of this view holds kept values 16q .. 16q+15 one after another, so
    # kept value 16q + j of column n sits at column j * n_t + n: the j-th kept
    # value of every word is one 2-d block, fetched by its own TMA copy.
    values_by_word = values.reshape(k_t // _METADATA_ROWS, 16 * n_t)

    def kernel(x_gmem, values_gmem, meta_gmem, out_gmem, w_smem, out_smem, staging_smem):
        row, col = lax.axis_index("m"), lax.axis_index("n")

        def step(_, x_smem, meta_smem, *rest):
            kept_smem, acc = rest[:16], rest[16]
            words_reg = to_registers(meta_smem)
            for nibble in range(8):  # group 8w + nibble of every word row w
                lo = to_registers(kept_smem[2 * nibble])
                hi = to_registers(kept_smem[2 * nibble + 1])
                lo_at = lax.shift_right_logical(words_reg, 4 * nibble) & 3
                hi_at = lax.shift_right_logical(words_reg, 4 * nibble + 2) & 3
                for position in range(4):
                    dense_rows = jnp.where(
                        lo_at == position, lo, jnp.where(hi_at == position, hi, jnp.zeros_like(lo))
                    )
                    # Dense row 32w + 4 * nibble + position, stored K-permuted.
                    staging_smem[pl.ds((4 * nibble + position) * words, words), :] = dense_rows
            plgpu.commit_smem()  # all threads' rows are in before the re-read
            # Row-strided register pieces cannot be stored swizzled; a second
            # pass in the MMA layout moves the tile to the swizzled buffer.
            w_smem[...] = to_registers(staging_smem, mma_layout=True)
            plgpu.commit_smem()  # make the stores visible to the tensor cores
            plgpu.wgmma(acc, x_smem, w_smem)
            plgpu.wgmma_wait(0)  # w_smem is rewritten by the next step
            return acc

        @functools.partial(pl.run_scoped, acc=plgpu.ACC((bm, bn), jnp.float32))
        def _accumulate(acc):
            kept_specs = [
                plgpu.BlockSpec((words, bn), lambda k, j=j: (k, j * n_blocks + col))
                for j in range(16)
            ]
            plgpu.emit_pipeline(
                lambda k, *refs: step(k, *refs, acc),
                grid=(k_steps,),
                in_specs=[
                    plgpu.BlockSpec((bm, bk), lambda k: (row, k), transforms=x_transforms),
                    plgpu.BlockSpec((words, bn), lambda k: (k, col)),
                    *kept_specs,
                ],
                max_concurrent_steps=max_concurrent_steps,
            )(x_gmem, meta_gmem, *([values_gmem] * 16))
            out_smem[...] = acc[...].astype(out_smem.dtype)

        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            out_smem, out_gmem.at[pl.ds(row * bm, bm), pl.ds(col * bn, bn)]
        )
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        kernel,
        # out_type/scratch_types: the spellings both jax 0.10 and 0.11 accept.
        out_type=jax.ShapeDtypeStruct((m_t, n_t), out_dtype),
        grid=(m_t // bm, n_blocks),
        grid_names=("m", "n"),
        scratch_types=[
            plgpu.SMEM((bk, bn), dtype, transforms=w_transforms),
            plgpu.SMEM((bm, bn), out_dtype, transforms=out_transforms),
            plgpu.SMEM((bk, bn), dtype),
        ],
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=getattr(plgpu.LoweringSemantics, semantics.capitalize())
        ),
    )(x, values_by_word, meta)


def _permute_k(x: jax.Array, block_k: int) -> jax.Array:
    """Reorders each ``block_k`` run of x's columns to the kernel's dense-tile row order.

    Within a K tile the kernel writes dense row ``32w + c`` (word row ``w``,
    ``c = 4 * nibble + position``) at row ``c * (block_k / 32) + w``, so x's
    columns are transposed the same way: ``(block_k/32, 32) -> (32, block_k/32)``.
    This moves x once through HBM, small next to the weight for decode shapes.
    """
    m, k = x.shape
    words = block_k // _METADATA_ROWS
    return x.reshape(m, k // block_k, words, _METADATA_ROWS).swapaxes(2, 3).reshape(m, k)


@functools.partial(
    jax.jit,
    static_argnames=("k_dense", "tiles", "interpret", "max_concurrent_steps", "semantics"),
)
def sparse24_matmul_mosaic(
    x: jax.Array,
    values: jax.Array,
    meta: jax.Array,
    *,
    k_dense: int,
    tiles: Tiles | None = None,
    interpret: bool = False,
    max_concurrent_steps: int | None = None,
    semantics: str = "lane",
) -> jax.Array:
    """``x @ W`` for ``W`` of shape ``(k_dense, N)`` compressed along axis 0, on Hopper.

    Args:
      x: ``(M, K)``, any M; bf16 or f16, the same dtype as ``values``.
      values: ``(K_padded / 2, N)`` kept values (``Sparse24.values``).
      meta: ``(K_padded / 32, N)`` uint32 positions (``Sparse24.meta``).
      k_dense: K, the dense number of rows of ``W``.
      tiles: block sizes (``block_m`` a multiple of 64); chosen from the shape when None.
      interpret: run on the CPU with Mosaic GPU's interpreter.
      max_concurrent_steps: shared-memory pipeline stages (None: 3 for
        ``block_m`` 64, else 2, to fit the 227 KiB of shared memory).
      semantics: Mosaic GPU lowering semantics, ``"lane"`` or ``"warpgroup"``.

    Returns:
      ``(M, N)`` in ``x``'s dtype, accumulated in float32.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> from sparse_jax.kernels import sparse24_matmul_mosaic, Tiles
      >>> w = jax.random.normal(jax.random.key(0), (64, 64), jnp.bfloat16)
      >>> s = sparse_jax.compress(w, prune=True)
      >>> x = jax.random.normal(jax.random.key(1), (2, 64), jnp.bfloat16)
      >>> y = sparse24_matmul_mosaic(x, s.values, s.meta, k_dense=64,
      ...     tiles=Tiles(64, 64, 64), interpret=True)
      >>> ref = jnp.dot(x, sparse_jax.decompress(s), preferred_element_type=jnp.float32)
      >>> bool(jnp.allclose(y.astype(jnp.float32), ref, atol=0.1, rtol=0.02))
      True
    """
    where = "sparse24_matmul_mosaic"
    if x.ndim != 2 or values.ndim != 2 or meta.ndim != 2:
        raise ValueError(
            f"{where}: expected 2-d x, values and meta, got {x.shape}, {values.shape}, {meta.shape}"
        )
    if x.dtype != values.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(
            f"{where}: supports bf16 or f16 x and values of the same dtype, got "
            f"x {x.dtype} and values {values.dtype}; use impl='pallas' for others"
        )
    k_padded, n = 2 * values.shape[0], values.shape[1]
    if meta.shape != (k_padded // _METADATA_ROWS, n):
        raise ValueError(
            f"{where}: meta has shape {meta.shape}, expected {(k_padded // _METADATA_ROWS, n)}"
        )
    if x.shape[1] != k_dense:
        raise ValueError(f"{where}: x has shape {x.shape}; its last axis must be K = {k_dense}")
    m = x.shape[0]
    tiles = tiles or default_mosaic_tiles(m, k_padded, n)
    tiles.check()
    if tiles.block_m % _WGMMA_M:
        raise ValueError(f"{where}: Tiles.block_m={tiles.block_m} must be a multiple of 64")
    if tiles.block_n * x.dtype.itemsize < 128 or tiles.block_k * x.dtype.itemsize < 128:
        # wgmma wants both operands with the same 128-byte swizzle.
        raise ValueError(
            f"{where}: Tiles.block_n={tiles.block_n} and block_k={tiles.block_k} must span "
            f"at least 128 bytes of {x.dtype} (>= {128 // x.dtype.itemsize} elements)"
        )
    if max_concurrent_steps is None:
        max_concurrent_steps = 3 if tiles.block_m <= _WGMMA_M else 2
    m_t = round_up(m, tiles.block_m)
    k_t = round_up(k_padded, tiles.block_k)
    n_t = round_up(n, tiles.block_n)
    x = _permute_k(pad_to(x, (m_t, k_t)), tiles.block_k)
    values = pad_to(values, (k_t // 2, n_t))
    meta = lax.bitcast_convert_type(pad_to(meta, (k_t // _METADATA_ROWS, n_t)), jnp.int32)
    call = functools.partial(
        _call,
        tiles=tiles,
        out_dtype=x.dtype,
        max_concurrent_steps=max_concurrent_steps,
        semantics=semantics,
        interpret=interpret,
    )
    if interpret:
        with mosaic_gpu_interpret_mode():
            out = call(x, values, meta)
    else:
        out = call(x, values, meta)
    return out[:m, :n]
