"""What every compressed NNX layer shares: the kernel's storage and its 2-D matmul view."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax._compressed import AXIS_ALIGN, Sparse24, compress, decompress


class SparseMeta(nnx.Variable):
    """Packed 2-bit positions of a compressed kernel: state, but not a trainable Param."""


def _metadata(variable: Any) -> dict:
    get_metadata = getattr(variable, "get_metadata", None)
    return dict(get_metadata()) if callable(get_metadata) else {}


def carried_over(layer: Any) -> tuple[jax.Array | None, dict]:
    """The bias and the keyword arguments a compressed layer takes over from its dense layer."""
    bias = layer.bias[...] if layer.bias is not None else None
    return bias, dict(
        dtype=layer.dtype,
        param_dtype=layer.param_dtype,
        kernel_metadata=_metadata(layer.kernel),
        bias_metadata=_metadata(layer.bias) if layer.bias is not None else None,
    )


def _new_variable(cls: type, value: jax.Array, metadata: dict) -> nnx.Variable:
    # from_metadata keeps the kernel's annotations (sharding names, ...) without
    # re-sharding eagerly, which would need a mesh.
    if metadata and hasattr(cls, "from_metadata"):
        try:
            return cls.from_metadata(value, metadata)
        except (KeyError, TypeError):
            pass
    return cls(value)


class SparseKernelLayer(nnx.Module):
    """Base of the compressed layers: a 2:4 kernel held as values + metadata.

    ``kernel_shape`` is one layer's dense kernel shape and ``axis`` its
    reduction axis (the groups of 4 run along it). A stacked layer (created
    under ``nnx.vmap``, run under ``nnx.scan``) holds ``stacked`` more leading
    axes in ``values`` and ``meta``; the transform slices them away, so the
    forward pass always sees one layer.

    Example (every compressed layer is one; its kernel comes back as a `Sparse24`):
      >>> import sparse_jax
      >>> from flax import nnx
      >>> layer = sparse_jax.nn.sparsify(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), prune=True)
      >>> isinstance(layer, sparse_jax.nn.SparseKernelLayer), layer.kernel.shape, layer.kernel.axis
      (True, (16, 8), 0)
    """

    kernel_shape: tuple[int, ...]
    axis: int
    stacked: int

    def _set_kernel(self, kernel: Sparse24, kernel_shape, axis: int, stacked: int, metadata=None):
        kernel_shape = tuple(int(s) for s in kernel_shape)
        name = type(self).__name__
        if not isinstance(kernel, Sparse24):
            raise TypeError(
                f"{name}: kernel must be a sparse_jax.Sparse24, got {type(kernel).__name__}"
            )
        if (
            stacked < 0
            or tuple(kernel.shape[stacked:]) != kernel_shape
            or kernel.axis != stacked + axis
        ):
            raise ValueError(
                f"{name}: kernel has shape {kernel.shape} compressed along axis {kernel.axis}; "
                f"expected {stacked} stacked axes, then the layer's kernel {kernel_shape} "
                f"compressed along its axis {axis} (axis {stacked + axis} of the whole)"
            )
        self.kernel_shape = kernel_shape
        self.axis = int(axis)
        self.stacked = int(stacked)
        self.values = _new_variable(nnx.Param, kernel.values, dict(metadata or {}))
        self.meta = _new_variable(SparseMeta, kernel.meta, dict(metadata or {}))

    @property
    def kernel(self) -> Sparse24:
        """The compressed kernel as a `Sparse24` (with its stacked axes, if any)."""
        values = self.values[...]
        extra = values.ndim - len(self.kernel_shape)
        shape = tuple(values.shape[:extra]) + self.kernel_shape
        return Sparse24(values, self.meta[...], shape, extra + self.axis)

    def dense_kernel(self) -> jax.Array:
        """The decompressed (masked dense) kernel, stacked axes included."""
        return decompress(self.kernel)

    def _dense_equivalent(self, layer_class: type, *args, takes_use_bias: bool = True, **kwargs):
        """``layer_class(*args, **kwargs)`` (an nnx layer) with this layer's dtypes, its
        decompressed kernel and its bias (and their variable metadata)."""
        if takes_use_bias:  # (nnx.Einsum has a bias_shape instead)
            kwargs["use_bias"] = self.bias is not None
        layer = layer_class(*args, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0), **kwargs)
        layer.kernel = _new_variable(nnx.Param, self.dense_kernel(), _metadata(self.values))
        if self.bias is not None:
            layer.bias = _new_variable(nnx.Param, self.bias[...], _metadata(self.bias))
        return layer

    def _layer_kernel(self, dtype) -> Sparse24:
        """One layer's kernel in the computation dtype; fails clearly on stacked values."""
        values = self.values[...]
        if values.ndim != len(self.kernel_shape):
            raise ValueError(
                f"{type(self).__name__}: holds stacked kernels, values {values.shape} for a layer "
                f"kernel {self.kernel_shape}; call it under the nnx.scan / nnx.vmap that slices "
                f"its {values.ndim - len(self.kernel_shape)} leading layer axes"
            )
        return Sparse24(values.astype(dtype), self.meta[...], self.kernel_shape, self.axis)


def compress_layer_kernel(kernel: jax.Array, base_ndim: int, axis: int, *, prune: bool):
    """Compresses a (possibly stacked) kernel along one layer's ``axis``: (Sparse24, stacked)."""
    stacked = kernel.ndim - base_ndim
    return compress(kernel, axis=stacked + axis, prune=prune), stacked


def matmul_view(s: Sparse24, contracted: tuple[int, ...]) -> tuple[Sparse24, tuple[int, ...], int]:
    """A 2-D ``(K, N)`` Sparse24 (axis 0) computing the same contraction as ``s``.

    ``contracted`` are the kernel axes summed against the input (``s.axis``
    among them); the others, in kernel order, flatten into ``N``. The
    reduction axis becomes the innermost of the flattened ``K``, so its groups
    of 4 stay contiguous; when other contracted axes sit outside it and its
    size is not a multiple of 32, each of its slices keeps its zero padding
    (zero values) and the input must be zero-padded the same way.

    Returns:
      the 2-D Sparse24, the order of the contracted axes in ``K`` (reduction
      axis last), and the padded size of the reduction axis in ``K``.
    """
    axis = s.axis
    order_k = tuple(a for a in contracted if a != axis) + (axis,)
    free = tuple(a for a in range(s.ndim) if a not in contracted)
    permutation = order_k + free
    values = jnp.transpose(s.values, permutation)
    meta = jnp.transpose(s.meta, permutation)
    outer = math.prod(s.shape[a] for a in order_k[:-1])
    n = math.prod(s.shape[a] for a in free)
    inner = s.shape[axis] if outer == 1 else s.padded_size
    k = outer * inner
    view = Sparse24(
        values.reshape(outer * s.padded_size // 2, n),
        meta.reshape(outer * s.padded_size // AXIS_ALIGN, n),
        (k, n),
        0,
    )
    return view, order_k, inner


def contract(
    x: jax.Array, x_axes: tuple[int, ...], s: Sparse24, contracted: tuple[int, ...], matmul_fn
):
    """Sums ``x``'s axes ``x_axes`` against kernel axes ``contracted`` (pairwise) via a 2-D matmul.

    Returns ``x``'s other axes (in order) followed by the kernel's free axes (in order).
    """
    view, order_k, inner = matmul_view(s, contracted)
    x_for = dict(zip(contracted, x_axes))
    x_k = [x_for[a] for a in order_k]
    x_free = [a for a in range(x.ndim) if a not in x_k]
    x = jnp.transpose(x, x_free + x_k)
    batch = x.shape[: len(x_free)]
    size = s.shape[s.axis]
    if inner != size:  # per-slice zero padding of the reduction axis, as in the kernel
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, inner - size)])
    y = matmul_fn(x.reshape(batch + (view.shape[0],)), view)
    free_shape = tuple(s.shape[a] for a in range(s.ndim) if a not in contracted)
    return y.reshape(batch + free_shape)
