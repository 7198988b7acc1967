"""Compressed checkpoints: exact round trip, sizes, and errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import sparse_jax
from sparse_jax import _checkpoint


def pruned_tree(dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {
        "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 64, 128)).astype(dtype),
                 "bias": jnp.arange(128, dtype=dtype)},
        "dense": {"kernel": jax.random.normal(keys[1], (512, 256)).astype(dtype)},
        "stem": {"kernel": jax.random.normal(keys[2], (3, 3, 3, 8)).astype(dtype)},
    }
    return sparse_jax.prune(params)


@pytest.mark.parametrize(
    "dtype, expected_fraction",
    [(jnp.bfloat16, 0.5625), (jnp.float16, 0.5625), (jnp.float32, 0.53125)],
)
def test_round_trip_is_exact_and_sizes_follow_the_format(tmp_path, dtype, expected_fraction):
    params, masks = pruned_tree(dtype)
    stats = sparse_jax.save_compressed(tmp_path / "sparse", params, masks)
    assert (stats.compressed_leaves, stats.dense_leaves) == (2, 2)

    restored = sparse_jax.restore_compressed(tmp_path / "sparse")
    for (path, want), got in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(restored)
    ):
        assert got.dtype == want.dtype, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # Compressed leaves alone: values (half) + 2 bits per kept value.
    pruned_bytes = sum(params[k]["kernel"].nbytes for k in ("conv", "dense"))
    other_bytes = params["conv"]["bias"].nbytes + params["stem"]["kernel"].nbytes
    fraction = (stats.stored_bytes - other_bytes) / pruned_bytes
    assert fraction == pytest.approx(expected_fraction)

    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "dense", jax.tree.map(np.asarray, params))
    dense_disk = _checkpoint.directory_bytes(tmp_path / "dense")
    print(f"{np.dtype(dtype).name}: stored {stats.stored_fraction:.3f} of dense bytes; on disk "
          f"{stats.disk_bytes:,} vs dense checkpoint {dense_disk:,} "
          f"({stats.disk_bytes / dense_disk:.3f})")
    assert stats.disk_bytes < dense_disk


def test_restore_as_sparse_and_into_an_nnx_state(tmp_path):
    model = nnx.Sequential(nnx.Linear(32, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 8, rngs=nnx.Rngs(1)))
    params, masks = sparse_jax.prune(nnx.state(model, nnx.Param))
    nnx.update(model, params)
    sparse_jax.save_compressed(tmp_path / "ckpt", nnx.state(model, nnx.Param), masks)

    compressed = sparse_jax.restore_compressed(tmp_path / "ckpt", as_sparse=True)
    kernel = compressed["layers"]["0"]["kernel"]
    assert isinstance(kernel, sparse_jax.Sparse24) and kernel.shape == (32, 16)
    np.testing.assert_array_equal(sparse_jax.decompress(kernel), params["layers"][0]["kernel"][...])

    fresh = nnx.Sequential(nnx.Linear(32, 16, rngs=nnx.Rngs(5)), nnx.Linear(16, 8, rngs=nnx.Rngs(6)))
    restored = sparse_jax.restore_compressed(tmp_path / "ckpt", target=nnx.state(fresh, nnx.Param))
    nnx.update(fresh, restored)
    x = jax.random.normal(jax.random.key(0), (4, 32))
    np.testing.assert_array_equal(fresh(x), model(x))


def test_masked_leaf_that_is_not_2_4_raises(tmp_path):
    params, masks = pruned_tree(jnp.float32)
    dense = dict(params, dense={"kernel": jnp.ones((512, 256))})
    with pytest.raises(ValueError, match=r"dense/kernel \(512, 256\): masked but not 2:4 along axis 0"):
        sparse_jax.save_compressed(tmp_path / "bad", dense, masks)


def test_without_masks_only_2_4_leaves_are_compressed(tmp_path):
    params, _ = pruned_tree(ml_dtypes.bfloat16)
    params = dict(params, dense={"kernel": jnp.ones((512, 256), jnp.bfloat16)})  # dense again
    stats = sparse_jax.save_compressed(tmp_path / "ckpt", params)
    assert stats.compressed_leaves == 1  # conv only
    restored = sparse_jax.restore_compressed(tmp_path / "ckpt")
    np.testing.assert_array_equal(restored["dense"]["kernel"], params["dense"]["kernel"])
