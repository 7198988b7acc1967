"""SparseGPT and Wanda layer pruning against NumPy references written here."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax


# ---------------------------------------------------------------- references


def reference_sparsegpt(kernel, hessian, n=2, m=4, damp=0.01):
    """SparseGPT Algorithm 1 (N:M), float64, one input (column) at a time.

    ``kernel`` is (in, out): the paper's W transposed. No blocking: every
    pruned input's error updates all later inputs at once. Returns
    ``(pruned, mask, min_margin)``, the last being the smallest relative gap
    between the n-th and (n+1)-th score of any group (how far from a tie the
    mask choice was).
    """
    w = np.array(kernel, np.float64).copy()
    h = np.array(hessian, np.float64).copy()
    size, outputs = w.shape
    for i in range(size):
        if h[i, i] == 0:  # dead input
            h[i, i] = 1.0
            w[i, :] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(size)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, u.T @ u = inv(h)
    mask = np.zeros((size, outputs), bool)
    min_margin = np.inf
    for j in range(size):
        if j % m == 0:
            for o in range(outputs):
                scores = [w[j + k, o] ** 2 / u[j + k, j + k] ** 2 for k in range(m)]
                order = sorted(range(m), key=lambda k: (-scores[k], k))
                for k in order[:n]:
                    mask[j + k, o] = True
                if 0 < n < m:
                    hi, lo = scores[order[n - 1]], scores[order[n]]
                    min_margin = min(min_margin, (hi - lo) / max(hi, 1e-300))
        error = np.where(mask[j], 0.0, w[j] / u[j, j])  # (out,)
        w[j:] -= np.outer(u[j, j:], error)
    return np.where(mask, w, 0.0), mask, min_margin


def reference_wanda(kernel, act_sq_norms, n=2, m=4):
    w = np.asarray(kernel, np.float64)
    score = np.abs(w) * np.sqrt(np.asarray(act_sq_norms, np.float64))[:, None]
    mask = np.zeros(w.shape, bool)
    for g in range(0, w.shape[0], m):
        for o in range(w.shape[1]):
            order = sorted(range(m), key=lambda k: (-score[g + k, o], k))
            mask[[g + k for k in order[:n]], o] = True
    return np.where(mask, w, 0.0), mask


def correlated_inputs(rng, tokens, features, outliers=4, scale=20.0):
    """Correlated features (a random mixing) with a few high-variance ones."""
    base = rng.standard_normal((tokens, features))
    mixing = np.eye(features) + 0.4 * rng.standard_normal((features, features)) / np.sqrt(
        features
    )
    x = base @ mixing
    chosen = rng.choice(features, outliers, replace=False)
    x[:, chosen] *= scale
    return x


def reconstruction_error(x, kernel, pruned):
    x = np.asarray(x, np.float64)
    diff = x @ np.asarray(kernel, np.float64) - x @ np.asarray(pruned, np.float64)
    return float(np.sum(diff**2))


def group_counts(mask, m, axis=0):
    moved = np.moveaxis(np.asarray(mask), axis, 0)
    return moved.reshape(moved.shape[0] // m, m, -1).sum(axis=1)


# ---------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("size,outputs,block_size", [(64, 24, 128), (128, 16, 32), (96, 8, 8)])
def test_sparsegpt_matches_numpy_algorithm_1(size, outputs, block_size):
    rng = np.random.default_rng(size + outputs)
    x = correlated_inputs(rng, 4 * size, size)
    kernel = rng.standard_normal((size, outputs))
    hessian = x.T @ x
    want, want_mask, margin = reference_sparsegpt(kernel, hessian)
    assert margin > 1e-4, "test data has a near-tie; pick another seed"
    pruned, mask = sparse_jax.sparsegpt(
        jnp.asarray(kernel, jnp.float32), jnp.asarray(hessian, jnp.float32),
        block_size=block_size,
    )
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    err, want_err = reconstruction_error(x, kernel, pruned), reconstruction_error(x, kernel, want)
    assert abs(err - want_err) <= 0.01 * want_err
    np.testing.assert_allclose(np.asarray(pruned), want, rtol=1e-2, atol=1e-3)


def test_sparsegpt_block_size_only_changes_speed():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 72))  # 72 inputs: blocks of 16 need padding
    kernel = jnp.asarray(rng.standard_normal((72, 10)), jnp.float32)
    hessian = jnp.asarray(x.T @ x, jnp.float32)
    want, want_mask, _ = reference_sparsegpt(kernel, hessian)
    for block_size in (4, 16, 64, 128):
        pruned, mask = sparse_jax.sparsegpt(kernel, hessian, block_size=block_size)
        np.testing.assert_array_equal(np.asarray(mask), want_mask)
        np.testing.assert_allclose(np.asarray(pruned), want, rtol=1e-3, atol=1e-4)


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    # H = I: U is diagonal, so there are no updates and the score is w^2.
    kernel = jax.random.normal(jax.random.key(0), (32, 8))
    pruned, mask = sparse_jax.sparsegpt(kernel, jnp.eye(32), damp=0.0)
    want = np.abs(np.asarray(kernel)).reshape(8, 4, 8).argsort(axis=1).argsort(axis=1) >= 2
    np.testing.assert_array_equal(np.asarray(mask), want.reshape(32, 8))
    np.testing.assert_array_equal(np.asarray(pruned), np.where(want.reshape(32, 8), kernel, 0))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_sparsegpt_other_patterns_match_reference(n, m):
    rng = np.random.default_rng(10 * n + m)
    x = correlated_inputs(rng, 256, 48)
    kernel = rng.standard_normal((48, 6))
    want, want_mask, margin = reference_sparsegpt(kernel, x.T @ x, n=n, m=m)
    assert margin > 1e-4
    pruned, mask = sparse_jax.sparsegpt(
        jnp.asarray(kernel, jnp.float32), jnp.asarray(x.T @ x, jnp.float32), n=n, m=m
    )
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    assert (group_counts(mask, m) == n).all()
    err, want_err = reconstruction_error(x, kernel, pruned), reconstruction_error(x, kernel, want)
    assert abs(err - want_err) <= 0.01 * want_err


def test_dead_inputs_are_zeroed_as_in_the_paper():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 32))
    x[:, [3, 17, 18]] = 0.0  # never active: zero rows/columns in H
    kernel = rng.standard_normal((32, 12))
    hessian = x.T @ x
    want, want_mask, _ = reference_sparsegpt(kernel, hessian)
    pruned, mask = sparse_jax.sparsegpt(
        jnp.asarray(kernel, jnp.float32), jnp.asarray(hessian, jnp.float32)
    )
    assert np.isfinite(np.asarray(pruned)).all()
    assert (np.asarray(pruned)[[3, 17, 18]] == 0).all()
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    np.testing.assert_allclose(np.asarray(pruned), want, rtol=1e-3, atol=1e-4)
    assert (group_counts(mask, 4) == 2).all()


def test_error_orders_sparsegpt_then_wanda_then_magnitude():
    rng = np.random.default_rng(0)
    size, outputs = 256, 64
    x = correlated_inputs(rng, 1024, size, outliers=8, scale=25.0)
    kernel = jnp.asarray(rng.standard_normal((size, outputs)) / np.sqrt(size), jnp.float32)
    stats = sparse_jax.CalibrationStats.zeros(size).update(jnp.asarray(x, jnp.float32))

    gpt, gpt_mask = sparse_jax.sparsegpt(kernel, stats.xtx)
    wan, wan_mask = sparse_jax.wanda(kernel, stats.sq_norms)
    mag, mag_masks = sparse_jax.prune({"dense": {"kernel": kernel}})
    mag, mag_mask = mag["dense"]["kernel"], mag_masks["dense"]["kernel"]

    errors = {
        name: reconstruction_error(x, kernel, p)
        for name, p in (("sparsegpt", gpt), ("wanda", wan), ("magnitude", mag))
    }
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    for pruned, mask in ((gpt, gpt_mask), (wan, wan_mask), (mag, mag_mask)):
        assert (group_counts(mask, 4) == 2).all()
        assert (group_counts(np.asarray(pruned) != 0, 4) <= 2).all()
        assert not np.asarray(pruned)[~np.asarray(mask)].any()


def test_sparsegpt_bf16_kernel_in_bf16_out():
    rng = np.random.default_rng(7)
    x = correlated_inputs(rng, 512, 64)
    kernel = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    upcast = np.asarray(kernel.astype(jnp.float32), np.float64)
    want, want_mask, _ = reference_sparsegpt(upcast, x.T @ x)
    pruned, mask = sparse_jax.sparsegpt(kernel, jnp.asarray(x.T @ x, jnp.float32))
    assert pruned.dtype == jnp.bfloat16 and mask.dtype == jnp.bool_
    assert (group_counts(mask, 4) == 2).all()
    assert (group_counts(np.asarray(pruned.astype(jnp.float32)) != 0, 4) <= 2).all()
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    err, want_err = reconstruction_error(x, upcast, pruned), reconstruction_error(x, upcast, want)
    assert abs(err - want_err) <= 0.01 * want_err


def test_sparsegpt_any_axis_and_nd_kernels():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((256, 32))
    hessian = x.T @ x
    # (out, in) with axis=1 / axis=-1: the transposed problem.
    kernel = rng.standard_normal((12, 32))
    want, want_mask, _ = reference_sparsegpt(kernel.T, hessian)
    for axis in (1, -1):
        pruned, mask = sparse_jax.sparsegpt(
            jnp.asarray(kernel, jnp.float32), jnp.asarray(hessian, jnp.float32), axis=axis
        )
        assert pruned.shape == (12, 32)
        np.testing.assert_array_equal(np.asarray(mask), want_mask.T)
        np.testing.assert_allclose(np.asarray(pruned), want.T, rtol=1e-3, atol=1e-4)
    # 3-D (a, in, b), axis=1: every (a, b) pair is an output.
    kernel3 = rng.standard_normal((3, 32, 5))
    flat = np.moveaxis(kernel3, 1, 0).reshape(32, 15)
    want, want_mask, _ = reference_sparsegpt(flat, hessian)
    pruned, mask = sparse_jax.sparsegpt(
        jnp.asarray(kernel3, jnp.float32), jnp.asarray(hessian, jnp.float32), axis=1
    )
    assert pruned.shape == kernel3.shape and mask.shape == kernel3.shape
    np.testing.assert_array_equal(np.moveaxis(np.asarray(mask), 1, 0).reshape(32, 15), want_mask)
    np.testing.assert_allclose(
        np.moveaxis(np.asarray(pruned), 1, 0).reshape(32, 15), want, rtol=1e-3, atol=1e-4
    )
    assert (group_counts(mask, 4, axis=1) == 2).all()


def test_sparsegpt_runs_under_jit():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((128, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    eager = sparse_jax.sparsegpt(kernel, x.T @ x)
    jitted = jax.jit(lambda k, h: sparse_jax.sparsegpt(k, h))(kernel, x.T @ x)
    np.testing.assert_array_equal(np.asarray(eager[1]), np.asarray(jitted[1]))


@pytest.mark.parametrize(
    "kernel_shape,hessian_shape,kwargs,match",
    [
        ((16, 4), (16, 8), {}, "square"),
        ((16, 4), (16,), {}, "square"),
        ((16, 4), (12, 12), {}, r"expected \(16, 16\)"),
        ((4, 16), (4, 4), {"axis": 1}, r"expected \(16, 16\)"),
        ((18, 4), (18, 18), {}, "multiple of m=4"),
        ((16, 4), (16, 16), {"block_size": 6}, "block_size"),
        ((16, 4), (16, 16), {"axis": 2}, "out of range"),
        ((16, 4), (16, 16), {"n": 5}, "larger than m"),
        ((16, 4), (16, 16), {"damp": -1.0}, "damp"),
    ],
)
def test_sparsegpt_bad_arguments_raise(kernel_shape, hessian_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparse_jax.sparsegpt(jnp.ones(kernel_shape), jnp.ones(hessian_shape), **kwargs)


def test_integer_kernel_raises():
    with pytest.raises(TypeError, match="floating"):
        sparse_jax.sparsegpt(jnp.ones((8, 2), jnp.int32), jnp.eye(8))
    with pytest.raises(TypeError, match="floating"):
        sparse_jax.wanda(jnp.ones((8, 2), jnp.int32), jnp.ones(8))


# ---------------------------------------------------------------- Wanda


def test_wanda_matches_numpy_score():
    rng = np.random.default_rng(4)
    x = correlated_inputs(rng, 300, 64)
    kernel = rng.standard_normal((64, 20))
    norms_sq = (x**2).sum(axis=0)
    want, want_mask = reference_wanda(kernel, norms_sq)
    pruned, mask = sparse_jax.wanda(
        jnp.asarray(kernel, jnp.float32), jnp.asarray(norms_sq, jnp.float32)
    )
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    np.testing.assert_array_equal(np.asarray(pruned), want.astype(np.float32))
    assert (group_counts(mask, 4) == 2).all()


def test_wanda_bf16_axis_and_shapes():
    rng = np.random.default_rng(6)
    kernel = jnp.asarray(rng.standard_normal((10, 3, 16)), jnp.bfloat16)  # inputs on axis 2
    norms_sq = rng.uniform(0.1, 50.0, 16)
    pruned, mask = sparse_jax.wanda(kernel, jnp.asarray(norms_sq, jnp.float32), axis=-1)
    assert pruned.dtype == jnp.bfloat16 and pruned.shape == kernel.shape
    flat = np.moveaxis(np.asarray(kernel.astype(jnp.float32)), 2, 0).reshape(16, 30)
    want, want_mask = reference_wanda(flat, norms_sq)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(mask), 2, 0).reshape(16, 30), want_mask)
    # kept weights are exactly the original bf16 values
    np.testing.assert_array_equal(
        np.asarray(pruned.astype(jnp.float32)),
        np.where(np.asarray(mask), np.asarray(kernel.astype(jnp.float32)), 0.0),
    )
    assert (group_counts(mask, 4, axis=2) == 2).all()
    with pytest.raises(ValueError, match=r"expected \(16,\)"):
        sparse_jax.wanda(kernel, jnp.ones(10), axis=-1)
    with pytest.raises(ValueError, match=r"expected \(10,\)"):
        sparse_jax.wanda(jnp.ones((10, 4)), jnp.ones((10, 1)), n=1, m=2)


# ---------------------------------------------------------------- statistics


def test_calibration_stats_accumulate_batches_with_padding():
    rng = np.random.default_rng(8)
    batches = [rng.standard_normal((2, 7, 12)), rng.standard_normal((3, 5, 12))]
    masks = [rng.uniform(size=(2, 7)) > 0.3, None]
    stats = sparse_jax.CalibrationStats.zeros(12)
    tokens = []
    for x, keep in zip(batches, masks):
        stats = stats.update(jnp.asarray(x, jnp.bfloat16), keep)
        x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
        tokens.append(x[keep] if keep is not None else x.reshape(-1, 12))
    tokens = np.concatenate(tokens)
    assert int(stats.count) == tokens.shape[0]
    np.testing.assert_allclose(np.asarray(stats.xtx), tokens.T @ tokens, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(stats.sq_norms), (tokens**2).sum(0), rtol=1e-5)
    assert stats.xtx.dtype == jnp.float32


def test_calibration_stats_in_a_scan_and_without_hessian():
    xs = jax.random.normal(jax.random.key(1), (4, 6, 8))
    stats, _ = jax.lax.scan(
        lambda s, x: (s.update(x), None), sparse_jax.CalibrationStats.zeros(8), xs
    )
    flat = np.asarray(xs, np.float64).reshape(-1, 8)
    np.testing.assert_allclose(np.asarray(stats.xtx), flat.T @ flat, rtol=1e-5, atol=1e-5)
    light = sparse_jax.CalibrationStats.zeros(8, with_hessian=False).update(xs)
    assert light.xtx is None and int(light.count) == 24
    np.testing.assert_allclose(np.asarray(light.sq_norms), (flat**2).sum(0), rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 8\)"):
        stats.update(jnp.ones((3, 7)))
    with pytest.raises(ValueError, match="token_mask"):
        stats.update(jnp.ones((3, 8)), jnp.ones((4,), bool))

