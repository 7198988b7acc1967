"""The compressed 2:4 format: layout against a NumPy reference, exact round trip, pytree use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax
from sparse_jax import Sparse24, compress, decompress


def _random_24(key, shape, axis=0, dtype=jnp.float32):
    """Random 2:4 tensor along ``axis`` whose kept entries are never zero."""
    # Magnitudes in [1, ~5) with random signs: kept entries are never zero.
    w = jnp.abs(jax.random.normal(key, shape, dtype=jnp.float32)) + 1.0
    w = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, shape), w, -w)
    w = w.astype(dtype)
    return w * sparse_jax.nm_mask(w, axis=axis).astype(dtype)


def _numpy_compress(w: np.ndarray):
    """Independent per-column loop over groups: (values, meta) of a 2-D ``(K, N)`` ``w``."""
    k, n = w.shape
    kp = -(-k // 32) * 32
    wp = np.zeros((kp, n), w.dtype)
    wp[:k] = w
    values = np.zeros((kp // 2, n), w.dtype)
    meta = np.zeros((kp // 32, n), np.uint64)
    for col in range(n):
        for g in range(kp // 4):
            group = wp[4 * g : 4 * g + 4, col]
            nz = [p for p in range(4) if group[p] != 0]
            fill = [p for p in range(4) if group[p] == 0]
            kept = sorted((nz + fill)[:2])
            for slot, p in enumerate(kept):
                j = 2 * g + slot
                values[j, col] = group[p]
                meta[j // 16, col] |= np.uint64(p) << np.uint64(2 * (j % 16))
    return values, meta.astype(np.uint32)


@pytest.mark.parametrize(
    "shape, dtype",
    [((32, 8), jnp.float32), ((8, 3), jnp.bfloat16), ((100, 5), jnp.float16), ((64, 1), jnp.float32)],
)
def test_layout_matches_numpy_reference(shape, dtype):
    w = _random_24(jax.random.key(sum(shape)), shape, dtype=dtype)
    s = compress(w)
    values, meta = _numpy_compress(np.asarray(w))
    assert s.values.dtype == dtype and s.meta.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(s.values), values)
    np.testing.assert_array_equal(np.asarray(s.meta), meta)


def test_hand_worked_metadata_word():
    # One column, 32 rows; group g keeps positions (g % 4, 3) for g < 3, then (0, 1).
    w = np.zeros((32, 1), np.float32)
    w[0, 0], w[3, 0] = 1.0, 2.0  # group 0: positions 0, 3 -> nibble 0b1100
    w[5, 0], w[7, 0] = 3.0, 4.0  # group 1: positions 1, 3 -> nibble 0b1101
    w[10, 0], w[11, 0] = 5.0, 6.0  # group 2: positions 2, 3 -> nibble 0b1110
    w[13, 0] = 7.0  # group 3: positions 0 (zero fill), 1 -> nibble 0b0100
    s = compress(jnp.asarray(w))
    expected = 0b1100 | 0b1101 << 4 | 0b1110 << 8 | 0b0100 << 12 | 0b0100 * sum(16**g for g in range(4, 8))
    assert int(s.meta[0, 0]) == expected
    np.testing.assert_array_equal(np.asarray(s.values[:8, 0]), [1, 2, 3, 4, 5, 6, 0, 7])


@pytest.mark.parametrize(
    "shape, axis, dtype",
    [
        ((64, 16), 0, jnp.float32),
        ((12, 7), 0, jnp.bfloat16),
        ((5, 36), 1, jnp.float16),
        ((3, 3, 8, 4), 2, jnp.bfloat16),
        ((3, 3, 8, 4), -2, jnp.float32),
    ],
)
def test_round_trip_is_exact(shape, axis, dtype):
    w = _random_24(jax.random.key(len(shape) + shape[0]), shape, axis=axis, dtype=dtype)
    s = compress(w, axis=axis)
    assert s.shape == shape and s.axis == axis % len(shape)
    back = decompress(s)
    assert back.dtype == w.dtype and back.shape == w.shape
    np.testing.assert_array_equal(np.asarray(back), np.asarray(w))


def test_round_trip_keeps_groups_with_fewer_than_two_nonzeros():
    w = np.zeros((8, 4), np.float32)
    w[3, 0] = -1.5  # one non-zero at the last position
    w[4, 1] = 2.5
    w[6, 1] = -0.25
    s = compress(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(decompress(s)), w)


def test_not_24_raises_with_count():
    w = np.zeros((8, 2), np.float32)
    w[:3, 0] = 1.0  # 3 non-zeros in group 0 of column 0
    w[4:8, 1] = 1.0  # 4 non-zeros in group 1 of column 1
    with pytest.raises(ValueError, match=r"2 of 4 groups of 4 have more than 2 non-zeros"):
        compress(jnp.asarray(w))


def test_prune_on_the_way_matches_nm_mask():
    w = jax.random.normal(jax.random.key(3), (16, 8))
    s = compress(w, prune=True)
    expected = w * sparse_jax.nm_mask(w, axis=0)
    np.testing.assert_array_equal(np.asarray(decompress(s)), np.asarray(expected))


def test_bad_inputs_name_shape():
    with pytest.raises(ValueError, match=r"\(6, 2\).*not a multiple of 4"):
        compress(jnp.ones((6, 2)))
    with pytest.raises(ValueError, match="out of range"):
        compress(jnp.ones((8, 2)), axis=2)
    with pytest.raises(TypeError, match="floating point"):
        compress(jnp.ones((8, 2), jnp.int32))


def test_pytree_jit_and_tree_map():
    w = _random_24(jax.random.key(5), (32, 8))
    s = compress(w)
    leaves, treedef = jax.tree.flatten(s)
    assert len(leaves) == 2
    doubled = jax.tree.map(lambda a: a * 2 if a.dtype == jnp.float32 else a, s)
    np.testing.assert_array_equal(np.asarray(decompress(doubled)), np.asarray(2 * w))
    jitted = jax.jit(lambda t: decompress(t) + 1.0)(s)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(w + 1.0))
    assert isinstance(jax.jit(lambda a: compress(a))(w), Sparse24)


def test_sharding_keeps_layout():
    devices = np.array(jax.devices()[:4])
    mesh = jax.sharding.Mesh(devices, ("model",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
    w = _random_24(jax.random.key(6), (64, 16))
    s = jax.device_put(compress(w), spec)
    assert s.values.sharding == spec and s.meta.sharding == spec
    np.testing.assert_array_equal(np.asarray(jax.jit(decompress)(s)), np.asarray(w))


def test_orbax_save_restore(tmp_path):
    import orbax.checkpoint as ocp

    w = _random_24(jax.random.key(7), (64, 8), dtype=jnp.bfloat16)
    s = compress(w)
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, s)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, jax.tree.map(jnp.zeros_like, s))
    assert isinstance(restored, Sparse24) and restored.shape == s.shape
    assert restored.values.dtype == jnp.bfloat16 and restored.meta.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(restored.meta), np.asarray(s.meta))
    np.testing.assert_array_equal(np.asarray(decompress(restored)), np.asarray(w))


def test_gather_kept_is_transpose_of_decompress():
    w = _random_24(jax.random.key(8), (32, 4))
    s = compress(w)
    cotangent = jax.random.normal(jax.random.key(9), w.shape)
    _, vjp = jax.vjp(lambda v: decompress(Sparse24(v, s.meta, s.shape, s.axis)), s.values)
    (expected,) = vjp(cotangent)
    np.testing.assert_array_equal(
        np.asarray(sparse_jax.gather_kept(cotangent, s)), np.asarray(expected)
    )
