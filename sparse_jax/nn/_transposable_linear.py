"""`TransposableSparseLinear`: a trainable layer whose forward and backward matmuls are both 2:4.

With a transposable mask (2:4 along both axes of every 4x4 block, see
`sparse_jax.transposable_nm_mask`) the kernel ``W (in, out)`` is 2:4 along
``in`` *and* along ``out``. The layer keeps it compressed twice over the same
trainable values: once along ``in`` for ``y = x @ W`` and once as ``W.T``
along ``out`` for the input gradient ``dx = dY @ W.T``, so both products go
through `sparse_jax.matmul` on compressed weights. The weight gradient
``x.T @ dY`` is taken at the kept positions only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax._compressed import Sparse24, compress, decompress, gather_kept
from sparse_jax._matmul import matmul
from sparse_jax._transposable import transposable_nm_mask


class TransposedLayout(nnx.Variable):
    """Fixed layout of a `TransposableSparseLinear`: metadata and index arrays, not trained."""


@dataclasses.dataclass(frozen=True)
class _Config:
    shape: tuple[int, int]  # dense (in, out)
    impl: str


def _transposed_values(values: jax.Array, index: jax.Array) -> jax.Array:
    # The last slot is a zero for the padding rows of the transposed layout.
    flat = jnp.concatenate([values.reshape(-1), jnp.zeros((1,), values.dtype)])
    return flat[index]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _both_ways_matmul(x, values, meta, meta_t, index_t, cfg: _Config):
    return matmul(x, Sparse24(values, meta, cfg.shape, 0), impl=cfg.impl)


def _both_ways_fwd(x, values, meta, meta_t, index_t, cfg: _Config):
    return _both_ways_matmul(x, values, meta, meta_t, index_t, cfg), (x, values, meta, meta_t, index_t)


def _both_ways_bwd(cfg: _Config, residuals, g):
    x, values, meta, meta_t, index_t = residuals
    k, n = cfg.shape
    weight_t = Sparse24(_transposed_values(values, index_t), meta_t, (n, k), 0)
    dx = matmul(g.astype(x.dtype), weight_t, impl=cfg.impl).astype(x.dtype)
    dense_grad = jnp.dot(x.T, g, preferred_element_type=jnp.float32)
    dvalues = gather_kept(dense_grad, Sparse24(values, meta, cfg.shape, 0))
    return dx, dvalues.astype(values.dtype), None, None, None


_both_ways_matmul.defvjp(_both_ways_fwd, _both_ways_bwd)


def _exactly_two_per_group(mask: np.ndarray, axis: int) -> bool:
    groups = np.moveaxis(mask, axis, 0).reshape(-1, 4, mask.shape[1 - axis])
    return bool((groups.sum(axis=1) == 2).all())


class TransposableSparseLinear(nnx.Module):
    """``y = x @ W + b`` with ``W (in, out)`` transposable 2:4, trainable, compressed both ways.

    The kept values are an ``nnx.Param`` (the sparsity pattern is fixed);
    `sparse_jax.matmul` computes ``x @ W`` from ``W`` compressed along ``in``
    and the backward ``dY @ W.T`` from ``W.T`` compressed along ``out``,
    whose values are gathered from the same Param. Gradients equal those of
    the dense layer with the masked kernel (at the kept entries).

    Args:
      kernel: the dense ``(in, out)`` kernel; ``in`` and ``out`` multiples of 4.
      bias: optional ``(out,)`` bias.
      mask: a bool mask with exactly 2 kept in every group of 4 along both
        axes; default `sparse_jax.transposable_nm_mask` of ``kernel``.
      dtype: computation dtype (None: promote the input and the kernel).
      impl: `sparse_jax.matmul`'s ``impl``.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> w = jax.random.normal(jax.random.key(0), (32, 16))
      >>> layer = sparse_jax.nn.TransposableSparseLinear(w)
      >>> x = jnp.ones((3, 32))
      >>> masked_w = w * sparse_jax.transposable_nm_mask(w)
      >>> bool(jnp.allclose(layer(x), x @ masked_w, atol=1e-5))
      True
      >>> dx = jax.grad(lambda x: jnp.sum(layer(x)))(x)  # computed from W.T compressed
      >>> bool(jnp.allclose(dx, jnp.ones((3, 16)) @ masked_w.T, atol=1e-5))
      True
    """

    def __init__(
        self,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        dtype=None,
        impl: str = "auto",
    ):
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2 or kernel.shape[0] % 4 or kernel.shape[1] % 4:
            raise ValueError(
                "TransposableSparseLinear: kernel must be 2-d (in, out) with both sizes "
                f"multiples of 4, got shape {tuple(kernel.shape)}"
            )
        if mask is None:
            mask = transposable_nm_mask(kernel, 2, 4)
        mask = np.asarray(mask)
        if mask.shape != kernel.shape or mask.dtype != np.bool_:
            raise ValueError(
                f"TransposableSparseLinear: mask must be bool of shape {tuple(kernel.shape)}, "
                f"got {mask.dtype} of shape {mask.shape}"
            )
        for axis, name in ((0, "in"), (1, "out")):
            if not _exactly_two_per_group(mask, axis):
                raise ValueError(
                    f"TransposableSparseLinear: mask of shape {mask.shape} must keep exactly 2 "
                    f"of every 4 along axis {axis} ({name}); use sparse_jax.transposable_nm_mask"
                )
        self.in_features, self.out_features = kernel.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f"TransposableSparseLinear: bias has shape {tuple(bias.shape)}, "
                f"expected ({self.out_features},)"
            )
        # Positions come from the mask, not the values, so both layouts keep
        # the same entries even where a kept weight is exactly 0.
        pattern = compress(jnp.asarray(mask, kernel.dtype), axis=0)
        pattern_t = compress(jnp.asarray(mask.T, kernel.dtype), axis=0)
        values = gather_kept(kernel, pattern)
        # index_t[j] = where, in values.ravel(), W.T's kept value j lives.
        ordinal = jnp.arange(1, values.size + 1, dtype=jnp.int32).reshape(values.shape)
        dense_ordinal = decompress(Sparse24(ordinal, pattern.meta, pattern.shape, 0))
        index_t = gather_kept(dense_ordinal.T, Sparse24(pattern_t.values, pattern_t.meta, pattern_t.shape, 0)) - 1
        index_t = jnp.where(index_t < 0, values.size, index_t)
        self.values = nnx.Param(values)
        self.meta = TransposedLayout(pattern.meta)
        self.meta_t = TransposedLayout(pattern_t.meta)
        self.index_t = TransposedLayout(index_t)
        self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else None
        self.dtype = dtype
        self.impl = impl

    @classmethod
    def from_linear(cls, linear: nnx.Linear, *, mask: jax.Array | None = None, impl: str = "auto"):
        """From an ``nnx.Linear``: its kernel on ``mask`` (default: its transposable 2:4 mask)."""
        bias = linear.bias[...] if linear.bias is not None else None
        return cls(linear.kernel[...], bias, mask=mask, dtype=linear.dtype, impl=impl)

    @property
    def kernel(self) -> Sparse24:
        """``W`` compressed along ``in`` (axis 0)."""
        return Sparse24(self.values[...], self.meta[...], (self.in_features, self.out_features), 0)

    @property
    def kernel_t(self) -> Sparse24:
        """``W.T`` compressed along ``out`` (its axis 0): the operand of ``dY @ W.T``."""
        values_t = _transposed_values(self.values[...], self.index_t[...])
        return Sparse24(values_t, self.meta_t[...], (self.out_features, self.in_features), 0)

    def __call__(self, x: jax.Array) -> jax.Array:
        values = self.values[...]
        dtype = self.dtype or jnp.result_type(x.dtype, values.dtype)
        x = jnp.asarray(x, dtype)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"TransposableSparseLinear: x has shape {x.shape}; expected (..., {self.in_features})"
            )
        cfg = _Config(shape=(self.in_features, self.out_features), impl=self.impl)
        y = _both_ways_matmul(
            x.reshape(-1, self.in_features),
            values.astype(dtype),
            self.meta[...],
            self.meta_t[...],
            self.index_t[...],
            cfg,
        ).reshape(x.shape[:-1] + (self.out_features,))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y
