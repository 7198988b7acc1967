"""`SparseLinear`: an NNX dense layer whose kernel is stored compressed 2:4."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax._compressed import Sparse24
from sparse_jax._matmul import matmul
from sparse_jax.nn._base import (
    SparseKernelLayer,
    SparseMeta,
    _new_variable,
    carried_over,
    compress_layer_kernel,
)

__all__ = ["SparseLinear", "SparseMeta"]


def add_bias(y: jax.Array, bias, dtype) -> jax.Array:
    if bias is None:
        return y
    bias = bias[...].astype(dtype)
    return y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)


def constrain(y: jax.Array, out_sharding) -> jax.Array:
    """The ``out_sharding`` the NNX layers accept, as a sharding constraint."""
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


class SparseLinear(SparseKernelLayer):
    """``y = x @ W + b`` with ``W`` (in, out) held as a 2:4 `Sparse24` along ``in``.

    The kept values are an ``nnx.Param`` (trainable with the pattern fixed:
    `sparse_jax.matmul` gives them a gradient); the metadata is a
    `SparseMeta` variable. Products accumulate in float32 whatever the
    ``precision`` of the ``nnx.Linear`` it came from.

    Args:
      kernel: the compressed ``(in_features, out_features)`` kernel, axis 0
        (with ``stacked`` leading layer axes: ``(L, in, out)``, axis 1, ...).
      bias: optional ``(out_features,)`` bias (``(L, out_features)`` stacked).
      dtype: computation dtype (None: promote the input and the kernel).
      impl: `sparse_jax.matmul`'s ``impl``.
      stacked: leading layer axes of a layer made under ``nnx.vmap`` and run
        under ``nnx.scan``, which slices them off before the forward pass.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> from flax import nnx
      >>> dense = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
      >>> layer = sparse_jax.nn.SparseLinear.from_linear(dense, prune=True)
      >>> x = jnp.ones((2, 16))
      >>> w = dense.kernel[...] * sparse_jax.nm_mask(dense.kernel[...], axis=0)
      >>> bool(jnp.allclose(layer(x), x @ w + dense.bias[...], atol=1e-5))
      True
    """

    def __init__(
        self,
        kernel: Sparse24,
        bias: jax.Array | None = None,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        impl: str = "auto",
        stacked: int = 0,
        kernel_metadata: dict | None = None,
        bias_metadata: dict | None = None,
    ):
        if not isinstance(kernel, Sparse24) or kernel.ndim != 2 + stacked or kernel.axis != stacked:
            raise ValueError(
                f"SparseLinear: kernel must be a {2 + stacked}-d Sparse24 "
                f"({'L, ' * stacked}in, out) compressed along axis {stacked}, got "
                f"{type(kernel).__name__}"
                + (
                    f" of shape {kernel.shape}, axis {kernel.axis}"
                    if isinstance(kernel, Sparse24)
                    else ""
                )
            )
        self.in_features, self.out_features = kernel.shape[stacked:]
        expected_bias = tuple(kernel.shape[:stacked]) + (self.out_features,)
        if bias is not None and tuple(bias.shape) != expected_bias:
            raise ValueError(
                f"SparseLinear: bias has shape {tuple(bias.shape)}, expected {expected_bias}"
            )
        self._set_kernel(kernel, kernel.shape[stacked:], 0, stacked, kernel_metadata)
        self.bias = (
            _new_variable(nnx.Param, bias, dict(bias_metadata or {})) if bias is not None else None
        )
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.impl = impl

    @classmethod
    def from_linear(cls, linear: nnx.Linear, *, prune: bool = False, impl: str = "auto"):
        """Compresses an ``nnx.Linear`` whose kernel is 2:4 along its input axis.

        A kernel with extra leading axes (``(L, in, out)``, from ``nnx.vmap``)
        is a stack of layers; each is compressed along its own input axis.

        Args:
          linear: the layer; its kernel must be 2:4 along axis 0 unless ``prune``.
          prune: keep the 2 largest magnitudes per group instead of requiring 2:4.
          impl: `sparse_jax.matmul`'s ``impl`` for the new layer.
        """
        kernel, stacked = compress_layer_kernel(linear.kernel[...], 2, 0, prune=prune)
        bias, carried = carried_over(linear)
        return cls(kernel, bias, impl=impl, stacked=stacked, **carried)

    def to_linear(self) -> nnx.Linear:
        """The equivalent ``nnx.Linear`` with the decompressed (masked dense) kernel."""
        return self._dense_equivalent(nnx.Linear, self.in_features, self.out_features)

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        values = self.values[...]
        dtype = self.dtype or jnp.result_type(x.dtype, values.dtype)
        y = matmul(jnp.asarray(x, dtype), self._layer_kernel(dtype), impl=self.impl)
        return constrain(add_bias(y, self.bias, dtype), out_sharding)
