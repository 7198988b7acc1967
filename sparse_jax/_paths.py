"""Readable '/'-joined names for pytree leaves, shared by rules, reports and errors."""

from __future__ import annotations

from typing import Any

import jax

_WRAPPER_ATTRS = ("value", "raw_value")  # nnx.Variable stores its array under `.value`


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_to_str(path: tuple[Any, ...]) -> str:
    """Turns a jax key path into a name like ``'layers/0/kernel'``.

    The trailing ``value`` attribute that Flax NNX variables add is dropped, so a
    Linen dict, an ``nnx.State`` and a plain dict of the same model give the same
    names.
    """
    names = [_key_name(k) for k in path]
    if (
            names
            and isinstance(path[-1], jax.tree_util.GetAttrKey)
            and names[-1] in _WRAPPER_ATTRS
    ):
        names = names[:-1]
    return "/".join(names)


def is_none(x: Any) -> bool:
    """`is_leaf` for mask trees, where ``None`` marks a leaf that is not pruned."""
    return x is None
