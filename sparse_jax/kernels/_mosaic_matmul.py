"""Hopper kernel (Pallas Mosaic GPU) for ``x @ W``, W compressed 2:4 along K.

One program per ``(block_m, block_n)`` output tile. A TMA pipeline
(``plgpu.emit_pipeline``, ``max_concurrent_steps`` shared-memory stages) brings
in, per ``block_k`` step, the x tile and the compressed tile of ``W`` (values
and metadata, ~56% of the dense bytes for bf16). The warpgroup expands the
compressed tile in registers (`expand_tile`), writes the dense tile to a
swizzled shared-memory buffer, and issues ``wgmma`` with float32 accumulation
in registers. The dense weight never exists in HBM.

Supports 16-bit inputs (bf16, f16): wgmma on float32 operands would run as
tf32 with K-major operands only; use the portable kernel for float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sparse_jax.kernels._expand import expand_tile
from sparse_jax.kernels._interpret import mosaic_gpu_interpret_mode
from sparse_jax.kernels._tiles import Tiles, pad_to, round_up

_METADATA_ROWS = 32
_WGMMA_M = 64  # rows of one warpgroup MMA


def _swizzled(plgpu, minor_elems: int, dtype) -> tuple:
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor_elems * bits)
    return (
        plgpu.TilingTransform((8, swizzle * 8 // bits)),
        plgpu.SwizzleTransform(swizzle),
    )


def default_mosaic_tiles(m: int, k_padded: int, n: int) -> Tiles:
    """``block_m`` 64 (one warpgroup MMA), 128 for large M; ``block_k`` 64; ``block_n``
    128, or 64 when that leaves fewer programs than SMs."""
    block_m = 128 if m >= 512 else _WGMMA_M
    block_k = 64 if k_padded % 64 == 0 else 32
    block_n = 128 if (-(-m // block_m)) * (-(-n // 128)) >= 132 else 64
    return Tiles(block_m=block_m, block_k=block_k, block_n=block_n)


def _call(x, values, meta, *, tiles: Tiles, out_dtype, max_concurrent_steps: int, semantics: str):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m_t, k_t = x.shape
    n_t = values.shape[1]
    bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
    dtype = x.dtype
    x_transforms = _swizzled(plgpu, bk, dtype)
    w_transforms = _swizzled(plgpu, bn, dtype)
    out_transforms = _swizzled(plgpu, bn, out_dtype)
    k_steps = k_t // bk

    def kernel(x_gmem, values_gmem, meta_gmem, out_gmem, w_smem, out_smem):
        row, col = lax.axis_index("m"), lax.axis_index("n")

        def step(_, x_smem, values_smem, meta_smem, acc):
            w_smem[...] = expand_tile(values_smem[...], meta_smem[...], dtype)
            plgpu.commit_smem()  # make the stores visible to the tensor cores
            plgpu.wgmma(acc, x_smem, w_smem)
            plgpu.wgmma_wait(0)  # w_smem is rewritten by the next step
            return acc

        @functools.partial(pl.run_scoped, acc=plgpu.ACC((bm, bn), jnp.float32))
        def _accumulate(acc):
            plgpu.emit_pipeline(
                lambda k, *refs: step(k, *refs, acc),
                grid=(k_steps,),
                in_specs=[
                    plgpu.BlockSpec((bm, bk), lambda k: (row, k), transforms=x_transforms),
                    plgpu.BlockSpec((bk // 2, bn), lambda k: (k, col)),
                    plgpu.BlockSpec((bk // _METADATA_ROWS, bn), lambda k: (k, col)),
                ],
                max_concurrent_steps=max_concurrent_steps,
            )(x_gmem, values_gmem, meta_gmem)
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
        grid=(m_t // bm, n_t // bn),
        grid_names=("m", "n"),
        scratch_types=[
            plgpu.SMEM((bk, bn), dtype, transforms=w_transforms),
            plgpu.SMEM((bm, bn), out_dtype, transforms=out_transforms),
        ],
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=getattr(plgpu.LoweringSemantics, semantics.capitalize())
        ),
    )(x, values, meta)


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
    max_concurrent_steps: int = 3,
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
      max_concurrent_steps: shared-memory pipeline stages.
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
    m_t = round_up(m, tiles.block_m)
    k_t = round_up(k_padded, tiles.block_k)
    n_t = round_up(n, tiles.block_n)
    x = pad_to(x, (m_t, k_t))
    values = pad_to(values, (k_t // 2, n_t))
    meta = lax.bitcast_convert_type(pad_to(meta, (k_t // _METADATA_ROWS, n_t)), jnp.int32)
    call = functools.partial(
        _call,
        tiles=tiles,
        out_dtype=x.dtype,
        max_concurrent_steps=max_concurrent_steps,
        semantics=semantics,
    )
    if interpret:
        with mosaic_gpu_interpret_mode():
            out = call(x, values, meta)
    else:
        out = call(x, values, meta)
    return out[:m, :n]
