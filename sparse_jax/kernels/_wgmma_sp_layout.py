"""Operand layout of Hopper's sparse ``wgmma``, emulated in NumPy, and the shuffle to it.

What this models: ``wgmma.mma_async.sp.sync.aligned.m64nNk32.f32.{bf16,f16}.{bf16,f16}``,
``D (64 x N, f32) = A (64 x 32, 2:4 sparse) @ B (32 x N) + D``, issued by one warpgroup of
128 threads. In sparse_jax's use A is a tile of ``W.T`` (64 output features x 32 of the
reduction) and B a tile of ``x.T``: ``Y.T = W.T @ X.T`` (see `sparse_jax.Sparse24`).

Rules, each with where it comes from. "ISA" is NVIDIA's PTX ISA, section 9.7.15
(Asynchronous warpgroup level matrix multiply-accumulate), read through the stored copy at
https://ptx.poole.ai/docs/09-instruction-set/15-wgmma/ (PTX ISA 9.x text). "CUTLASS" is
``include/cute/atom/mma_traits_sm90_gmma_sparse.hpp`` and ``mma_traits_sm90_gmma.hpp`` at
NVIDIA/cutlass 7107b05 (Aug 2026): the thread/value layouts CuTe declares for these
instructions (``ALayout_64x32``, ``ELayout_64x32``, ``CLayout_64xN``), which are facts about
the hardware that CUTLASS's sparse GEMMs rely on.

1. Thread naming (ISA, wgmma register fragments): thread ``t`` of the warpgroup has
   ``warp = t // 32``, ``lane = t % 32``, ``groupID = lane >> 2``,
   ``threadID_in_group = lane % 4``; warp ``w`` owns rows ``16 w .. 16 w + 15`` of A and D.
2. Packing (ISA 9.7.15.6.1, "Sparse matrix storage"): the 64 x 32 A is stored as 64 x 16
   kept values; every chunk of 4 consecutive elements of a row keeps 2, stored in order, so
   kept columns ``2c, 2c + 1`` belong to chunk ``c`` (logical columns ``4c .. 4c + 3``). This
   is exactly `Sparse24`'s ``values`` along the compressed axis (rows ``2g, 2g + 1`` of group
   ``g``), so a ``(16, 64)`` slice of ``values`` is the compressed A tile, transposed.
3. Metadata nibble (ISA 9.7.15.6.1): each chunk's two kept positions (0..3) are 2-bit
   indices in a 4-bit field; the nibbles 0b0000, 0b0101, 0b1010, 0b1111 (both indices equal)
   are undefined behaviour. Index of the first kept value in the low 2 bits, as in
   `Sparse24`'s ``meta``: this order is what the ISA's Figure 111 example shows for
   ``mma.sp``; [GPU] confirm it for wgmma (``benchmarks/wgmma_sp_probe.py``).
4. Sparsity selector (ISA 9.7.15.6.1, f16/bf16): "in a group of four consecutive threads,
   one or more threads store the metadata for the whole group"; for 16-bit types it is a
   thread pair, selector 0 = threads T0, T1 of each quad, 1 = T2, T3 (other values are
   undefined). It is an immediate (CUTLASS passes it as an ``"n"`` asm operand).
5. Metadata register (CUTLASS ``ELayout_64x32``: thread modes (2, 2, 8, 4) with strides
   (1024, 0, 1, 16), values (16, 2) with strides (64, 8), over the column-major 64 x 32 A):
   the selected thread ``j = threadID_in_group % 2`` of quad ``groupID`` in warp ``w`` holds,
   in bits 0..15, the nibbles of row ``16 w + groupID`` for logical columns
   ``16 j .. 16 j + 15`` (4 chunks, lowest chunk in the lowest nibble), and in bits 16..31
   the same columns of row ``16 w + groupID + 8``. The stride 0 is the selector: the two
   thread pairs of a quad map to the same metadata, and the selector says which one is read.
6. A from registers (CUTLASS ``ALayout_64x32``, which matches the ISA's dense m64nNk16
   register fragment applied to the 64 x 16 compressed tile): four .b32 registers, each two
   kept values of one chunk: ``a_i`` is row ``16 w + groupID + 8 ((i // 2) % 2)``, kept
   column ``2 threadID_in_group + (i % 2) + 8 (i // 4)``; register ``r`` packs
   ``a_{2r}`` (low half) and ``a_{2r+1}``. Register A must be K-major (CUTLASS asserts it).
7. A from shared memory (ISA: ``a-desc`` describes the M x K/2 compressed matrix; CUTLASS's
   ``Layout_*_SpAtom`` are the dense 16-bit canonical layouts with K stretched by 2): the
   smem tile is the 64 x 16 compressed tile with the dense wgmma descriptor rules; for
   16-bit types ``imm-trans-a`` = 1 takes it M-major, which is how `Sparse24` stores it
   (N fastest), so a TMA copy of a ``values`` tile needs no shuffle. CUTLASS's
   ``make_gmma_desc`` accepts, K-major, 2 x 16 bytes of K per row for sparse A (as for
   dense A) and 4 x 16 for sparse B (32 logical rows); M-major, a K extent of
   ``128 / bits`` per descriptor atom for sparse A against ``256 / bits`` for dense. [GPU]
   confirm the descriptors: ``benchmarks/wgmma_sp_probe.py`` tries no-swizzle K-major and
   M-major A; the swizzled layouts a TMA pipeline uses are still to be tried.
8. D (ISA, wgmma .f32 accumulator fragment; CUTLASS ``CLayout_64xN``): ``N / 2`` f32
   registers; ``d_i`` is row ``16 w + groupID + 8 ((i // 2) % 2)``, column
   ``8 (i // 4) + 2 threadID_in_group + (i % 2)``.
9. Operand order (CUTLASS's asm strings): ``wgmma.mma_async.sp.sync.aligned.m64nNk32.f32.bf16.bf16
   {d...}, a-desc | {a0..a3}, b-desc, sp-meta, sp-sel, scale-d, imm-scale-a, imm-scale-b
   [, imm-trans-a], imm-trans-b;``.

What is emulated and what is not: the emulation computes D exactly (float64 products and
sums, rounded to float32 at the end); the hardware's f32 accumulation order and rounding
are not specified by the ISA, so GPU tests compare with a tolerance. Whether the rules
above hold on the chip (notably 3, 5 and 7) can only be confirmed by running the
instruction on an H100/H200: ``python benchmarks/wgmma_sp_probe.py --build`` runs one
instruction per selector and A source on shuffled operands and compares (also
``tests/test_wgmma_sp_probe.py``, marked ``gpu``).

The shuffle (`wgmma_sp_meta_relayout`) turns `Sparse24`'s ``meta`` into the register order
of rule 5 once (at compress time or inside a kernel): same shape and dtype, so the TMA
tiles stay ``(tile_k / 32, tile_n)`` rectangles; each thread then loads one word per
instruction from a fixed column (`meta_word_column`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WARPGROUP_THREADS = 128
WARP_THREADS = 32
TILE_M = 64  # rows of A (output features) per instruction
TILE_K = 32  # logical reduction columns per instruction (16 kept)
KEPT_K = TILE_K // 2
A_REGISTERS = 4  # .b32 registers of A (two 16-bit kept values each)
CHUNK = 4  # elements of a 2:4 chunk
_INVALID_NIBBLES = (0b0000, 0b0101, 0b1010, 0b1111)


def thread_coords(thread: int) -> tuple[int, int, int]:
    """``(warp, groupID, threadID_in_group)`` of warpgroup thread ``thread`` (rule 1).

    >>> thread_coords(37)
    (1, 1, 1)
    """
    if not 0 <= thread < WARPGROUP_THREADS:
        raise ValueError(f"thread={thread}: expected 0 <= thread < {WARPGROUP_THREADS}")
    lane = thread % WARP_THREADS
    return thread // WARP_THREADS, lane >> 2, lane % 4


def a_register_coords(thread: int) -> list[tuple[int, int]]:
    """``(row, kept column)`` of ``a_0 .. a_7`` held by ``thread`` (rule 6).

    >>> a_register_coords(5)[:2], a_register_coords(5)[6:]
    ([(1, 2), (1, 3)], [(9, 10), (9, 11)])
    """
    warp, group, lane_in_quad = thread_coords(thread)
    return [
        (16 * warp + group + 8 * ((i // 2) % 2), 2 * lane_in_quad + (i % 2) + 8 * (i // 4))
        for i in range(2 * A_REGISTERS)
    ]


def meta_nibble_coords(thread: int, selector: int) -> list[tuple[int, int]] | None:
    """``(row, chunk)`` described by each nibble 0..7 of ``thread``'s metadata register, or
    None if the selector leaves that thread's register unread (rules 4, 5).

    Chunk ``c`` covers logical columns ``4c .. 4c + 3`` of the 32.

    >>> meta_nibble_coords(1, selector=0)
    [(0, 4), (0, 5), (0, 6), (0, 7), (8, 4), (8, 5), (8, 6), (8, 7)]
    >>> meta_nibble_coords(1, selector=1) is None
    True
    """
    _check_selector(selector)
    warp, group, lane_in_quad = thread_coords(thread)
    if lane_in_quad // 2 != selector:
        return None
    half = lane_in_quad % 2
    return [(16 * warp + group + 8 * (q // 4), 4 * half + q % 4) for q in range(8)]


def d_register_coords(thread: int, n: int) -> list[tuple[int, int]]:
    """``(row, column)`` of the f32 accumulators ``d_0 .. d_{n/2-1}`` of ``thread`` (rule 8).

    >>> d_register_coords(4, 8)
    [(1, 0), (1, 1), (9, 0), (9, 1)]
    """
    _check_n(n)
    warp, group, lane_in_quad = thread_coords(thread)
    return [
        (16 * warp + group + 8 * ((i // 2) % 2), 8 * (i // 4) + 2 * lane_in_quad + (i % 2))
        for i in range(n // 2)
    ]


def _check_selector(selector: int) -> None:
    if selector not in (0, 1):
        raise ValueError(f"selector={selector}: expected 0 (threads T0, T1) or 1 (T2, T3) for 16-bit types")


def _check_n(n: int) -> None:
    if not (8 <= n <= 256 and n % 8 == 0):
        raise ValueError(f"n={n}: wgmma m64nNk32 takes N a multiple of 8 in [8, 256]")


def _dense_a_from(kept: np.ndarray, meta_registers: np.ndarray, selector: int) -> np.ndarray:
    """The logical 64 x 32 A from the 64 x 16 kept values and the per-thread metadata."""
    meta_registers = np.asarray(meta_registers, np.uint32)
    if meta_registers.shape != (WARPGROUP_THREADS,):
        raise ValueError(f"meta_registers: shape {meta_registers.shape}, expected ({WARPGROUP_THREADS},) uint32")
    nibble = np.full((TILE_M, TILE_K // CHUNK), -1, np.int64)
    for thread in range(WARPGROUP_THREADS):
        coords = meta_nibble_coords(thread, selector)
        if coords is None:
            continue
        for q, (row, chunk) in enumerate(coords):
            if nibble[row, chunk] != -1:
                raise AssertionError(f"two threads describe row {row} chunk {chunk}")
            nibble[row, chunk] = (int(meta_registers[thread]) >> (4 * q)) & 0xF
    if (nibble < 0).any():
        raise AssertionError("some chunk has no metadata thread")
    dense = np.zeros((TILE_M, TILE_K), np.float64)
    for row in range(TILE_M):
        for chunk in range(TILE_K // CHUNK):
            value = int(nibble[row, chunk])
            if value in _INVALID_NIBBLES:
                raise ValueError(
                    f"metadata nibble {value:#06b} for row {row}, chunk {chunk}: both indices equal, "
                    "undefined behaviour in the ISA"
                )
            first, second = value & 3, value >> 2
            dense[row, CHUNK * chunk + first] += kept[row, 2 * chunk]
            dense[row, CHUNK * chunk + second] += kept[row, 2 * chunk + 1]
    return dense


def emulate_wgmma_sp(
    a: np.ndarray,
    meta_registers: np.ndarray,
    b: np.ndarray,
    *,
    selector: int = 0,
    a_source: str = "smem",
    c_registers: np.ndarray | None = None,
) -> np.ndarray:
    """One ``wgmma.mma_async.sp ... m64nNk32.f32`` as the ISA describes it, per thread.

    Args:
      a: ``a_source="smem"``: the ``(64, 16)`` kept-value tile (rules 2, 7);
        ``"registers"``: ``(128, 8)``, thread ``t``'s ``a_0 .. a_7`` (rule 6).
      meta_registers: ``(128,)`` uint32, each thread's ``sp-meta`` register (rule 5);
        registers of threads the selector does not pick are ignored.
      b: ``(32, N)`` dense B.
      selector: the ``sp-sel`` immediate (rule 4).
      c_registers: ``(128, N / 2)`` f32 accumulators to add to (``scale-d`` = 1), or None.

    Returns:
      ``(128, N / 2)`` float32: thread ``t``'s ``d_0 .. d_{N/2-1}`` (rule 8).

    >>> a = np.zeros((64, 16)); a[9, 10:12] = 2.0, 3.0  # row 9, chunk 5 keeps positions 1, 3
    >>> meta = np.full(128, 0x44444444, np.uint32)  # every nibble: positions 0, 1
    >>> meta[5] = 0x44D44444  # thread 5 (quad 1, half 1): row 9's chunk 5 is bits 20..23: 0b1101
    >>> b = np.eye(32, 8, k=-21)  # picks logical column 21 (= 4 * 5 + 1) into D column 0
    >>> d = emulate_wgmma_sp(a, meta, b)
    >>> gather_d(d)[9, 0]
    np.float32(2.0)
    """
    _check_selector(selector)
    b = np.asarray(b, np.float64)
    if b.ndim != 2 or b.shape[0] != TILE_K:
        raise ValueError(f"b: shape {b.shape}, expected ({TILE_K}, N)")
    n = b.shape[1]
    _check_n(n)
    a = np.asarray(a, np.float64)
    if a_source == "smem":
        if a.shape != (TILE_M, KEPT_K):
            raise ValueError(f"a: shape {a.shape}, expected ({TILE_M}, {KEPT_K}) kept values for a_source='smem'")
        kept = a
    elif a_source == "registers":
        if a.shape != (WARPGROUP_THREADS, 2 * A_REGISTERS):
            raise ValueError(f"a: shape {a.shape}, expected ({WARPGROUP_THREADS}, 8) for a_source='registers'")
        kept = np.full((TILE_M, KEPT_K), np.nan)
        for thread in range(WARPGROUP_THREADS):
            for i, (row, col) in enumerate(a_register_coords(thread)):
                kept[row, col] = a[thread, i]
        if np.isnan(kept).any():
            raise AssertionError("register layout leaves some kept value unheld")
    else:
        raise ValueError(f"a_source={a_source!r}: expected 'smem' or 'registers'")
    dense = _dense_a_from(kept, meta_registers, selector) @ b
    out = np.zeros((WARPGROUP_THREADS, n // 2), np.float64)
    for thread in range(WARPGROUP_THREADS):
        for i, (row, col) in enumerate(d_register_coords(thread, n)):
            out[thread, i] = dense[row, col]
    if c_registers is not None:
        out = out + np.asarray(c_registers, np.float64)
    return out.astype(np.float32)


def gather_d(d_registers: np.ndarray) -> np.ndarray:
    """``(128, N / 2)`` accumulator registers -> the ``(64, N)`` D they hold (rule 8)."""
    d_registers = np.asarray(d_registers)
    n = 2 * d_registers.shape[1]
    out = np.zeros((TILE_M, n), d_registers.dtype)
    for thread in range(WARPGROUP_THREADS):
        for i, (row, col) in enumerate(d_register_coords(thread, n)):
            out[row, col] = d_registers[thread, i]
    return out


# --- the shuffle: Sparse24 -> wgmma.sp operand order (jnp, jittable) ---


def combine_meta_words(word_row: jax.Array, word_row_plus_8: jax.Array, half: int) -> jax.Array:
    """One thread's ``sp-meta`` register from two `Sparse24` meta words (rule 5).

    ``word_row`` / ``word_row_plus_8`` describe logical columns 0..31 of rows ``r`` and
    ``r + 8`` (nibble ``c`` = chunk ``c``, as in `Sparse24`); ``half`` (0 or 1, the thread's
    ``threadID_in_group % 2``) picks columns ``16 half .. 16 half + 15`` of both. On the GPU
    this is one ``prmt.b32`` byte permute.

    >>> hex(int(combine_meta_words(jnp.uint32(0x76543210), jnp.uint32(0xFEDCBA98), 1)))
    '0xfedc7654'
    """
    if half not in (0, 1):
        raise ValueError(f"half={half}: expected 0 or 1")
    shift = jnp.uint32(16 * half)
    low = (jnp.asarray(word_row, jnp.uint32) >> shift) & jnp.uint32(0xFFFF)
    high = (jnp.asarray(word_row_plus_8, jnp.uint32) >> shift) & jnp.uint32(0xFFFF)
    return low | (high << jnp.uint32(16))


def wgmma_sp_meta_relayout(meta: jax.Array) -> jax.Array:
    """`Sparse24` ``meta`` of a ``(K, N)`` weight (axis 0) in ``sp-meta`` register order.

    Same shape ``(K / 32, N)`` and dtype; ``N`` must be a multiple of 64. In each block of
    64 columns, column ``16 w + 2 g + h`` is the register of the threads of warp ``w``, quad
    ``g``, ``threadID_in_group % 2 == h`` (either selector; rule 5); row ``k32`` is the
    instruction covering logical rows ``32 k32 .. 32 k32 + 31`` of ``W``. A kernel's thread
    loads column `meta_word_column` of its 64-column block.

    >>> meta = jnp.arange(64, dtype=jnp.uint32)[None, :] * jnp.uint32(0x00010001)
    >>> hex(int(wgmma_sp_meta_relayout(meta)[0, 1]))  # warp 0, quad 0, half 1: rows 0, 8
    '0x80000'
    """
    meta = jnp.asarray(meta)
    if meta.ndim != 2 or meta.dtype != jnp.uint32:
        raise ValueError(f"meta: shape {meta.shape} dtype {meta.dtype}, expected (K / 32, N) uint32")
    words, n = meta.shape
    if n % TILE_M:
        raise ValueError(f"meta: shape {meta.shape}, expected N (axis 1) a multiple of {TILE_M}; pad W's N first")
    # (words, block, warp, rows r / r + 8, quad) -> per (warp, quad, half) register.
    by_row = meta.reshape(words, n // TILE_M, 4, 2, 8)
    halves = [combine_meta_words(by_row[:, :, :, 0], by_row[:, :, :, 1], h) for h in (0, 1)]
    return jnp.stack(halves, axis=-1).reshape(words, n)  # (words, block, warp, quad, half)


def meta_word_column(thread: int) -> int:
    """Column, within a 64-column block of `wgmma_sp_meta_relayout`'s output, that
    ``thread`` loads into its ``sp-meta`` register (the same for either selector).

    >>> [meta_word_column(t) for t in (0, 1, 2, 3, 4, 32)]
    [0, 1, 0, 1, 2, 16]
    """
    warp, group, lane_in_quad = thread_coords(thread)
    return 16 * warp + 2 * group + lane_in_quad % 2


def meta_registers_from_relayout(relaid_block: np.ndarray) -> np.ndarray:
    """``(128,)`` uint32: each thread's load from one 64-word row of a relaid block."""
    relaid_block = np.asarray(relaid_block, np.uint32)
    if relaid_block.shape != (TILE_M,):
        raise ValueError(f"relaid_block: shape {relaid_block.shape}, expected ({TILE_M},)")
    return np.array([relaid_block[meta_word_column(t)] for t in range(WARPGROUP_THREADS)], np.uint32)


def a_registers_from_values(values_tile: jax.Array) -> jax.Array:
    """A-from-registers fragments from a ``(16, 64)`` `Sparse24` ``values`` tile (rule 6).

    ``values_tile`` is ``values[16 k32 : 16 k32 + 16, 64 b : 64 b + 64]`` of a ``(K, N)``
    weight compressed along axis 0, i.e. the compressed A tile transposed (rule 2).
    Returns ``(128, 8)``: thread ``t``'s ``a_0 .. a_7`` (pairs packed into the four .b32
    registers ``(a_0, a_1) .. (a_6, a_7)``, low half first).
    """
    values_tile = jnp.asarray(values_tile)
    if values_tile.shape != (KEPT_K, TILE_M):
        raise ValueError(f"values_tile: shape {values_tile.shape}, expected ({KEPT_K}, {TILE_M})")
    kept = values_tile.T  # (64 rows of A, 16 kept columns)
    # kept row = 16 w + 8 r + g, kept column = 8 s + 2 q + p; a_i with i = 4 s + 2 r + p.
    by_coord = kept.reshape(4, 2, 8, 2, 4, 2)  # (w, r, g, s, q, p)
    per_thread = by_coord.transpose(0, 2, 4, 3, 1, 5)  # (w, g, q, s, r, p)
    return per_thread.reshape(WARPGROUP_THREADS, 2 * A_REGISTERS)


def emulate_sparse24_matmul_t(values, meta, x, *, block_n: int = 8, selector: int = 0,
                              a_source: str = "smem") -> np.ndarray:
    """``Y.T = W.T @ x.T`` for a ``(K, N)`` `Sparse24` weight through emulated wgmma.sp calls.

    Tiles exactly as a kernel would: 64 output features by ``block_n`` tokens per
    instruction, one instruction per 32 of the reduction, accumulating in f32 registers;
    A from smem (the ``values`` tile as is) or registers (`a_registers_from_values`),
    metadata from `wgmma_sp_meta_relayout`. ``K`` a multiple of 32, ``N`` of 64, ``M``
    (rows of ``x``) of ``block_n``. Returns ``(N, M)`` float32.
    """
    values = jnp.asarray(values)
    k_half, n = values.shape
    m = x.shape[0]
    if x.shape[1] != 2 * k_half or k_half % KEPT_K or n % TILE_M or m % block_n:
        raise ValueError(
            f"values {values.shape}, x {x.shape}: expected x (M, K) with K = 2 * {k_half} a multiple of 32, "
            f"N a multiple of 64 and M of block_n={block_n}"
        )
    relaid = np.asarray(wgmma_sp_meta_relayout(meta))
    values_np = np.asarray(values.astype(jnp.float32), np.float64)
    xt = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64).T  # (K, M)
    out = np.zeros((n, m), np.float32)
    for nb in range(n // TILE_M):
        cols = slice(TILE_M * nb, TILE_M * nb + TILE_M)
        for mb in range(m // block_n):
            acc = np.zeros((WARPGROUP_THREADS, block_n // 2), np.float32)
            for k32 in range(k_half // KEPT_K):
                tile = values_np[KEPT_K * k32: KEPT_K * (k32 + 1), cols]
                a = tile.T if a_source == "smem" else np.asarray(a_registers_from_values(tile))
                meta_registers = meta_registers_from_relayout(relaid[k32, cols])
                b = xt[TILE_K * k32: TILE_K * (k32 + 1), block_n * mb: block_n * (mb + 1)]
                acc = emulate_wgmma_sp(a, meta_registers, b, selector=selector, a_source=a_source,
                                       c_registers=acc)
            out[cols, block_n * mb: block_n * (mb + 1)] = gather_d(acc)
    return out
