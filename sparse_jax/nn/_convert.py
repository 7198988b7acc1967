"""Converting a pruned NNX model's ``Linear`` layers to `SparseLinear` and back."""

from __future__ import annotations

from typing import Any

from flax import nnx

from sparse_jax._patterns import is_nm_sparse
from sparse_jax.nn._sparse_linear import SparseLinear


def _eligible(linear: nnx.Linear, prune: bool) -> bool:
    kernel = linear.kernel[...]
    if kernel.ndim != 2 or kernel.shape[0] % 4:
        return False
    return prune or bool(is_nm_sparse(kernel, 2, 4, axis=0))


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


def _swap(model, match, convert):
    if match(model):
        return convert(model)
    model = nnx.clone(model)
    targets = [(path, node) for path, node in nnx.iter_graph(model) if path and match(node)]
    for path, node in targets:
        _replace(model, tuple(path), convert(node))
    return model


def sparsify(model: nnx.Module, *, prune: bool = False, impl: str = "auto") -> nnx.Module:
    """A copy of ``model`` whose 2:4 ``nnx.Linear`` layers are `SparseLinear`.

    A ``Linear`` is converted when its kernel is 2:4 along the input axis
    (as `sparse_jax.prune` leaves it); others (input size not a multiple of
    4, or not 2:4) stay dense. ``model`` itself is not modified.

    Args:
      model: an NNX model, typically after ``prune`` + ``nnx.update``.
      prune: convert every ``Linear`` whose input size is a multiple of 4,
        keeping the 2 largest magnitudes per group.
      impl: `sparse_jax.matmul`'s ``impl`` for the new layers.

    Example:
      >>> import jax.numpy as jnp, sparse_jax
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
      >>> state = nnx.state(model, nnx.Param)
      >>> pruned, masks = sparse_jax.prune(state)
      >>> nnx.update(model, pruned)
      >>> sparse = sparse_jax.nn.sparsify(model)
      >>> type(sparse.layers[0]).__name__
      'SparseLinear'
      >>> bool(jnp.allclose(sparse(jnp.ones((1, 8))), model(jnp.ones((1, 8))), atol=1e-5))
      True
    """
    return _swap(
        model,
        lambda node: isinstance(node, nnx.Linear) and _eligible(node, prune),
        lambda node: SparseLinear.from_linear(node, prune=prune, impl=impl),
    )


def densify(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every `SparseLinear` back as an ``nnx.Linear``."""
    return _swap(model, lambda node: isinstance(node, SparseLinear), SparseLinear.to_linear)
