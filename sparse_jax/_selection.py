"""Which leaves of a parameter tree get an N:M pattern, and along which axis.

The default rules follow the hardware: Sparse Tensor Cores (and TensorRT,
cuSPARSELt) need the groups of 4 along a matmul's reduction (input) dimension.

==============================================  ==========================
leaf                                            reduction axis
==============================================  ==========================
``Dense``/``Linear`` kernel ``(in, out)``       0
``Conv`` kernel ``(..., in, out)``              -2 (for a grouped conv,
                                                ``in`` is per group)
attention ``query``/``key``/``value`` kernels   0 (``(in, heads, head_dim)``)
attention ``out`` kernel ``(heads, dim, out)``  -2 (``dim``, contiguous in
                                                the flattened ``heads*dim``)
``Einsum`` and other contractions               a user rule (the contracted
                                                axis is not in the shape)
==============================================  ==========================

Skipped by default: non-float leaves, leaves with fewer than 2 dimensions
(biases, norm scales, scalars), leaves named ``bias``/``scale``/``embedding``
(and anything under an ``embed`` module), norm statistics, and leaves whose
reduction size is not a multiple of ``m``. Optionally ASP's size rule too.

User rules come first: a sequence of ``(regex, action)`` pairs matched with
``re.search`` against the leaf's path (``'encoder/layers/0/mlp/kernel'``);
the first match decides. An action is ``"skip"`` (or ``None``), an ``int``
axis to prune along, or ``"default"`` to fall through to the default rules.
A forced axis is validated strictly: a size that ``m`` does not divide or a
non-float leaf raises rather than being skipped.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _paths, _patterns

Action = Union[int, str, None]
Rules = Sequence[tuple[str, Action]]

_SKIP_NAMES = frozenset(
    {"bias", "scale", "embedding", "mean", "var", "running_mean", "running_var"}
)
_ATTENTION_INPUT_NAMES = frozenset(
    {"query", "key", "value", "qkv", "q_proj", "k_proj", "v_proj"}
)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """What the rules decided for one leaf.

    Attributes:
      path: the leaf's name, ``'/'``-joined.
      shape: its shape.
      dtype: its dtype, as a string.
      axis: the (non-negative) axis the groups run along, or ``None`` if skipped.
      reason: why it is pruned or skipped, for reports.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    axis: int | None
    reason: str

    @property
    def pruned(self) -> bool:
        return self.axis is not None


def _validate_rules(rules: Rules | None) -> list[tuple[re.Pattern[str], Action]]:
    if rules is None:
        return []
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(
            "rules must be a sequence of (regex, action) pairs, "
            f"got {type(rules).__name__}"
        )
    compiled = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise TypeError(f"each rule must be a (regex, action) pair, got {rule!r}")
        pattern, action = rule
        valid = (
            action is None
            or action in ("skip", "default")
            or (isinstance(action, (int, np.integer)) and not isinstance(action, bool))
        )
        if not valid:
            raise ValueError(
                f"rule {pattern!r}: action must be 'skip', None, 'default' or an "
                f"int axis, got {action!r}"
            )
        compiled.append((re.compile(pattern), action))
    return compiled


def _default_axis(path: str, shape: tuple[int, ...]) -> int:
    if len(shape) == 2:
        return 0
    parts = set(path.split("/"))
    if parts & _ATTENTION_INPUT_NAMES:
        return 0
    return len(shape) - 2


def _asp_size_ok(shape: tuple[int, ...], axis: int) -> bool:
    # ASP (apex) prunes only layers whose out % 8 == 0 and in % 16 == 0.
    out_size = math.prod(shape[axis + 1 :]) if axis + 1 < len(shape) else shape[0]
    return shape[axis] % 16 == 0 and out_size % 8 == 0


def _plan_leaf(
    path: str,
    leaf: Any,
    n: int,
    m: int,
    rules: list[tuple[re.Pattern[str], Action]],
    asp_size_rule: bool,
) -> LeafPlan:
    # Abstract leaves (jax.ShapeDtypeStruct, from nnx.eval_shape) are planned too.
    shape = tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    where = f"{path or '<root>'} {shape}: "

    def plan(axis: int | None, reason: str) -> LeafPlan:
        return LeafPlan(path, shape, str(dtype), axis, reason)

    for pattern, action in rules:
        if not pattern.search(path):
            continue
        if action is None or action == "skip":
            return plan(None, f"skipped by rule {pattern.pattern!r}")
        if action == "default":
            break
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{where}rule {pattern.pattern!r} asks to prune a {dtype} leaf; "
                "only floating-point parameters can be pruned"
            )
        axis = _patterns.check_nm_args(shape, n, m, int(action), where=where)
        return plan(axis, f"pruned along axis {axis} by rule {pattern.pattern!r}")

    if not jnp.issubdtype(dtype, jnp.floating):
        return plan(None, f"not floating-point ({dtype})")
    if len(shape) < 2:
        return plan(None, "fewer than 2 dims (bias, norm or scalar)")
    name = path.rsplit("/", 1)[-1]
    if name in _SKIP_NAMES:
        return plan(None, f"'{name}' is not a matmul weight")
    if "embed" in path.lower():
        return plan(None, "embedding")
    axis = _default_axis(path, shape)
    if len(shape) >= 3 and axis == len(shape) - 2 and shape[axis] == 1:
        return plan(None, f"depthwise conv (1 input channel per group) cannot be {n}:{m}")
    if shape[axis] % m:
        return plan(None, f"reduction size {shape[axis]} (axis {axis}) not a multiple of {m}")
    if asp_size_rule and not _asp_size_ok(shape, axis):
        return plan(None, "ASP size rule (in % 16, out % 8)")
    return plan(axis, f"pruned along axis {axis}")


def plan_tree(
    params: Any,
    n: int = 2,
    m: int = 4,
    rules: Rules | None = None,
    *,
    asp_size_rule: bool = False,
) -> list[LeafPlan]:
    """Decides, for each leaf of ``params``, whether and along which axis to prune.

    Args:
      params: any pytree of arrays: a plain dict, Flax Linen ``params``, or an
        ``nnx.State``.
      n: kept entries per group.
      m: group size.
      rules: user rules, ``(regex, action)`` pairs tried before the defaults.
      asp_size_rule: also skip layers ASP would skip (in % 16 or out % 8).

    Returns:
      One `LeafPlan` per leaf, in ``jax.tree.leaves(params)`` order.
    """
    _patterns.check_nm_args((m,), n, m, 0, where="")
    compiled = _validate_rules(rules)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [
        _plan_leaf(_paths.path_to_str(path), leaf, n, m, compiled, asp_size_rule)
        for path, leaf in leaves
    ]
