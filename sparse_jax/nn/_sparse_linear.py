"""`SparseLinear`: an NNX dense layer whose kernel is stored compressed 2:4."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax._compressed import Sparse24, compress, decompress
from sparse_jax._matmul import matmul


class SparseMeta(nnx.Variable):
    """Packed 2-bit positions of a compressed kernel: state, but not a trainable Param."""


class SparseLinear(nnx.Module):
    """``y = x @ W + b`` with ``W`` (in, out) held as a 2:4 `Sparse24` along ``in``.

    The kept values are an ``nnx.Param`` (trainable with the pattern fixed:
    `sparse_jax.matmul` gives them a gradient); the metadata is a
    `SparseMeta` variable. Products accumulate in float32 whatever the
    ``precision`` of the ``nnx.Linear`` it came from.

    Args:
      kernel: the compressed ``(in_features, out_features)`` kernel, axis 0.
      bias: optional ``(out_features,)`` bias.
      dtype: computation dtype (None: promote the input and the kernel).
      impl: `sparse_jax.matmul`'s ``impl``.

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
    ):
        if not isinstance(kernel, Sparse24) or kernel.ndim != 2 or kernel.axis != 0:
            raise ValueError(
                "SparseLinear: kernel must be a 2-d Sparse24 (in, out) compressed along "
                f"axis 0, got {type(kernel).__name__}"
                + (f" of shape {kernel.shape}, axis {kernel.axis}" if isinstance(kernel, Sparse24) else "")
            )
        self.in_features, self.out_features = kernel.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f"SparseLinear: bias has shape {tuple(bias.shape)}, expected ({self.out_features},)"
            )
        self.values = nnx.Param(kernel.values)
        self.meta = SparseMeta(kernel.meta)
        self.bias = nnx.Param(bias) if bias is not None else None
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.impl = impl

    @property
    def kernel(self) -> Sparse24:
        """The compressed kernel as a `Sparse24`."""
        return Sparse24(
            self.values[...], self.meta[...], (self.in_features, self.out_features), 0
        )

    @classmethod
    def from_linear(cls, linear: nnx.Linear, *, prune: bool = False, impl: str = "auto"):
        """Compresses an ``nnx.Linear`` whose kernel is 2:4 along its input axis.

        Args:
          linear: the layer; its kernel must be 2:4 along axis 0 unless ``prune``.
          prune: keep the 2 largest magnitudes per group instead of requiring 2:4.
          impl: `sparse_jax.matmul`'s ``impl`` for the new layer.
        """
        kernel = compress(linear.kernel[...], axis=0, prune=prune)
        bias = linear.bias[...] if linear.bias is not None else None
        return cls(kernel, bias, dtype=linear.dtype, param_dtype=linear.param_dtype, impl=impl)

    def to_linear(self) -> nnx.Linear:
        """The equivalent ``nnx.Linear`` with the decompressed (masked dense) kernel."""
        linear = nnx.Linear(
            self.in_features,
            self.out_features,
            use_bias=self.bias is not None,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nnx.initializers.zeros_init(),
            rngs=nnx.Rngs(0),
        )
        linear.kernel[...] = decompress(self.kernel)
        if self.bias is not None:
            linear.bias[...] = self.bias[...]
        return linear

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.values.dtype)
        kernel = Sparse24(kernel.values.astype(dtype), kernel.meta, kernel.shape, 0)
        y = matmul(jnp.asarray(x, dtype), kernel, impl=self.impl)
        if self.bias is not None:
            bias = self.bias[...].astype(dtype)
            y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
        return y
