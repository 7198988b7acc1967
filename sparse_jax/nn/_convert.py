"""Converting a pruned NNX model's layers to their compressed 2:4 forms and back."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from sparse_jax._compressed import GROUP, _violating_groups
from sparse_jax.nn._base import SparseKernelLayer
from sparse_jax.nn._layers import (
    SparseConv,
    SparseEinsum,
    SparseLinearGeneral,
    conv_unsupported,
    einsum_reduction_axis,
    einsum_unsupported,
    linear_general_unsupported,
)
from sparse_jax.nn._sparse_linear import SparseLinear


class SparsifyWarning(UserWarning):
    """`sparsify` left layers dense; the message lists each with its reason."""


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """What `sparsify` did with one layer.

    Attributes:
      path: the layer's path in the model, ``'/'``-joined (``''`` for the root).
      kind: the layer's class name (``'Linear'``, ``'Conv'``, ...).
      axis: the kernel axis the 2:4 groups run along (stacked axes included),
        or None when the layer has none.
      reason: why it was left dense; ``''`` for a converted layer.
    """

    path: str
    kind: str
    axis: int | None
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class SparsifyReport:
    """The layers `sparsify` converted and those it left dense, with reasons.

    Attributes:
      converted: one `LayerResult` per converted layer.
      left_dense: one `LayerResult` per layer that holds a kernel it could
        not convert: a known kind (``Linear``, ``LinearGeneral``, ``Einsum``,
        ``Conv``) that failed a condition, or an unknown kind whose parameter
        is 2:4 along some axis (it looks pruned).
    """

    converted: tuple[LayerResult, ...]
    left_dense: tuple[LayerResult, ...]

    @property
    def all_converted(self) -> bool:
        return not self.left_dense

    def __str__(self) -> str:
        lines = [
            f"sparsify: {len(self.converted)} layers converted, {len(self.left_dense)} left dense"
        ]
        lines += [
            f"  converted  {r.path or '<root>'} ({r.kind}, axis {r.axis})" for r in self.converted
        ]
        lines += [
            f"  dense      {r.path or '<root>'} ({r.kind}): {r.reason}" for r in self.left_dense
        ]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Kind:
    convert: Callable[..., SparseKernelLayer]
    # layer -> (base kernel ndim, reduction axis within one layer) or a reason string
    layout: Callable[[Any], tuple[int, int] | str]


def _linear_layout(layer: nnx.Linear):
    if getattr(layer, "dot_general", lax.dot_general) is not lax.dot_general:
        return "a custom dot_general is not supported"
    if getattr(layer, "preferred_element_type", None) is not None:
        return "preferred_element_type is not supported (sparse_jax.matmul accumulates in float32)"
    return 2, 0


def _linear_general_layout(layer: nnx.LinearGeneral):
    reason = linear_general_unsupported(layer)
    return reason or (len(layer.in_features) + len(layer.out_features), len(layer.in_features) - 1)


def _einsum_layout(layer: nnx.Einsum):
    reason = einsum_unsupported(layer)
    if reason:
        return reason
    return len(layer.kernel_shape), einsum_reduction_axis(
        layer.einsum_str, len(layer.kernel_shape)
    )[0]


def _conv_layout(layer: nnx.Conv):
    reason = conv_unsupported(layer)
    return reason or (len(layer.kernel_size) + 2, len(layer.kernel_size))


_KINDS: dict[type, _Kind] = {
    nnx.Linear: _Kind(SparseLinear.from_linear, _linear_layout),
    nnx.LinearGeneral: _Kind(SparseLinearGeneral.from_linear_general, _linear_general_layout),
    nnx.Einsum: _Kind(SparseEinsum.from_einsum, _einsum_layout),
    nnx.Conv: _Kind(SparseConv.from_conv, _conv_layout),
}


def _base_shape(layer: Any) -> tuple[int, ...]:
    if isinstance(layer, nnx.Linear):
        return (layer.in_features, layer.out_features)
    if isinstance(layer, nnx.LinearGeneral):
        return tuple(layer.in_features) + tuple(layer.out_features)
    return tuple(layer.kernel_shape)  # Einsum, Conv


def _decide(layer: Any, prune: bool) -> tuple[int | None, str]:
    """(axis of the whole kernel, '') if ``layer`` converts, else (axis or None, reason)."""
    layout = _KINDS[type(layer)].layout(layer)
    if isinstance(layout, str):
        return None, layout
    base_ndim, axis = layout
    kernel = layer.kernel[...]
    if isinstance(layer, nnx.Conv) and layer.mask is not None:
        kernel = kernel * layer.mask
    stacked = kernel.ndim - base_ndim
    if stacked < 0 or tuple(kernel.shape[stacked:]) != _base_shape(layer):
        return (
            None,
            f"kernel shape {tuple(kernel.shape)} does not end in the layer's {_base_shape(layer)}",
        )
    axis += stacked
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        return axis, f"kernel is {kernel.dtype}, not floating point"
    size = kernel.shape[axis]
    if size % GROUP:
        return axis, f"reduction size {size} (axis {axis}) is not a multiple of {GROUP}"
    if not prune:
        bad, total = _violating_groups(kernel, axis)
        if bad:
            return axis, (
                f"kernel {tuple(kernel.shape)} is not 2:4 along axis {axis}: {bad} of {total} groups "
                "have more than 2 non-zeros (prune it first, or pass prune=True)"
            )
    return axis, ""


def _looks_pruned_axis(value: Any) -> int | None:
    """An axis along which an unknown layer's parameter is 2:4 (and not all zero), if any."""
    if (
        not hasattr(value, "ndim")
        or value.ndim < 2
        or not jnp.issubdtype(value.dtype, jnp.floating)
    ):
        return None
    array = np.asarray(value)
    if not array.any():
        return None
    for axis in range(array.ndim):
        if array.shape[axis] % GROUP == 0 and _violating_groups(array, axis)[0] == 0:
            return axis
    return None


def _child(node: Any, key: Any) -> Any:
    if isinstance(node, nnx.Module) and isinstance(key, str):
        return getattr(node, key)
    return node[key]


def _replace(root: Any, path: tuple, new: Any) -> None:
    parent = root
    for key in path[:-1]:
        parent = _child(parent, key)
    if isinstance(parent, nnx.Module) and isinstance(path[-1], str):
        setattr(parent, path[-1], new)
    else:
        parent[path[-1]] = new


def _under(path: tuple, prefixes: set[tuple]) -> bool:
    return any(path[: len(p)] == p for p in prefixes)


def _path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def sparsify(
    model: nnx.Module,
    *,
    prune: bool = False,
    impl: str = "auto",
    report: bool = False,
    strict: bool = False,
):
    """A copy of ``model`` with every 2:4 layer in its compressed form.

    * ``nnx.Linear`` -> `SparseLinear`, 2:4 along ``in`` (kernel axis 0);
    * ``nnx.LinearGeneral`` -> `SparseLinearGeneral`, along the innermost
      input-feature axis (attention ``query``/``key``/``value``
      ``(in, heads, head_dim)``: 0; ``out`` ``(heads, head_dim, out)``: 1);
    * ``nnx.Einsum`` -> `SparseEinsum`, along the innermost kernel axis its
      ``einsum_str`` contracts with the input;
    * ``nnx.Conv`` -> `SparseConv`, along ``in`` per group (kernel axis -2).

    These are the axes `sparse_jax.prune`'s default rules choose for
    ``Linear``, ``Conv`` and attention projections (an ``Einsum`` needs a
    rule, e.g. from `sparse_jax.rules_from_computation`). Stacked layers
    (made under ``nnx.vmap``, kernels with extra leading axes) convert layer
    by layer and still run under the same ``nnx.scan``. Layers are matched by
    exact type: a subclass may compute something else, so it counts as
    another kind. ``model`` itself is not modified.

    Nothing is left dense silently: a known layer that cannot be converted
    (reduction size not a multiple of 4, a kernel not 2:4 along its axis when
    ``prune`` is False, an unsupported option such as ``batch_axis`` or a
    custom ``dot_general``), and a layer of another kind whose parameter is
    2:4 along some axis (it looks pruned), are listed with the reason in the
    `SparsifyReport`. Unless ``report`` or ``strict`` is set, a
    `SparsifyWarning` gives that list.

    Args:
      model: an NNX model (or a single layer), typically after
        `sparse_jax.prune` + ``nnx.update``.
      prune: convert every known layer whose reduction size is a multiple of
        4, keeping the 2 largest magnitudes per group.
      impl: `sparse_jax.matmul`'s ``impl`` for the matmul layers.
      report: also return the `SparsifyReport`: ``(model, report)``.
      strict: raise ValueError (with the list) if anything is left dense.

    Example:
      >>> import jax.numpy as jnp, sparse_jax
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(16, 4, rngs=nnx.Rngs(1)),
      ...                        nnx.Linear(4, 3, rngs=nnx.Rngs(2)))
      >>> state = nnx.state(model, nnx.Param)
      >>> pruned, masks = sparse_jax.prune(state)
      >>> nnx.update(model, pruned)
      >>> sparse, report = sparse_jax.nn.sparsify(model, report=True)
      >>> type(sparse.layers[0]).__name__, type(sparse.layers[3]).__name__
      ('SparseLinear', 'SparseLinear')
      >>> print(report)
      sparsify: 3 layers converted, 0 left dense
        converted  layers/0 (Linear, axis 0)
        converted  layers/2 (Linear, axis 0)
        converted  layers/3 (Linear, axis 0)
      >>> bool(jnp.allclose(sparse(jnp.ones((1, 8))), model(jnp.ones((1, 8))), atol=1e-5))
      True
    """
    converted: list[LayerResult] = []
    left_dense: list[LayerResult] = []
    if type(model) in _KINDS:
        axis, reason = _decide(model, prune)
        result = LayerResult("", type(model).__name__, axis, reason)
        if reason:
            left_dense.append(result)
            out = nnx.clone(model)
        else:
            converted.append(result)
            out = _KINDS[type(model)].convert(model, prune=prune, impl=impl)
    else:
        out = nnx.clone(model)
        nodes = [(tuple(path), node) for path, node in nnx.iter_graph(out)]
        known: set[tuple] = set()
        replacements = []
        for path, node in nodes:
            if isinstance(node, SparseKernelLayer):
                known.add(path)
            elif type(node) in _KINDS:
                known.add(path)
                axis, reason = _decide(node, prune)
                result = LayerResult(_path_str(path), type(node).__name__, axis, reason)
                if reason:
                    left_dense.append(result)
                else:
                    converted.append(result)
                    replacements.append((path, node))
        for path, node in nodes:
            if isinstance(node, nnx.Param) and not _under(path, known):
                axis = _looks_pruned_axis(node[...])
                if axis is not None:
                    owner = dict(nodes).get(path[:-1], out)
                    left_dense.append(
                        LayerResult(
                            _path_str(path),
                            type(owner).__name__,
                            axis,
                            f"parameter {tuple(node[...].shape)} is 2:4 along axis {axis}, but sparsify "
                            f"has no compressed form of {type(owner).__name__}",
                        )
                    )
        for path, node in replacements:
            _replace(out, path, _KINDS[type(node)].convert(node, prune=prune, impl=impl))
    summary = SparsifyReport(tuple(converted), tuple(left_dense))
    if left_dense:
        listing = "\n".join(f"  {r.path or '<root>'} ({r.kind}): {r.reason}" for r in left_dense)
        if strict:
            raise ValueError(f"sparsify: {len(left_dense)} layers cannot be converted:\n{listing}")
        if not report:
            warnings.warn(
                f"sparsify left {len(left_dense)} layers dense (pass report=True to get the "
                f"list as a SparsifyReport):\n{listing}",
                SparsifyWarning,
                stacklevel=2,
            )
    return (out, summary) if report else out


def _dense_of(layer: SparseKernelLayer) -> nnx.Module:
    return layer.to_linear() if isinstance(layer, SparseLinear) else layer.to_dense()


def densify(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every compressed layer back in its dense NNX form.

    `SparseLinear` -> ``nnx.Linear``, `SparseLinearGeneral` ->
    ``nnx.LinearGeneral``, `SparseEinsum` -> ``nnx.Einsum``, `SparseConv` ->
    ``nnx.Conv``, each with the decompressed (masked dense) kernel, stacked
    axes kept.

    Example:
      >>> import jax.numpy as jnp, sparse_jax
      >>> from flax import nnx
      >>> conv = nnx.Conv(8, 4, (3,), rngs=nnx.Rngs(0))
      >>> sparse = sparse_jax.nn.sparsify(conv, prune=True)
      >>> dense = sparse_jax.nn.densify(sparse)
      >>> x = jnp.ones((1, 5, 8))
      >>> type(dense).__name__, bool(jnp.allclose(dense(x), sparse(x)))
      ('Conv', True)
    """
    if isinstance(model, SparseKernelLayer):
        return _dense_of(model)
    model = nnx.clone(model)
    targets = [
        (tuple(p), n) for p, n in nnx.iter_graph(model) if p and isinstance(n, SparseKernelLayer)
    ]
    for path, node in targets:
        _replace(model, path, _dense_of(node))
    return model
