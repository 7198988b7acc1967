"""The NumPy emulation of sparse wgmma's operand layout, and the Sparse24 -> register shuffle.

References are independent of the code under test: float64 ``decompress(s).T @ x.T``, plain
loops over the ISA's statements, and hand-worked cases. Whether the ISA reading itself is
right can only be checked on a Hopper GPU (see the module docstring's [GPU] marks).
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax
from sparse_jax.kernels import _wgmma_sp_layout as wl
from tests._sparse_data import as_f64, random_24, random_x


def test_docstring_examples():
    result = doctest.testmod(wl, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("selector", [0, 1])
def test_metadata_threads_cover_every_chunk_once(selector):
    seen = {}
    for thread in range(128):
        coords = wl.meta_nibble_coords(thread, selector)
        if coords is None:
            continue
        for q, rc in enumerate(coords):
            assert rc not in seen, (rc, seen.get(rc), thread)
            seen[rc] = (thread, q)
    assert set(seen) == {(r, c) for r in range(64) for c in range(8)}
    # 64 threads (two per quad) carry metadata: the ISA's "thread pair" for 16-bit types.
    assert len({t for t, _ in seen.values()}) == 64


def test_metadata_hand_worked_cases():
    # Selector 0: T0 of warp 0 has row 0 (bits 0..15) and row 8 (bits 16..31), columns 0..15.
    assert wl.meta_nibble_coords(0, 0) == [(0, 0), (0, 1), (0, 2), (0, 3), (8, 0), (8, 1), (8, 2), (8, 3)]
    # Selector 1 moves it to T2 (T0 unread); warp 3 quad 7 is rows 55 and 63.
    assert wl.meta_nibble_coords(0, 1) is None
    assert wl.meta_nibble_coords(2, 1) == wl.meta_nibble_coords(0, 0)
    assert wl.meta_nibble_coords(96 + 28 + 3, 1) == [(55, 4), (55, 5), (55, 6), (55, 7),
                                                     (63, 4), (63, 5), (63, 6), (63, 7)]
    with pytest.raises(ValueError, match="selector=2"):
        wl.meta_nibble_coords(0, 2)


def test_a_and_d_registers_cover_their_tiles_once():
    a_held = [rc for t in range(128) for rc in wl.a_register_coords(t)]
    assert sorted(a_held) == [(r, c) for r in range(64) for c in range(16)]
    for n in (8, 64, 256):
        d_held = [rc for t in range(128) for rc in wl.d_register_coords(t, n)]
        assert sorted(d_held) == [(r, c) for r in range(64) for c in range(n)]
    # Each .b32 register of A packs the two kept values of one chunk (same row, columns 2c, 2c+1).
    for t in range(128):
        coords = wl.a_register_coords(t)
        for r in range(4):
            (row0, col0), (row1, col1) = coords[2 * r], coords[2 * r + 1]
            assert row0 == row1 and col0 % 2 == 0 and col1 == col0 + 1


def _random_tile(rng, dtype=np.float32):
    """A 64 x 32 2:4 A, its 64 x 16 kept values and per-(row, chunk) nibbles, by plain loops."""
    dense = np.zeros((64, 32))
    kept = np.zeros((64, 16))
    nibbles = np.zeros((64, 8), np.int64)
    for row in range(64):
        for chunk in range(8):
            first, second = sorted(rng.choice(4, 2, replace=False))
            a, b = rng.normal(size=2).astype(dtype)
            dense[row, 4 * chunk + first], dense[row, 4 * chunk + second] = a, b
            kept[row, 2 * chunk], kept[row, 2 * chunk + 1] = a, b
            nibbles[row, chunk] = first | (second << 2)
    return dense, kept, nibbles


def _registers_from_isa(nibbles, selector, rng):
    """sp-meta per thread straight from the ISA statements; unread threads get garbage."""
    regs = rng.integers(0, 2**32, 128, dtype=np.uint64).astype(np.uint32)
    for t in range(128):
        warp, group, q = t // 32, (t % 32) // 4, t % 4
        if q // 2 != selector:
            continue
        word = 0
        for nib in range(8):
            row = 16 * warp + group + 8 * (nib // 4)
            chunk = 4 * (q % 2) + nib % 4
            word |= int(nibbles[row, chunk]) << (4 * nib)
        regs[t] = word
    return regs


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("a_source", ["smem", "registers"])
def test_one_instruction_matches_dense_product(selector, a_source):
    rng = np.random.default_rng(selector)
    dense, kept, nibbles = _random_tile(rng)
    b = rng.normal(size=(32, 24))
    c = rng.normal(size=(128, 12)).astype(np.float32)
    regs = _registers_from_isa(nibbles, selector, rng)
    if a_source == "registers":
        a = np.array([[kept[r, col] for r, col in wl.a_register_coords(t)] for t in range(128)])
    else:
        a = kept
    d = wl.emulate_wgmma_sp(a, regs, b, selector=selector, a_source=a_source, c_registers=c)
    np.testing.assert_allclose(wl.gather_d(d), dense @ b + wl.gather_d(c), rtol=1e-5, atol=1e-5)


def test_selected_pair_decides_the_result():
    rng = np.random.default_rng(3)
    dense, kept, nibbles = _random_tile(rng)
    b = rng.normal(size=(32, 8))
    regs = _registers_from_isa(nibbles, 0, rng)
    for t in range(128):  # valid but wrong metadata (positions 2, 3) for the unselected pair
        if t % 4 >= 2:
            regs[t] = 0xEEEEEEEE
    good = wl.gather_d(wl.emulate_wgmma_sp(kept, regs, b, selector=0))
    np.testing.assert_allclose(good, dense @ b, rtol=1e-5, atol=1e-5)
    bad = wl.gather_d(wl.emulate_wgmma_sp(kept, regs, b, selector=1))
    assert not np.allclose(bad, dense @ b, atol=1e-3)


def test_invalid_nibble_is_an_error():
    rng = np.random.default_rng(4)
    _, kept, nibbles = _random_tile(rng)
    nibbles[17, 3] = 0b0101  # both indices 1: undefined behaviour per the ISA
    regs = _registers_from_isa(nibbles, 0, rng)
    with pytest.raises(ValueError, match="row 17, chunk 3"):
        wl.emulate_wgmma_sp(kept, regs, np.ones((32, 8)))


def test_relayout_puts_each_sparse24_nibble_where_the_isa_reads_it():
    key = jax.random.key(5)
    w = random_24(key, (64, 128))
    s = sparse_jax.compress(w)
    relaid = np.asarray(jax.jit(wl.wgmma_sp_meta_relayout)(s.meta))
    assert relaid.shape == s.meta.shape and relaid.dtype == np.uint32
    meta = np.asarray(s.meta)
    for selector in (0, 1):
        for k32 in range(2):
            for block in range(2):
                regs = wl.meta_registers_from_relayout(relaid[k32, 64 * block: 64 * block + 64])
                for t in range(128):
                    coords = wl.meta_nibble_coords(t, selector)
                    if coords is None:
                        continue
                    for q, (row, chunk) in enumerate(coords):
                        want = (int(meta[k32, 64 * block + row]) >> (4 * chunk)) & 0xF
                        assert (int(regs[t]) >> (4 * q)) & 0xF == want


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("a_source", ["smem", "registers"])
@pytest.mark.parametrize("selector", [0, 1])
def test_emulated_kernel_matches_float64_decompress(dtype, a_source, selector):
    key = jax.random.key(6)
    k, n, m = 96, 128, 16
    w = random_24(key, (k, n), dtype)
    x = random_x(jax.random.fold_in(key, 1), (m, k), dtype)
    s = sparse_jax.compress(w)
    y_t = wl.emulate_sparse24_matmul_t(s.values, s.meta, x, block_n=8, selector=selector,
                                       a_source=a_source)
    ref = as_f64(sparse_jax.decompress(s)).T @ as_f64(x).T
    np.testing.assert_allclose(y_t, ref, rtol=1e-5, atol=1e-4)


def test_a_registers_shuffle_matches_isa_coordinates():
    values_tile = jnp.arange(16 * 64, dtype=jnp.float32).reshape(16, 64)
    regs = np.asarray(jax.jit(wl.a_registers_from_values)(values_tile))
    for t in (0, 5, 37, 127):
        for i, (row, col) in enumerate(wl.a_register_coords(t)):
            assert regs[t, i] == values_tile[col, row]


def test_bad_inputs_name_shape_and_expectation():
    with pytest.raises(ValueError, match=r"meta: shape \(2, 96\).*multiple of 64"):
        wl.wgmma_sp_meta_relayout(jnp.zeros((2, 96), jnp.uint32))
    with pytest.raises(ValueError, match=r"values_tile: shape \(16, 32\)"):
        wl.a_registers_from_values(jnp.zeros((16, 32)))
    with pytest.raises(ValueError, match=r"b: shape \(16, 8\)"):
        wl.emulate_wgmma_sp(np.zeros((64, 16)), np.zeros(128, np.uint32), np.zeros((16, 8)))
    with pytest.raises(ValueError, match="n=12"):
        wl.emulate_wgmma_sp(np.zeros((64, 16)), np.zeros(128, np.uint32), np.zeros((32, 12)))
