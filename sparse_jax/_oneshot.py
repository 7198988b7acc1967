"""One-shot N:M pruning of a single layer from calibration statistics.

Two layer-level methods, both for a kernel whose groups of ``m`` run along
``axis`` (the input axis; axis 0 of a Flax ``Dense`` kernel ``(in, out)``):

* `sparsegpt` (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can
  Be Accurately Pruned in One-Shot", Algorithm 1, N:M variant): inputs are
  processed one at a time; at the first input of every group of ``m`` the mask
  keeps the ``n`` entries of largest ``w^2 / [H^-1]_jj^2`` per output, and the
  error of each pruned input is compensated by the optimal update of the inputs
  not yet processed, through the upper Cholesky factor of the damped inverse
  Hessian ``H = X^T X``.
* `wanda` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
  Language Models"): score ``|W_ij| * ||X_i||_2``, the ``n`` best of every
  group of ``m`` inputs per output; kept weights are unchanged.

Both compute in float32 whatever the kernel's dtype and return the pruned
kernel in that dtype. For an N-D kernel the rule is simple: the statistics
cover exactly the entries of ``axis`` and every other axis is an output.
For a convolution kernel ``(h, w, in, out)`` that means, with ``axis=2``, one
Hessian over the input channels shared by all spatial taps (the taps'
cross-correlations ignored). The exact layer objective instead contracts over
``(h, w, in)`` jointly: reshape the kernel to ``(h * w * in, out)``, pass the
Hessian of the image patches flattened in the same ``(h, w, in)`` order and
``axis=0``; as ``in`` is innermost, groups of ``m`` along the flattened axis
are then groups of ``m`` input channels at one tap (when ``m`` divides
``in``), i.e. the same N:M pattern along ``in``.

`CalibrationStats` accumulates the statistics both methods need from batches
of layer inputs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _patterns

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------
# calibration statistics
# --------------------------------------------------------------------------


class CalibrationStats(NamedTuple):
    """Running input statistics of one layer (a pytree; memory O(in^2)).

    Attributes:
      xtx: ``(in, in)`` float32, ``sum over tokens of x x^T`` (the Hessian
        `sparsegpt` takes; its scale does not matter to the result).
      sq_norms: ``(in,)`` float32, ``sum over tokens of x_i^2`` (what `wanda`
        takes; equal to the diagonal of ``xtx``, kept separately so Wanda-only
        users can pass ``with_hessian=False`` and skip the O(in^2) part).
      count: int32 scalar, the number of tokens seen.

    Example:
      >>> import jax.numpy as jnp, sparse_jax
      >>> stats = sparse_jax.CalibrationStats.zeros(3)
      >>> stats = stats.update(jnp.ones((2, 5, 3)))   # (batch, tokens, in)
      >>> int(stats.count), stats.sq_norms.tolist()
      (10, [10.0, 10.0, 10.0])
      >>> stats.xtx.shape
      (3, 3)
    """

    xtx: jax.Array | None
    sq_norms: jax.Array
    count: jax.Array

    @classmethod
    def zeros(cls, in_features: int, *, with_hessian: bool = True) -> "CalibrationStats":
        """Empty statistics for a layer with ``in_features`` inputs."""
        if not isinstance(in_features, (int, np.integer)) or in_features < 1:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        xtx = jnp.zeros((in_features, in_features), jnp.float32) if with_hessian else None
        return cls(xtx, jnp.zeros((in_features,), jnp.float32), jnp.zeros((), jnp.int32))

    def update(self, x: jax.Array, token_mask: jax.Array | None = None) -> "CalibrationStats":
        """Adds a batch of layer inputs ``x`` of shape ``(..., in)``.

        Args:
          x: the inputs the layer saw; every leading axis counts as tokens.
          token_mask: optional bool array of ``x.shape[:-1]``; tokens where it
            is False (padding) are left out.

        Returns:
          The updated statistics (a new value; jitted, usable under ``jit``
          and ``lax.scan``).
        """
        return update_calibration_stats(self, x, token_mask)


def update_calibration_stats(
    stats: CalibrationStats, x: jax.Array, token_mask: jax.Array | None = None
) -> CalibrationStats:
    """Functional form of `CalibrationStats.update`."""
    x = jnp.asarray(x)
    features = stats.sq_norms.shape[0]
    if x.ndim < 1 or x.shape[-1] != features:
        raise ValueError(
            f"calibration inputs x have shape {x.shape}; expected (..., {features}) "
            f"(the statistics were made for {features} inputs)"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"calibration inputs x need a floating dtype, got {x.dtype}")
    if token_mask is not None:
        token_mask = jnp.asarray(token_mask)
        if token_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"token_mask has shape {token_mask.shape}; expected x.shape[:-1] = "
                f"{x.shape[:-1]} (x has shape {x.shape})"
            )
    return _update_stats(stats, x, token_mask)


@jax.jit
def _update_stats(stats, x, token_mask):
    tokens = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if token_mask is None:
        count = tokens.shape[0]
    else:
        keep = token_mask.reshape(-1)
        tokens = jnp.where(keep[:, None], tokens, 0.0)
        count = jnp.sum(keep, dtype=jnp.int32)
    xtx = stats.xtx
    if xtx is not None:
        xtx = xtx + jnp.matmul(tokens.T, tokens, precision=_HIGHEST)
    sq_norms = stats.sq_norms + jnp.sum(tokens * tokens, axis=0)
    return CalibrationStats(xtx, sq_norms, stats.count + count)


# --------------------------------------------------------------------------
# argument checks shared by both methods
# --------------------------------------------------------------------------


def _check_kernel(name: str, kernel: jax.Array, n: int, m: int, axis: int) -> int:
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(
            f"{name}: kernel needs a floating dtype, got {kernel.dtype} with shape "
            f"{kernel.shape}"
        )
    if kernel.ndim < 1:
        raise ValueError(f"{name}: kernel must have at least one axis, got a scalar")
    return _patterns.check_nm_args(
        kernel.shape, n, m, axis, where=f"{name}: kernel {tuple(kernel.shape)}: "
    )


def _as_matrix(kernel: jax.Array, axis: int) -> jax.Array:
    """(in, outputs) float32 view: ``axis`` first, the other axes flattened."""
    moved = jnp.moveaxis(kernel, axis, 0)
    return moved.reshape(moved.shape[0], -1).astype(jnp.float32)


def _from_matrix(matrix: jax.Array, kernel: jax.Array, axis: int) -> jax.Array:
    moved_shape = (kernel.shape[axis],) + tuple(
        s for i, s in enumerate(kernel.shape) if i != axis
    )
    return jnp.moveaxis(matrix.reshape(moved_shape), 0, axis)


# --------------------------------------------------------------------------
# SparseGPT
# --------------------------------------------------------------------------


def sparsegpt(
    kernel: jax.Array,
    hessian: jax.Array,
    *,
    n: int = 2,
    m: int = 4,
    axis: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT N:M pruning of one layer with optimal weight reconstruction.

    Algorithm 1 of Frantar & Alistarh (2023) in its N:M form: the inputs
    (entries of ``axis``) are processed in order; at the first input of each
    group of ``m`` the mask keeps, for every output, the ``n`` entries of the
    group with the largest ``w^2 / [U]_jj^2``, where ``U`` is the upper
    Cholesky factor of ``(H + lambda I)^-1``; the error of each pruned input
    is then spread over the inputs not yet processed (the optimal update),
    ``block_size`` inputs at a time with lazy updates of the rest. Because the
    mask is chosen from the already-updated weights, it generally differs from
    the magnitude or Wanda mask.

    Dead inputs (``H_jj == 0``, never active in the calibration data) get
    ``H_jj = 1`` and their weights set to 0, as in the paper's implementation.
    Damping ``lambda = damp * mean(diag(H))`` keeps the inverse well defined.
    A Hessian that is not positive semi-definite (or has NaNs) gives NaNs.

    Everything is computed in float32; the pruned kernel comes back in the
    kernel's dtype with the pruned entries exactly 0.

    Args:
      kernel: the layer's weights; the groups of ``m`` run along ``axis``
        (0 for a Dense kernel ``(in, out)``). Every other axis is an output.
      hessian: ``(k, k)`` with ``k = kernel.shape[axis]``: ``X^T X`` over the
        calibration tokens, ``X`` the layer inputs ``(tokens, k)`` (e.g.
        ``CalibrationStats.xtx``). Its overall scale does not matter.
      n: entries kept per group.
      m: group size; must divide ``kernel.shape[axis]``.
      axis: the input axis the groups and the Hessian run along.
      block_size: inputs per lazy-update block; a multiple of ``m``. Only
        speed depends on it (the result is the same up to rounding).
      damp: relative dampening of the Hessian's diagonal.

    Returns:
      ``(pruned_kernel, mask)``: the updated and pruned kernel (kernel's dtype
      and shape) and the bool mask, exactly ``n`` of every ``m`` along ``axis``.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> x = jax.random.normal(jax.random.key(0), (256, 8))      # calibration inputs
      >>> kernel = jax.random.normal(jax.random.key(1), (8, 3))   # Dense (in, out)
      >>> pruned, mask = sparse_jax.sparsegpt(kernel, x.T @ x)
      >>> mask.sum(axis=0).tolist()                               # 2 of every 4 inputs
      [4, 4, 4]
      >>> bool(sparse_jax.is_nm_sparse(pruned, 2, 4, axis=0))
      True
      >>> dense_err = jnp.sum((x @ kernel - x @ jnp.where(mask, kernel, 0)) ** 2)
      >>> bool(jnp.sum((x @ kernel - x @ pruned) ** 2) < dense_err)  # beats masking alone
      True
    """
    kernel = jnp.asarray(kernel)
    hessian = jnp.asarray(hessian)
    axis = _check_kernel("sparsegpt", kernel, n, m, axis)
    size = kernel.shape[axis]
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(
            f"sparsegpt: hessian must be a square matrix (X^T X over the inputs), "
            f"got shape {hessian.shape}"
        )
    if hessian.shape != (size, size):
        raise ValueError(
            f"sparsegpt: hessian has shape {hessian.shape} but kernel "
            f"{tuple(kernel.shape)} has {size} inputs along axis {axis}; expected "
            f"({size}, {size})"
        )
    if not jnp.issubdtype(hessian.dtype, jnp.floating):
        raise TypeError(f"sparsegpt: hessian needs a floating dtype, got {hessian.dtype}")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1 or block_size % m:
        raise ValueError(
            f"sparsegpt: block_size must be a positive multiple of m={m} (so no group "
            f"straddles two blocks), got {block_size!r}"
        )
    if not 0 <= float(damp) < float("inf"):
        raise ValueError(f"sparsegpt: damp must be >= 0 and finite, got {damp!r}")
    pruned, mask = _sparsegpt(
        kernel,
        hessian,
        jnp.float32(damp),
        n=int(n),
        m=int(m),
        axis=axis,
        block_size=int(min(block_size, size)),
    )
    return pruned, mask


def _inverse_hessian_factor(hessian: jax.Array, damp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Upper Cholesky factor U of the damped inverse (U^T U = (H + lambda I)^-1).

    With J the order-reversing permutation and J H J = L L^T, the inverse is
    H^-1 = (J L^-T J)(J L^-1 J) and J L^-1 J is upper triangular with a
    positive diagonal: it is U. One Cholesky and one triangular inverse, no
    explicit inverse of H.
    """
    h = hessian.astype(jnp.float32)
    h = 0.5 * (h + h.T)
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    damping = damp * jnp.mean(jnp.diagonal(h))
    h = h + damping * jnp.eye(h.shape[0], dtype=jnp.float32)
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    eye = jnp.eye(h.shape[0], dtype=jnp.float32)
    lower_inverse = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    upper = lower_inverse[::-1, ::-1]
    return upper, dead


@functools.partial(jax.jit, static_argnames=("n", "m", "axis", "block_size"))
def _sparsegpt(kernel, hessian, damp, *, n, m, axis, block_size):
    weights = _as_matrix(kernel, axis)  # (in, out), inputs are the rows
    size, outputs = weights.shape
    upper, dead = _inverse_hessian_factor(hessian, damp)
    weights = jnp.where(dead[:, None], 0.0, weights)

    # Pad the inputs to whole blocks with inert entries: zero weights and an
    # identity block in U (no coupling to the real inputs, zero error).
    padded = -(-size // block_size) * block_size
    if padded != size:
        extra = padded - size
        weights = jnp.pad(weights, ((0, extra), (0, 0)))
        upper = jnp.pad(upper, ((0, extra), (0, extra)))
        upper = upper.at[size:, size:].set(jnp.eye(extra, dtype=jnp.float32))
    groups_per_block = block_size // m
    column = jnp.arange(padded)
    block_column = jnp.arange(block_size)

    def prune_block(block, carry):
        weights, mask = carry
        start = block * block_size
        block_weights = jax.lax.dynamic_slice_in_dim(weights, start, block_size, 0)
        factor_rows = jax.lax.dynamic_slice_in_dim(upper, start, block_size, 0)
        factor = jax.lax.dynamic_slice_in_dim(factor_rows, start, block_size, 1)

        def prune_group(group, state):
            block_weights, block_mask, errors = state
            first = group * m
            group_weights = jax.lax.dynamic_slice_in_dim(block_weights, first, m, 0)
            group_rows = jax.lax.dynamic_slice_in_dim(factor, first, m, 0)  # (m, block)
            group_factor = jax.lax.dynamic_slice_in_dim(group_rows, first, m, 1)  # (m, m)
            group_diag = jnp.diagonal(group_factor)
            score = group_weights**2 / (group_diag[:, None] ** 2)
            group_mask = _patterns._nm_mask(score, n=n, m=m, axis=0)
            group_errors = []
            for j in range(m):  # static: m is small; U upper, so only rows >= j change
                error = jnp.where(group_mask[j], 0.0, group_weights[j]) / group_diag[j]
                group_weights = group_weights - group_factor[j][:, None] * error[None, :]
                group_errors.append(error)
            group_errors = jnp.stack(group_errors)
            block_weights = jax.lax.dynamic_update_slice_in_dim(
                block_weights, group_weights, first, 0
            )
            # Lazy update of the block's rows after this group (a rank-m update).
            later_in_block = jnp.where(block_column[None, :] >= first + m, group_rows, 0.0)
            block_weights = block_weights - jnp.matmul(
                later_in_block.T, group_errors, precision=_HIGHEST
            )
            block_mask = jax.lax.dynamic_update_slice_in_dim(block_mask, group_mask, first, 0)
            errors = jax.lax.dynamic_update_slice_in_dim(errors, group_errors, first, 0)
            return block_weights, block_mask, errors

        block_mask = jnp.zeros((block_size, outputs), bool)
        errors = jnp.zeros((block_size, outputs), jnp.float32)
        block_weights, block_mask, errors = jax.lax.fori_loop(
            0, groups_per_block, prune_group, (block_weights, block_mask, errors)
        )
        weights = jax.lax.dynamic_update_slice_in_dim(weights, block_weights, start, 0)
        mask = jax.lax.dynamic_update_slice_in_dim(mask, block_mask, start, 0)
        # Lazy update of the inputs after this block (earlier ones are final).
        later = jnp.where(column[None, :] >= start + block_size, factor_rows, 0.0)
        weights = weights - jnp.matmul(later.T, errors, precision=_HIGHEST)
        return weights, mask

    mask = jnp.zeros((padded, outputs), bool)
    weights, mask = jax.lax.fori_loop(0, padded // block_size, prune_block, (weights, mask))
    weights, mask = weights[:size], mask[:size]
    pruned = jnp.where(mask, weights.astype(kernel.dtype), jnp.zeros((), kernel.dtype))
    return _from_matrix(pruned, kernel, axis), _from_matrix(mask, kernel, axis)


# --------------------------------------------------------------------------
# Wanda
# --------------------------------------------------------------------------


def wanda(
    kernel: jax.Array,
    act_sq_norms: jax.Array,
    *,
    n: int = 2,
    m: int = 4,
    axis: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Wanda N:M pruning of one layer: weight magnitude times input norm.

    The score of weight ``(i, o)`` is ``|W_io| * ||X_i||_2`` (input ``i``,
    output ``o``); for every output the ``n`` best of each group of ``m``
    inputs along ``axis`` are kept, unchanged (Sun et al. 2023, with the
    comparison group per output as in the paper). Ties go to the lower index.

    Args:
      kernel: the layer's weights; groups of ``m`` run along ``axis``.
      act_sq_norms: ``(k,)`` with ``k = kernel.shape[axis]``: the sum over
        calibration tokens of ``x_i^2`` (e.g. ``CalibrationStats.sq_norms``).
        Its scale does not matter; entries must be >= 0.
      n: entries kept per group.
      m: group size; must divide ``kernel.shape[axis]``.
      axis: the input axis.

    Returns:
      ``(pruned_kernel, mask)`` in the kernel's dtype and shape; the mask keeps
      exactly ``n`` of every ``m`` along ``axis``.

    Example:
      >>> import jax.numpy as jnp, sparse_jax
      >>> kernel = jnp.array([[1.0], [2.0], [3.0], [4.0]])   # (in=4, out=1)
      >>> norms_sq = jnp.array([100.0, 1.0, 1.0, 1.0])       # input 0 is an outlier
      >>> pruned, mask = sparse_jax.wanda(kernel, norms_sq)
      >>> pruned.ravel().tolist()                            # 1*10 and 4*1 win
      [1.0, 0.0, 0.0, 4.0]
    """
    kernel = jnp.asarray(kernel)
    act_sq_norms = jnp.asarray(act_sq_norms)
    axis = _check_kernel("wanda", kernel, n, m, axis)
    size = kernel.shape[axis]
    if act_sq_norms.shape != (size,):
        raise ValueError(
            f"wanda: act_sq_norms has shape {act_sq_norms.shape} but kernel "
            f"{tuple(kernel.shape)} has {size} inputs along axis {axis}; expected ({size},)"
        )
    if not jnp.issubdtype(act_sq_norms.dtype, jnp.floating):
        raise TypeError(f"wanda: act_sq_norms needs a floating dtype, got {act_sq_norms.dtype}")
    return _wanda(kernel, act_sq_norms, n=int(n), m=int(m), axis=axis)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def _wanda(kernel, act_sq_norms, *, n, m, axis):
    weights = _as_matrix(kernel, axis)
    norms = jnp.sqrt(act_sq_norms.astype(jnp.float32))
    score = jnp.abs(weights) * norms[:, None]
    mask = _from_matrix(_patterns._nm_mask(score, n=n, m=m, axis=0), kernel, axis)
    pruned = jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))
    return pruned, mask
