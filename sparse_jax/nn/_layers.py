"""Compressed 2:4 forms of ``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Conv``.

Each layer knows its own computation, so its reduction axis (the axis the
groups of 4 run along) comes from its configuration, never from a name:

* `SparseLinearGeneral`: the innermost input-feature axis of the kernel
  ``(*in_features, *out_features)``: 0 for attention ``query``/``key``/
  ``value`` ``(in, heads, head_dim)``, 1 (``head_dim``) for the ``out``
  projection ``(heads, head_dim, out)``.
* `SparseEinsum`: the innermost kernel axis its ``einsum_str`` sums against
  the input.
* `SparseConv`: the input-feature axis ``-2`` of ``(*window, in / groups, out)``.

The first two run `sparse_jax.matmul` on a 2-D view of the compressed kernel
(the reduction axis innermost in the flattened ``K``); `SparseConv`
decompresses and calls ``lax.conv_general_dilated`` exactly as ``nnx.Conv``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from sparse_jax._compressed import Sparse24, decompress
from sparse_jax._matmul import matmul
from sparse_jax.nn._base import (
    SparseKernelLayer,
    _new_variable,
    carried_over,
    compress_layer_kernel,
    contract,
)
from sparse_jax.nn._sparse_linear import add_bias, constrain

__all__ = ["SparseConv", "SparseEinsum", "SparseLinearGeneral", "einsum_reduction_axis"]


def _tuple(x) -> tuple[int, ...]:
    return tuple(int(v) for v in x) if isinstance(x, Sequence) else (int(x),)


def _bias_variable(bias, metadata):
    return _new_variable(nnx.Param, bias, dict(metadata or {})) if bias is not None else None


def _compute_dtype(layer, x) -> jnp.dtype:
    return layer.dtype or jnp.result_type(x.dtype, layer.values[...].dtype)


class SparseLinearGeneral(SparseKernelLayer):
    """``nnx.LinearGeneral`` (no ``batch_axis``) with a 2:4 compressed kernel.

    The kernel ``(*in_features, *out_features)`` is 2:4 along its innermost
    input-feature axis, ``len(in_features) - 1``; the input's ``axis`` axes
    (sorted, as ``nnx.LinearGeneral`` pairs them) contract with
    ``in_features`` in order.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, sparse_jax
      >>> from flax import nnx
      >>> out = nnx.LinearGeneral((2, 8), 4, axis=(-2, -1), rngs=nnx.Rngs(0))
      >>> layer = sparse_jax.nn.SparseLinearGeneral.from_linear_general(out, prune=True)
      >>> layer.axis, layer.values.shape  # head_dim (8, padded to 32) halved
      (1, (2, 16, 4))
      >>> x = jax.random.normal(jax.random.key(1), (3, 2, 8))
      >>> w = sparse_jax.decompress(layer.kernel)
      >>> bool(jnp.allclose(layer(x), jnp.einsum("bhd,hdo->bo", x, w) + out.bias[...], atol=1e-5))
      True
    """

    def __init__(
        self,
        kernel: Sparse24,
        bias: jax.Array | None = None,
        *,
        in_features,
        out_features,
        axis=-1,
        dtype=None,
        param_dtype=jnp.float32,
        impl: str = "auto",
        stacked: int = 0,
        kernel_metadata: dict | None = None,
        bias_metadata: dict | None = None,
    ):
        self.in_features = _tuple(in_features)
        self.out_features = _tuple(out_features)
        self.feature_axes = _tuple(axis)
        if len(self.feature_axes) != len(self.in_features):
            raise ValueError(
                f"SparseLinearGeneral: axis {self.feature_axes} and in_features "
                f"{self.in_features} must have the same length"
            )
        self._set_kernel(
            kernel,
            self.in_features + self.out_features,
            len(self.in_features) - 1,
            stacked,
            kernel_metadata,
        )
        self.bias = _bias_variable(bias, bias_metadata)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.impl = impl

    @classmethod
    def from_linear_general(
        cls, layer: nnx.LinearGeneral, *, prune: bool = False, impl: str = "auto"
    ):
        """Compresses an ``nnx.LinearGeneral`` along its innermost input-feature axis."""
        reason = linear_general_unsupported(layer)
        if reason:
            raise ValueError(f"SparseLinearGeneral: cannot convert this LinearGeneral: {reason}")
        base = layer.in_features + layer.out_features
        kernel, stacked = compress_layer_kernel(
            layer.kernel[...], len(base), len(layer.in_features) - 1, prune=prune
        )
        bias, carried = carried_over(layer)
        return cls(
            kernel,
            bias,
            in_features=layer.in_features,
            out_features=layer.out_features,
            axis=layer.axis,
            impl=impl,
            stacked=stacked,
            **carried,
        )

    def to_dense(self) -> nnx.LinearGeneral:
        """The equivalent ``nnx.LinearGeneral`` with the decompressed kernel."""
        return self._dense_equivalent(
            nnx.LinearGeneral, self.in_features, self.out_features, axis=self.feature_axes
        )

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        x = jnp.asarray(x)
        dtype = _compute_dtype(self, x)
        x_axes = tuple(sorted(a % x.ndim for a in self.feature_axes))
        if tuple(x.shape[a] for a in x_axes) != self.in_features:
            raise ValueError(
                f"SparseLinearGeneral: input of shape {x.shape} has {tuple(x.shape[a] for a in x_axes)} "
                f"on axes {x_axes}, expected in_features {self.in_features}"
            )
        y = contract(
            x.astype(dtype),
            x_axes,
            self._layer_kernel(dtype),
            tuple(range(len(self.in_features))),
            functools.partial(matmul, impl=self.impl),
        )
        return constrain(add_bias(y, self.bias, dtype), out_sharding)


def linear_general_unsupported(layer: nnx.LinearGeneral) -> str:
    """Why ``layer`` has no compressed form ('' if it has one)."""
    if layer.batch_axis:
        return f"batch_axis {dict(layer.batch_axis)} is not supported"
    if layer.dot_general is not None or layer.dot_general_cls is not None:
        return "a custom dot_general is not supported"
    if layer.preferred_element_type is not None:
        return "preferred_element_type is not supported (sparse_jax.matmul accumulates in float32)"
    return ""


# ----------------------------------------------------------------------------- Einsum


def _split_einsum(einsum_str: str) -> tuple[str, str, str]:
    einsum_str = einsum_str.replace(" ", "")
    if "->" not in einsum_str or einsum_str.count(",") != 1:
        raise ValueError(f"einsum_str {einsum_str!r} must be explicit ('x,kernel->out')")
    operands, out = einsum_str.split("->")
    lhs, rhs = operands.split(",")
    return lhs, rhs, out


def einsum_reduction_axis(einsum_str: str, kernel_ndim: int) -> tuple[int, tuple[int, ...]]:
    """(reduction axis, contracted kernel axes) of an ``nnx.Einsum``'s kernel.

    The reduction axis is the innermost kernel axis that ``einsum_str`` sums
    against the input. Raises ValueError, saying why, for an equation a 2-D
    matmul cannot compute: a kernel axis that is also a batch axis (in the
    input and the output), a kernel axis summed alone, repeated labels.

    Example:
      >>> from sparse_jax.nn import einsum_reduction_axis
      >>> einsum_reduction_axis("btd,dnh->btnh", 3), einsum_reduction_axis("btnh,nhd->btd", 3)
      ((0, (0,)), (1, (0, 1)))
    """
    lhs, rhs, out = _split_einsum(einsum_str)
    if "..." in rhs:
        raise ValueError(f"einsum_str {einsum_str!r}: an ellipsis in the kernel is not supported")
    if len(rhs) != kernel_ndim:
        raise ValueError(
            f"einsum_str {einsum_str!r} names {len(rhs)} kernel axes, the kernel has {kernel_ndim}"
        )
    lhs_labels, out_labels = lhs.replace("...", ""), out.replace("...", "")
    for name, labels in (("input", lhs_labels), ("kernel", rhs), ("output", out_labels)):
        if len(set(labels)) != len(labels):
            raise ValueError(
                f"einsum_str {einsum_str!r}: repeated labels in the {name} are not supported"
            )
    contracted = []
    for axis, label in enumerate(rhs):
        if label in lhs_labels and label in out_labels:
            raise ValueError(
                f"einsum_str {einsum_str!r}: kernel axis {axis} ({label!r}) is a batch axis "
                "(in the input and the output); not a 2-D matmul"
            )
        if label not in lhs_labels and label not in out_labels:
            raise ValueError(
                f"einsum_str {einsum_str!r}: kernel axis {axis} ({label!r}) is summed alone"
            )
        if label in lhs_labels:
            contracted.append(axis)
    for label in lhs_labels:
        if label not in rhs and label not in out_labels:
            raise ValueError(f"einsum_str {einsum_str!r}: input axis {label!r} is summed alone")
    if not contracted:
        raise ValueError(f"einsum_str {einsum_str!r} contracts no kernel axis with the input")
    return max(contracted), tuple(contracted)


def _expand_ellipsis(spec: str, fill: list[str]) -> list[str]:
    if "..." not in spec:
        return list(spec)
    before, after = spec.split("...")
    return list(before) + fill + list(after)


class SparseEinsum(SparseKernelLayer):
    """``nnx.Einsum`` with a 2:4 compressed kernel.

    The kernel is 2:4 along its innermost axis contracted with the input
    (see `einsum_reduction_axis`); every kernel axis is either contracted or
    an output feature axis, so the product is one 2-D `sparse_jax.matmul`.
    ``einsum_str`` is fixed at construction.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> from flax import nnx
      >>> dense = nnx.Einsum("bi,oi->bo", (6, 16), (6,), rngs=nnx.Rngs(0))
      >>> layer = sparse_jax.nn.SparseEinsum.from_einsum(dense, prune=True)
      >>> layer.axis  # the contracted 'i', last in the kernel
      1
      >>> x = jax.random.normal(jax.random.key(1), (3, 16))
      >>> w = sparse_jax.decompress(layer.kernel)
      >>> bool(jnp.allclose(layer(x), x @ w.T + dense.bias[...], atol=1e-5))
      True
    """

    def __init__(
        self,
        kernel: Sparse24,
        bias: jax.Array | None = None,
        *,
        einsum_str: str,
        dtype=None,
        param_dtype=jnp.float32,
        impl: str = "auto",
        stacked: int = 0,
        kernel_metadata: dict | None = None,
        bias_metadata: dict | None = None,
    ):
        self.einsum_str = einsum_str.replace(" ", "")
        if not isinstance(kernel, Sparse24):
            raise TypeError(
                f"SparseEinsum: kernel must be a sparse_jax.Sparse24, got {type(kernel).__name__}"
            )
        base_ndim = kernel.ndim - stacked
        axis, self.contracted = einsum_reduction_axis(self.einsum_str, base_ndim)
        self._set_kernel(kernel, kernel.shape[stacked:], axis, stacked, kernel_metadata)
        self.bias = _bias_variable(bias, bias_metadata)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.impl = impl

    @classmethod
    def from_einsum(cls, layer: nnx.Einsum, *, prune: bool = False, impl: str = "auto"):
        """Compresses an ``nnx.Einsum`` along its innermost contracted kernel axis."""
        reason = einsum_unsupported(layer)
        if reason:
            raise ValueError(f"SparseEinsum: cannot convert this Einsum: {reason}")
        kernel_shape = tuple(layer.kernel_shape)
        axis, _ = einsum_reduction_axis(layer.einsum_str, len(kernel_shape))
        kernel, stacked = compress_layer_kernel(
            layer.kernel[...], len(kernel_shape), axis, prune=prune
        )
        bias, carried = carried_over(layer)
        return cls(kernel, bias, einsum_str=layer.einsum_str, impl=impl, stacked=stacked, **carried)

    def to_dense(self) -> nnx.Einsum:
        """The equivalent ``nnx.Einsum`` with the decompressed kernel."""
        bias_shape = None if self.bias is None else tuple(self.bias[...].shape[self.stacked :])
        return self._dense_equivalent(
            nnx.Einsum, self.einsum_str, self.kernel_shape, bias_shape, takes_use_bias=False,
            bias_init=nnx.initializers.zeros_init(),
        )

    def __call__(self, x: jax.Array, einsum_str: str | None = None, out_sharding=None) -> jax.Array:
        if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str:
            raise ValueError(
                f"SparseEinsum: its kernel is compressed for {self.einsum_str!r}; "
                f"it cannot compute {einsum_str!r}"
            )
        x = jnp.asarray(x)
        dtype = _compute_dtype(self, x)
        lhs, rhs, out = _split_einsum(self.einsum_str)
        explicit = len(lhs.replace("...", ""))
        if x.ndim < explicit or ("..." not in lhs and x.ndim != explicit):
            raise ValueError(
                f"SparseEinsum: input of shape {x.shape} does not match {self.einsum_str!r}"
            )
        fill = [f"<{i}>" for i in range(x.ndim - explicit)]  # labels for the ellipsis axes
        x_labels, out_labels = _expand_ellipsis(lhs, fill), _expand_ellipsis(out, fill)
        x_axes = tuple(x_labels.index(rhs[a]) for a in self.contracted)
        y = contract(
            x.astype(dtype),
            x_axes,
            self._layer_kernel(dtype),
            self.contracted,
            functools.partial(matmul, impl=self.impl),
        )
        have = [c for c in x_labels if c not in rhs] + [c for c in rhs if c not in x_labels]
        y = jnp.transpose(y, [have.index(c) for c in out_labels])
        if self.bias is not None:
            # As nnx.Einsum: the bias is reshaped (not transposed) onto the output's kernel axes.
            shape = [self.kernel_shape[rhs.index(c)] if c in rhs else 1 for c in out_labels]
            y = y + jnp.reshape(self.bias[...].astype(dtype), shape)
        return constrain(y, out_sharding)


def einsum_unsupported(layer: nnx.Einsum) -> str:
    """Why ``layer`` has no compressed form ('' if it has one)."""
    if layer.einsum_op is not jnp.einsum:
        return "a custom einsum_op is not supported"
    if layer.preferred_element_type is not None:
        return "preferred_element_type is not supported (sparse_jax.matmul accumulates in float32)"
    try:
        einsum_reduction_axis(layer.einsum_str, len(layer.kernel_shape))
    except ValueError as error:
        return str(error)
    return ""


# ----------------------------------------------------------------------------- Conv


def _canonical_padding(padding, rank: int):
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding),) * rank
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pads) != rank or any(len(p) != 2 for p in pads):
        raise ValueError(
            f"SparseConv: padding {padding!r} is not a string, an int or {rank} (lo, hi) pairs"
        )
    return pads


class SparseConv(SparseKernelLayer):
    """``nnx.Conv`` with a 2:4 compressed kernel ``(*window, in / groups, out)``.

    The kernel is 2:4 along its input-feature axis (per group with
    ``feature_group_count``). The forward pass decompresses it and computes
    exactly what ``nnx.Conv`` does: the same padding (string, ints, pairs,
    ``CIRCULAR``/``REFLECT``/``CAUSAL``), strides, dilations, groups, bias,
    dtype promotion and batch handling. The gradient reaches the kept values
    only.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> from flax import nnx
      >>> dense = nnx.Conv(8, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))
      >>> layer = sparse_jax.nn.SparseConv.from_conv(dense, prune=True)
      >>> layer.axis, layer.values.shape
      (2, (3, 3, 16, 4))
      >>> x = jax.random.normal(jax.random.key(1), (2, 9, 9, 8))
      >>> dense.kernel[...] = sparse_jax.decompress(layer.kernel)
      >>> bool(jnp.allclose(layer(x), dense(x), atol=1e-5))
      True
    """

    def __init__(
        self,
        kernel: Sparse24,
        bias: jax.Array | None = None,
        *,
        in_features: int,
        out_features: int,
        kernel_size,
        strides=1,
        padding="SAME",
        input_dilation=1,
        kernel_dilation=1,
        feature_group_count: int = 1,
        dtype=None,
        param_dtype=jnp.float32,
        precision=None,
        stacked: int = 0,
        kernel_metadata: dict | None = None,
        bias_metadata: dict | None = None,
    ):
        self.kernel_size = _tuple(kernel_size)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.feature_group_count = int(feature_group_count)
        if self.in_features % self.feature_group_count:
            raise ValueError(
                f"SparseConv: in_features {self.in_features} is not a multiple of "
                f"feature_group_count {self.feature_group_count}"
            )
        rank = len(self.kernel_size)
        # As nnx.Conv: None or an int applies to every spatial axis.
        self.strides, self.input_dilation, self.kernel_dilation = (
            _tuple(1 if v is None else v) * (rank if v is None or isinstance(v, int) else 1)
            for v in (strides, input_dilation, kernel_dilation)
        )
        self.padding = _canonical_padding(padding, rank)
        base = self.kernel_size + (self.in_features // self.feature_group_count, self.out_features)
        self._set_kernel(kernel, base, rank, stacked, kernel_metadata)
        self.bias = _bias_variable(bias, bias_metadata)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision

    @classmethod
    def from_conv(cls, conv: nnx.Conv, *, prune: bool = False, impl: str = "auto"):
        """Compresses an ``nnx.Conv`` along its input-feature axis (its ``mask`` applied).

        ``impl`` is accepted for symmetry with the other layers; the
        convolution always runs the reference path (decompress, then
        ``lax.conv_general_dilated``).
        """
        del impl
        reason = conv_unsupported(conv)
        if reason:
            raise ValueError(f"SparseConv: cannot convert this Conv: {reason}")
        kernel = conv.kernel[...]
        if conv.mask is not None:
            kernel = kernel * conv.mask
        rank = len(conv.kernel_size)
        compressed, stacked = compress_layer_kernel(kernel, rank + 2, rank, prune=prune)
        bias, carried = carried_over(conv)
        return cls(
            compressed,
            bias,
            in_features=conv.in_features,
            out_features=conv.out_features,
            kernel_size=conv.kernel_size,
            strides=conv.strides,
            padding=conv.padding,
            input_dilation=conv.input_dilation,
            kernel_dilation=conv.kernel_dilation,
            feature_group_count=conv.feature_group_count,
            precision=conv.precision,
            stacked=stacked,
            **carried,
        )

    def to_dense(self) -> nnx.Conv:
        """The equivalent ``nnx.Conv`` with the decompressed kernel."""
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return self._dense_equivalent(
            nnx.Conv,
            self.in_features,
            self.out_features,
            self.kernel_size,
            self.strides,
            padding=padding,
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        x = jnp.asarray(x)
        rank = len(self.kernel_size)
        batch_dims = x.ndim - (rank + 1)
        batch_shape = x.shape[:batch_dims]
        if batch_dims != 1:
            x = x.reshape((-1,) + x.shape[batch_dims:])
        padding = self.padding
        if padding in ("CIRCULAR", "REFLECT"):
            dilated = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.kernel_dilation)]
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
            x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
            padding = "VALID"
        elif padding == "CAUSAL":
            if rank != 1:
                raise ValueError(
                    "SparseConv: causal padding is only implemented for 1-D convolutions"
                )
            x = jnp.pad(
                x, [(0, 0), (self.kernel_dilation[0] * (self.kernel_size[0] - 1), 0), (0, 0)]
            )
            padding = "VALID"
        elif not isinstance(padding, str):
            padding = [tuple(p) for p in padding]
        dtype = self.dtype or jnp.result_type(
            x.dtype, self.values[...].dtype, *(() if self.bias is None else (self.bias[...].dtype,))
        )
        kernel = decompress(self._layer_kernel(self.values[...].dtype)).astype(dtype)
        ndim = x.ndim
        lhs_spec = (0, ndim - 1) + tuple(range(1, ndim - 1))
        rhs_spec = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
        y = lax.conv_general_dilated(
            x.astype(dtype),
            kernel,
            self.strides,
            padding,
            lhs_dilation=self.input_dilation,
            rhs_dilation=self.kernel_dilation,
            dimension_numbers=lax.ConvDimensionNumbers(lhs_spec, rhs_spec, lhs_spec),
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )
        y = add_bias(y, self.bias, dtype)
        if batch_dims != 1:
            y = y.reshape(batch_shape + y.shape[1:])
        return constrain(y, out_sharding)


def conv_unsupported(conv: nnx.Conv) -> str:
    """Why ``conv`` has no compressed form ('' if it has one)."""
    if conv.conv_general_dilated is not lax.conv_general_dilated:
        return "a custom conv_general_dilated is not supported"
    if conv.preferred_element_type is not None:
        return "preferred_element_type is not supported"
    return ""
