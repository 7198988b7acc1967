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

Stacked layers (Linen ``nn.scan``, ``nnx.scan``/``nnx.vmap``, MaxText) carry
extra *stacked* axes that are never a group axis: the reduction axis is
chosen among the other axes exactly as for one layer, so every layer slice is
pruned on its own. Stacked axes come from, in this order:

1. a rule whose action is a `Layout` (``stacked=k`` leading axes, a tuple of
   axis indices, or logical axis names);
2. logical axis names the params carry (NNX ``Param`` metadata
   ``out_sharding``/``sharding_names``, Linen ``nn.LogicallyPartitioned`` /
   ``nn.Partitioned``): an axis named ``"layers"`` is stacked;
3. the layer kind the path names (``query``/``key``/``value``/``qkv``: 3 dims;
   ``out``: 3; ``Dense_0``, ``linear``, ``fc1``, ``mlp``, ``q_proj``, ...: 2;
   ``conv``: 3 to 5): a leaf with more dims than its kind explains is stacked
   over the extra leading axes.

Without a kind, a 2-d leaf is a dense kernel and a 4-d or 5-d one a conv
kernel; a 3-d leaf of unknown kind is skipped as ambiguous (a ``Conv1D``
``(k, in, out)``, a stacked dense ``(layers, in, out)`` and MaxText's
``(embed, layers, mlp)`` look alike): name its layout with a rule, or let
`sparse_jax.rules_from_computation` read it from the model's computation.

Skipped by default: non-float leaves, leaves with fewer than 2 non-stacked
dimensions (biases, norm scales, scalars), leaves named
``bias``/``scale``/``embedding`` (and anything under an ``embed`` module), norm
statistics, and leaves whose reduction size is not a multiple of ``m``.
Optionally ASP's size rule too.

User rules come first: a sequence of ``(regex, action)`` pairs matched with
``re.search`` against the leaf's path (``'encoder/layers/0/mlp/kernel'``);
the first match decides. An action is ``"skip"`` (or ``None``), an ``int``
axis to prune along, a `Layout`, or ``"default"`` to fall through to the
default rules. A forced axis is validated strictly: a size that ``m`` does
not divide, a stacked axis or a non-float leaf raises rather than being
skipped.
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


@dataclasses.dataclass(frozen=True)
class Layout:
    """A rule action that pins a leaf's layout: its reduction axis and stacked axes.

    Stacked (layer) axes are never a group axis: every slice along them is one
    layer, pruned, checked, reported and compressed as a layer on its own.

    Attributes:
      axis: the reduction axis of the whole leaf (an index into its shape), or
        ``None`` to let the default rules choose it among the non-stacked axes.
      stacked: the stacked axes: an ``int`` k for the k leading axes, or a
        tuple of axis indices.
      skip: if set, the leaf is not pruned, with this text as the reason.
      source: where the layout comes from, for reports: ``"rule"`` (written by
        the user) or ``"computation"`` (`sparse_jax.rules_from_computation`).

    Examples (rules are ``(regex, action)`` pairs, first match wins):
      >>> import jax.numpy as jnp, sparse_jax
      >>> params = {"blocks": {"mlp": {"kernel": jnp.ones((6, 16, 32))}}}
      >>> rules = [(r"^blocks/", sparse_jax.Layout(stacked=1))]  # 1 leading layer axis
      >>> [(p.axis, p.stacked_axes) for p in sparse_jax.plan_tree(params, rules=rules)]
      [(1, (0,))]

      A catch-all rule with logical names marks axes named ``"stage"`` (as NNX
      ``Param`` metadata or Linen ``nn.LogicallyPartitioned`` carry them) as
      stacked, in place of the default name ``"layers"``:

      >>> rules = [(".*", sparse_jax.Layout(stacked=("stage",)))]
    """

    axis: int | None = None
    stacked: int | tuple[int | str, ...] = ()
    skip: str | None = None
    source: str = "rule"

    def stacked_axes(
        self, ndim: int, names: tuple[str | None, ...] | None = None, *, where: str = ""
    ) -> tuple[int, ...]:
        """The stacked axes as sorted non-negative indices for a leaf of ``ndim`` dims.

        A string in ``stacked`` names a logical axis: it marks the axes of a
        leaf whose logical names (``names``) include it, and nothing on a leaf
        without such an axis.
        """
        if isinstance(self.stacked, (int, np.integer)) and not isinstance(self.stacked, bool):
            if not 0 <= self.stacked < ndim:
                raise ValueError(
                    f"{where}Layout(stacked={self.stacked}) needs fewer leading stacked "
                    f"axes than the leaf's {ndim} dims"
                )
            return tuple(range(int(self.stacked)))
        axes = set()
        for entry in self.stacked:
            if isinstance(entry, str):
                if names is not None and len(names) == ndim:
                    axes.update(i for i, name in enumerate(names) if name == entry)
            else:
                axes.add(_patterns.normalize_axis(int(entry), ndim, where=where))
        if axes and len(axes) >= ndim:
            raise ValueError(f"{where}Layout(stacked={self.stacked}) leaves no axis to prune along")
        return tuple(sorted(axes))

    @property
    def names_stacked(self) -> bool:
        """Whether ``stacked`` names logical axes (which replace the default names)."""
        return not isinstance(self.stacked, (int, np.integer)) and any(
            isinstance(e, str) for e in self.stacked
        )


Action = Union[int, str, None, Layout]
Rules = Sequence[tuple[str, Action]]

_SKIP_NAMES = frozenset(
    {"bias", "scale", "embedding", "mean", "var", "running_mean", "running_var"}
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
      stacked_axes: stacked (layer) axes, never a group axis; each slice along
        them is one layer.
      source: where the axis came from: ``"default"`` (the name/shape
        defaults), ``"rule"`` (a user rule), ``"names"`` (logical axis names
        carried by the params) or ``"computation"`` (a rule from
        `sparse_jax.rules_from_computation`).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    axis: int | None
    reason: str
    stacked_axes: tuple[int, ...] = ()
    source: str = "default"

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
            or isinstance(action, Layout)
            or action in ("skip", "default")
            or (isinstance(action, (int, np.integer)) and not isinstance(action, bool))
        )
        if not valid:
            raise ValueError(
                f"rule {pattern!r}: action must be 'skip', None, 'default', an int "
                f"axis or a sparse_jax.Layout, got {action!r}"
            )
        compiled.append((re.compile(pattern), action))
    return compiled


# Layer kinds recognised from a module name, innermost module first. Each kind
# explains a base rank; extra leading axes of a known kind are stacked layers.
_KIND_PATTERNS = (
    ("qkv", re.compile(r"^(query|key|value|qkv)$")),
    ("attention_out", re.compile(r"^out$")),
    ("conv", re.compile(r"conv")),
    (
        "dense",
        re.compile(
            r"^(dense|linear|densegeneral|lineargeneral|fc|mlp|ffn|wi|wo|wq|wk|wv|"
            r"[qkvo]_proj|out_proj|up_proj|down_proj|gate_proj|c_fc|c_proj|c_attn|lm_head|"
            r"classifier|intermediate|output)(_?\d+)?$"
        ),
    ),
)
# kind -> (base rank, reduction axis within the base layout)
_BASE_LAYOUT = {"qkv": (3, 0), "attention_out": (3, 1), "dense": (2, 0)}
_MAX_CONV_RANK = 5  # (D, H, W, in, out)
AMBIGUOUS = "ambiguous layout: declare stacked axes with a rule"
DEFAULT_STACKED_NAMES = ("layers",)


def layer_kind(path: str) -> str | None:
    """The layer kind the path names (innermost module first), or None."""
    modules = [p.lower() for p in path.split("/")[:-1] if not p.isdigit()]
    for module in reversed(modules):
        for kind, pattern in _KIND_PATTERNS:
            if pattern.search(module):
                return kind
    return None


def _default_layout(
    path: str, shape: tuple[int, ...], stacked: tuple[int, ...]
) -> tuple[int | None, tuple[int, ...], str]:
    """(axis, stacked axes, why) from the name and shape; axis None means skip.

    ``stacked`` are axes already known to be stacked (rule or logical names);
    more leading axes are added when a known kind explains fewer dims.
    """
    free = [a for a in range(len(shape)) if a not in stacked]
    rank = len(free)
    kind = layer_kind(path)
    if kind in ("qkv", "attention_out") and rank == 2:
        kind = "dense"  # a fused or plain (in, out) projection
    if kind in _BASE_LAYOUT:
        base_rank, base_axis = _BASE_LAYOUT[kind]
        if rank < base_rank:
            return None, stacked, f"{kind} kernel with {rank} non-stacked dims, expected {base_rank}"
        extra = rank - base_rank
        stacked = tuple(sorted(set(stacked) | set(free[:extra])))
        return free[extra + base_axis], stacked, ""
    if rank == 2:
        return free[0], stacked, ""
    if kind == "conv" or (kind is None and not stacked and rank in (4, 5)):
        if rank > _MAX_CONV_RANK:
            return None, stacked, AMBIGUOUS
        return free[-2], stacked, ""
    if kind is None and stacked and rank >= 3:
        return free[-2], stacked, ""  # stacked convs: (..., in, out) per layer
    return None, stacked, AMBIGUOUS


def _asp_size_ok(shape: tuple[int, ...], axis: int, stacked: tuple[int, ...]) -> bool:
    # ASP (apex) prunes only layers whose out % 8 == 0 and in % 16 == 0.
    later = [s for i, s in enumerate(shape) if i > axis and i not in stacked]
    earlier = [s for i, s in enumerate(shape) if i < axis and i not in stacked]
    out_size = math.prod(later) if later else math.prod(earlier)
    return shape[axis] % 16 == 0 and out_size % 8 == 0


def _plan_leaf(
    path: str,
    leaf: Any,
    n: int,
    m: int,
    rules: list[tuple[re.Pattern[str], Action]],
    asp_size_rule: bool,
    names: tuple[str | None, ...] | None = None,
) -> LeafPlan:
    # Abstract leaves (jax.ShapeDtypeStruct, from nnx.eval_shape) are planned too.
    shape = tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    where = f"{path or '<root>'} {shape}: "
    stacked: tuple[int, ...] = ()
    source = "default"
    if names is not None and len(names) == len(shape):
        stacked = tuple(i for i, name in enumerate(names) if name in DEFAULT_STACKED_NAMES)

    def plan(axis: int | None, reason: str) -> LeafPlan:
        return LeafPlan(path, shape, str(dtype), axis, reason, stacked, source)

    def check_float(rule: str) -> None:
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{where}rule {rule!r} asks to prune a {dtype} leaf; "
                "only floating-point parameters can be pruned"
            )

    forced_axis = None
    for pattern, action in rules:
        if not pattern.search(path):
            continue
        if action is None or action == "skip":
            return plan(None, f"skipped by rule {pattern.pattern!r}")
        if action == "default":
            break
        if isinstance(action, Layout):
            computed = action.source == "computation"
            label = "the computation" if computed else f"rule {pattern.pattern!r}"
            suffix = "" if computed else f" by {label}"  # the report's "from" column says it
            source = action.source
            if action.stacked != () or action.names_stacked:
                stacked = action.stacked_axes(len(shape), names, where=where)
            if action.skip is not None:
                return plan(None, action.skip if computed else f"{action.skip} ({label})")
            if action.axis is None:
                break  # stacked axes declared; the defaults choose the axis among the rest
            check_float(pattern.pattern)
            forced_axis = _patterns.normalize_axis(int(action.axis), len(shape), where=where)
            if forced_axis in stacked:
                raise ValueError(f"{where}{label} prunes along axis {forced_axis}, a stacked axis")
            if computed and shape[forced_axis] % m:
                # A computed axis is a fact about the model, not a demand: skip like the defaults.
                return plan(
                    None,
                    f"reduction size {shape[forced_axis]} (axis {forced_axis}) not a multiple of {m}",
                )
        else:
            check_float(pattern.pattern)
            label, source = f"rule {pattern.pattern!r}", "rule"
            suffix = f" by {label}"
            forced_axis = int(action)
        axis = _patterns.check_nm_args(shape, n, m, forced_axis, where=where)
        return plan(axis, f"pruned along axis {axis}{suffix}")

    if stacked and source == "default":
        source = "names"
    if not jnp.issubdtype(dtype, jnp.floating):
        return plan(None, f"not floating-point ({dtype})")
    if len(shape) - len(stacked) < 2:
        return plan(None, "fewer than 2 dims (bias, norm or scalar)")
    name = path.rsplit("/", 1)[-1]
    if name in _SKIP_NAMES:
        return plan(None, f"'{name}' is not a matmul weight")
    if "embed" in path.lower():
        return plan(None, "embedding")
    axis, stacked, why = _default_layout(path, shape, stacked)
    if axis is None:
        return plan(None, why)
    free = [a for a in range(len(shape)) if a not in stacked]
    if len(free) >= 3 and axis == free[-2] and shape[axis] == 1:
        return plan(None, f"depthwise conv (1 input channel per group) cannot be {n}:{m}")
    if shape[axis] % m:
        return plan(None, f"reduction size {shape[axis]} (axis {axis}) not a multiple of {m}")
    if asp_size_rule and not _asp_size_ok(shape, axis, stacked):
        return plan(None, "ASP size rule (in % 16, out % 8)")
    return plan(axis, f"pruned along axis {axis}")


def _logical_names(node: Any) -> tuple[str | None, ...] | None:
    """Axis names an NNX variable or a Linen partitioning box carries, if any."""
    get_metadata = getattr(node, "get_metadata", None)
    if callable(get_metadata):  # nnx.Variable: out_sharding (flax 0.12), sharding_names before
        meta = get_metadata()
        for key in ("out_sharding", "sharding_names", "sharding"):
            value = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(value, (tuple, list)):
                return tuple(value)
        return None
    value = getattr(node, "names", None)  # nn.LogicallyPartitioned / nn.Partitioned
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return None


def _is_named_box(node: Any) -> bool:
    try:
        from flax import nnx
        from flax.core import meta
    except ImportError:  # pragma: no cover
        return False
    return isinstance(node, (nnx.Variable, meta.AxisMetadata))


def leaf_names(params: Any) -> list[tuple[str | None, ...] | None]:
    """Per array leaf (``jax.tree.leaves`` order), the logical axis names it carries."""
    out: list[tuple[str | None, ...] | None] = []
    for node in jax.tree.leaves(params, is_leaf=_is_named_box):
        count = len(jax.tree.leaves(node)) if _is_named_box(node) else 1
        names = _logical_names(node) if _is_named_box(node) else None
        out.extend([names] * count)
    return out


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
    names = leaf_names(params)
    return [
        _plan_leaf(_paths.path_to_str(path), leaf, n, m, compiled, asp_size_rule, leaf_axis_names)
        for (path, leaf), leaf_axis_names in zip(leaves, names)
    ]
