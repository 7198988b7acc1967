"""Which parameter axes share a channel dimension, read from the computation.

`channel_groups` traces ``fn(variables, *args, **kwargs)`` once with
`jax.make_jaxpr` (nothing runs) and follows every *dimension* of every traced
value: two dims are tied when permuting one forces the same permutation of the
other for the function to stay the same. A union-find over dims does the
bookkeeping; a group is every params/state axis tied to one channel dim.

How dims are tied
-----------------
* elementwise ops (``add``, ``mul``, ``max`` for a ReLU, casts, ``select_n``):
  each dim of every full-shape operand with the same dim of the result (a
  residual add ties the two branches; a bias or a norm scale joins the
  channel it is broadcast onto);
* ``dot_general``: contracting dims of the two operands with each other,
  batch dims with the result's, free dims with the result's;
* ``conv_general_dilated``: the input's feature dim with the kernel's input
  feature dim, the kernel's output feature dim with the result's. A depthwise
  convolution (one input channel per group, as many outputs as inputs) ties
  its input channels to its output channels. A grouped convolution (G groups
  of several channels) lets channels move only within their group, and the
  same way in every group: its input channels become G copies of the
  kernel's input axis and its output channels G copies of a per-group axis
  (`ChannelGroup.copies`; moving whole groups is not searched). A depthwise
  convolution with a channel multiplier fixes both sides;
* ``reshape`` (dims kept as they are, or size-1 dims added/removed),
  ``transpose``, ``squeeze``, ``broadcast_in_dim``, reductions (a sum or max
  over channels does not care about their order), ``reduce_window`` (pooling)
  over other dims, full-range ``slice`` / ``pad`` / ``dynamic_slice``;
* ``pjit``, ``closed_call``, ``remat``, ``custom_jvp_call``,
  ``custom_vjp_call``: into the inner jaxpr.

What fixes a dim (its group is left alone, with the reason)
-----------------------------------------------------------
The dims of ``fn``'s non-variable inputs (the image channels) and of its
outputs (the logits), constants, new dims an op creates (a broadcast, conv
spatial dims, ``iota``), non-float variables, a reshape that merges or splits
the dim (a flatten before a classifier), a partial slice or pad, a
concatenation or ``split`` along it, ``argmax`` / ``cumsum`` / ``rev`` along
it, a depthwise convolution with a channel multiplier, and every op this walk
does not know (``sort``, ``gather``, ``scan``, ``while``, ``cond``...: all of
their dims). A fixed dim fixes every dim tied to it (and the channels a grouped
convolution's groups are made of).

Trace the inference computation (NNX: ``model(x, train=False)``): an output
is fixed, so a training step that returns the updated batch statistics would
fix every channel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from sparse_jax import _paths
from sparse_jax._trace import _CALL_JAXPR_PARAMS, _ELEMENTWISE, _IDENTITY, _is_array, _is_float

_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor".split()
)
_ORDERED_ALONG_AXIS = frozenset("argmax argmin cumsum cumprod cummax cummin cumlogsumexp".split())
_REDUCE_WINDOW = frozenset(
    "reduce_window_max reduce_window_min reduce_window_sum reduce_window".split()
)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Variable axes that must be permuted together.

    Attributes:
      size: the channel count (per group, for the channels of a grouped convolution).
      members: ``(path, axis)`` per tied variable axis, in leaf order.
      reason: why the group may not be permuted, or None when it may.
    """

    size: int
    members: tuple[tuple[str, int], ...]
    reason: str | None = None
    leaves: tuple[int, ...] = ()  # leaf index of each member (jax.tree.leaves order)
    # per member, how many copies of the group's channels its axis holds: > 1 for the channels
    # of a grouped convolution's groups (each group permuted the same way)
    copies: tuple[int, ...] = ()

    def axis_order(self, member: int, order: Any) -> np.ndarray:
        """The order of member ``member``'s axis for the group order ``order``."""
        order = np.asarray(order)
        copies = self.copies[member] if self.copies else 1
        return (np.arange(copies)[:, None] * self.size + order[None, :]).reshape(-1)

    @property
    def permutable(self) -> bool:
        return self.reason is None


@dataclasses.dataclass(frozen=True)
class ChannelCoupling:
    """The groups `channel_groups` found; ``str()`` is a readable report."""

    groups: tuple[ChannelGroup, ...]
    paths: tuple[str, ...]  # every leaf's path, in jax.tree.leaves order

    @property
    def permutable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.permutable)

    def __str__(self) -> str:
        lines = [f"{len(self.groups)} channel groups, {len(self.permutable)} permutable"]
        for i, group in enumerate(self.groups):
            state = "permutable" if group.permutable else f"left alone: {group.reason}"
            copies = group.copies or (1,) * len(group.members)
            members = ", ".join(f"{p}[{a}]" + (f" ({c} groups)" if c > 1 else "")
                                for (p, a), c in zip(group.members, copies))
            lines.append(f"  {i}: {group.size} channels, {state}: {members}")
        return "\n".join(lines)


class _Dims:
    """Union-find over dims; a root carries its size and the reasons it is fixed."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.reasons: dict[int, set[str]] = {}
        # root -> (node, count): the root's channels are `count` copies of node's, permuted
        # the same way in every copy (the channels of a grouped convolution's groups).
        self.tiles: dict[int, tuple[int, int]] = {}

    def new(self, size: int, reason: str | None = None) -> int:
        node = len(self.parent)
        self.parent.append(node)
        self.size.append(int(size))
        if reason is not None:
            self.reasons[node] = {reason}
        return node

    def find(self, node: int) -> int:
        root = node
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[node] != root:
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # cannot happen for well-typed ops; be safe
            self.fix(ra, "dims of different sizes meet")
            self.fix(rb, "dims of different sizes meet")
        self.parent[rb] = ra
        if rb in self.reasons:
            self.reasons.setdefault(ra, set()).update(self.reasons.pop(rb))
        if rb in self.tiles:
            self.tile(ra, *self.tiles.pop(rb))

    def tile(self, node: int, inner: int, count: int) -> None:
        """Ties ``node``'s channels to ``count`` copies of ``inner``'s."""
        root = self.find(node)
        if root in self.tiles:
            old_inner, old_count = self.tiles[root]
            if old_count == count:
                self.union(old_inner, inner)
            else:
                reason = f"grouped convolutions with {old_count} and {count} groups meet"
                self.fix(root, reason)
                self.fix(inner, reason)
        else:
            self.tiles[root] = (inner, count)

    def resolve(self, node: int) -> tuple[int, int]:
        """The root a node's channels are finally made of, and how many copies of it."""
        root, copies = self.find(node), 1
        for _ in range(64):  # sizes shrink along a chain; the bound only guards bad input
            if root not in self.tiles:
                break
            inner, count = self.tiles[root]
            root, copies = self.find(inner), copies * count
        return root, copies

    def fix(self, node: int, reason: str) -> None:
        self.reasons.setdefault(self.find(node), set()).add(reason)


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(getattr(var.aval, "shape", ()))


class _Walker:
    def __init__(self, dims: _Dims):
        self.d = dims

    def fresh(self, shape: Sequence[int], reason: str) -> list[int]:
        return [self.d.new(s, reason) for s in shape]

    def read(self, env: dict, var: Any) -> list[int]:
        if isinstance(var, jax.extend.core.Literal) or var not in env:
            return self.fresh(_shape(var), "a constant")
        return env[var]

    def walk(self, jaxpr: Any, consts_dims: Sequence[list[int]], in_dims: Sequence[list[int]]):
        env: dict = {}
        for var, dims in zip(jaxpr.constvars, consts_dims):
            env[var] = dims
        for var, dims in zip(jaxpr.invars, in_dims):
            env[var] = dims
        for eqn in jaxpr.eqns:
            ins = [self.read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for var, dims in zip(eqn.outvars, outs):
                env[var] = dims
        return [self.read(env, v) for v in jaxpr.outvars]

    def walk_closed(self, closed: Any, in_dims: Sequence[list[int]]):
        if hasattr(closed, "consts"):  # ClosedJaxpr
            consts = [self.fresh(np.shape(c), "a constant") for c in closed.consts]
            return self.walk(closed.jaxpr, consts, in_dims)
        return self.walk(closed, [], in_dims)

    def unknown(self, eqn: Any, ins: list[list[int]], why: str | None = None) -> list[list[int]]:
        reason = why or f"reaches {eqn.primitive.name}, which this walk does not follow"
        for dims in ins:
            for node in dims:
                self.d.fix(node, reason)
        return [self.fresh(_shape(v), reason) for v in eqn.outvars]

    def eqn(self, eqn: Any, ins: list[list[int]]) -> list[list[int]]:
        name = eqn.primitive.name
        for key in _CALL_JAXPR_PARAMS:
            inner = eqn.params.get(key)
            if inner is not None and (hasattr(inner, "eqns") or hasattr(inner, "jaxpr")):
                n_in = len(getattr(inner, "jaxpr", inner).invars)
                return self.walk_closed(inner, ins[len(ins) - n_in:])
        if name in _ELEMENTWISE or name in _IDENTITY:
            return self.elementwise(eqn, ins)
        method = getattr(self, f"op_{name}", None)
        if method is None:
            return self.unknown(eqn, ins)
        return method(eqn, ins)

    def elementwise(self, eqn, ins):
        outs = []
        for var in eqn.outvars:
            shape = _shape(var)
            out: list[int | None] = [None] * len(shape)
            for dims, v in zip(ins, eqn.invars):
                in_shape = _shape(v)
                if in_shape == ():
                    continue
                if len(in_shape) != len(shape):  # not in jaxprs; be safe
                    for node in dims:
                        self.d.fix(node, f"a rank-changing broadcast in {eqn.primitive.name}")
                    continue
                for i, (node, size) in enumerate(zip(dims, in_shape)):
                    if size != shape[i]:  # a size-1 dim broadcast: no tie
                        continue
                    if out[i] is None:
                        out[i] = node
                    else:
                        self.d.union(out[i], node)
            outs.append([node if node is not None else self.d.new(size, "a broadcast dim")
                         for node, size in zip(out, shape)])
        return outs

    def op_transpose(self, eqn, ins):
        return [[ins[0][p] for p in eqn.params["permutation"]]]

    def op_squeeze(self, eqn, ins):
        drop = {d % len(ins[0]) for d in eqn.params["dimensions"]}
        return [[n for i, n in enumerate(ins[0]) if i not in drop]]

    def op_broadcast_in_dim(self, eqn, ins):
        shape = eqn.params["shape"]
        out = self.fresh(shape, "a new dim made by broadcast_in_dim")
        in_shape = _shape(eqn.invars[0])
        for src, dst in enumerate(eqn.params["broadcast_dimensions"]):
            if in_shape[src] == shape[dst]:
                out[dst] = ins[0][src]
        return [out]

    def op_reshape(self, eqn, ins):
        in_shape, out_shape = _shape(eqn.invars[0]), tuple(eqn.params["new_sizes"])
        out = self.fresh(out_shape, "made by a reshape that merges or splits dims")
        i = j = 0
        reason = "a reshape merges or splits it with other dims"
        while i < len(in_shape) or j < len(out_shape):
            if i < len(in_shape) and in_shape[i] == 1:
                i += 1
                continue
            if j < len(out_shape) and out_shape[j] == 1:
                j += 1
                continue
            if i >= len(in_shape) or j >= len(out_shape):
                break
            if in_shape[i] == out_shape[j]:
                out[j] = ins[0][i]
                i, j = i + 1, j + 1
                continue
            # a block of dims with equal products on both sides: merged or split
            pi, pj, i0, j0 = in_shape[i], out_shape[j], i, j
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    pi *= in_shape[i]
                    i += 1
                else:
                    pj *= out_shape[j]
                    j += 1
            for node in ins[0][i0:i]:
                self.d.fix(node, reason)
        return [out]

    def reduce_axes(self, eqn, ins, axes, fix_reason=None):
        axes = {a % max(len(ins[0]), 1) for a in axes}
        if fix_reason:
            for a in axes:
                self.d.fix(ins[0][a], fix_reason)
        kept = [n for i, n in enumerate(ins[0]) if i not in axes]
        return [kept if len(_shape(v)) == len(kept) else self.fresh(_shape(v), "reduced")
                for v in eqn.outvars]

    def op_argmax(self, eqn, ins):
        return self.reduce_axes(eqn, ins, eqn.params["axes"], "argmax/argmin along it")

    op_argmin = op_argmax

    def along_axis(self, eqn, ins):
        self.d.fix(ins[0][eqn.params["axis"] % len(ins[0])], f"{eqn.primitive.name} along it")
        return [list(ins[0])]

    def op_rev(self, eqn, ins):
        for d in eqn.params["dimensions"]:
            self.d.fix(ins[0][d], "reversed")
        return [list(ins[0])]

    def same_or_fix(self, ins, keep: Sequence[bool], reason: str, out_shape):
        out = self.fresh(out_shape, reason)
        for i, ok in enumerate(keep):
            if ok:
                out[i] = ins[0][i]
            else:
                self.d.fix(ins[0][i], reason)
        return out

    def op_slice(self, eqn, ins):
        in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
        strides = eqn.params.get("strides") or (1,) * len(in_shape)
        keep = [a == b and s == 1 for a, b, s in zip(in_shape, out_shape, strides)]
        return [self.same_or_fix(ins, keep, "a partial slice of it", out_shape)]

    def op_dynamic_slice(self, eqn, ins):
        in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
        keep = [a == b for a, b in zip(in_shape, out_shape)]
        return [self.same_or_fix(ins, keep, "a partial slice of it", out_shape)]

    def op_pad(self, eqn, ins):
        in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
        keep = [tuple(c) == (0, 0, 0) for c in eqn.params["padding_config"]]
        return [self.same_or_fix(ins, keep, "padded", out_shape)]

    def op_concatenate(self, eqn, ins):
        axis = eqn.params["dimension"]
        out = self.fresh(_shape(eqn.outvars[0]), "a concatenation along it")
        for dims in ins:
            self.d.fix(dims[axis], "a concatenation along it")
        for i in range(len(out)):
            if i != axis:
                out[i] = ins[0][i]
                for dims in ins[1:]:
                    self.d.union(ins[0][i], dims[i])
        return [out]

    def op_split(self, eqn, ins):
        axis = eqn.params["axis"] % len(ins[0])
        self.d.fix(ins[0][axis], "split along it")
        outs = []
        for var in eqn.outvars:
            out = list(ins[0])
            out[axis] = self.d.new(_shape(var)[axis], "split along it")
            outs.append(out)
        return outs

    def op_reduce_window(self, eqn, ins):
        p = eqn.params
        n_operands = len(eqn.outvars)
        rank = len(ins[0])
        pads = p.get("padding", ((0, 0),) * rank)
        keep = [
            p["window_dimensions"][i] == 1 and p["window_strides"][i] == 1
            and tuple(pads[i]) == (0, 0)
            and p.get("base_dilation", (1,) * rank)[i] == 1
            and p.get("window_dilation", (1,) * rank)[i] == 1
            for i in range(rank)
        ]
        outs = []
        for k in range(n_operands):
            out = self.fresh(_shape(eqn.outvars[k]), "pooled over")
            for i, ok in enumerate(keep):
                if ok:
                    out[i] = ins[k][i]
                else:
                    self.d.fix(ins[k][i], "pooled over")
            outs.append(out)
        return outs

    op_reduce_window_max = op_reduce_window_min = op_reduce_window_sum = op_reduce_window

    def op_dot_general(self, eqn, ins):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins[0], ins[1]
        for a, b in zip(lc, rc):
            self.d.union(lhs[a], rhs[b])
        for a, b in zip(lb, rb):
            self.d.union(lhs[a], rhs[b])
        out = [lhs[a] for a in lb]
        out += [n for i, n in enumerate(lhs) if i not in lc and i not in lb]
        out += [n for i, n in enumerate(rhs) if i not in rc and i not in rb]
        return [out]

    def op_conv_general_dilated(self, eqn, ins):
        p = eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        lhs, rhs = ins[0], ins[1]
        out = self.fresh(_shape(eqn.outvars[0]), "a convolution's spatial dim")
        window = "a convolution's spatial dim"
        for spec, dims in ((lhs_spec, lhs), (rhs_spec, rhs)):
            for d in spec[2:]:
                self.d.fix(dims[d], window)
        groups, batch_groups = p["feature_group_count"], p["batch_group_count"]
        lf, rin, rout, of = lhs[lhs_spec[1]], rhs[rhs_spec[1]], rhs[rhs_spec[0]], out_spec[1]
        lhs_c, rin_c, rout_c = self.d.size[lf], self.d.size[rin], self.d.size[rout]
        if batch_groups != 1:
            return self.unknown(eqn, ins, "a convolution with batch_group_count > 1")
        out[out_spec[0]] = lhs[lhs_spec[0]]
        if groups == 1:
            self.d.union(lf, rin)
            out[of] = rout
        elif rin_c == 1 and rout_c == lhs_c:  # depthwise: output channel c reads input c
            self.d.union(lf, rout)
            out[of] = rout
        elif rin_c > 1 and rout_c % groups == 0:
            # Within a group, and the same way in every group: the input channels as `groups`
            # copies of the kernel's input axis, the outputs as copies of a per-group axis.
            self.d.tile(lf, rin, groups)
            self.d.tile(rout, self.d.new(rout_c // groups), groups)
            out[of] = rout
        else:
            reason = (f"a grouped convolution ({groups} groups of {rin_c} input channel"
                      f"{'s' if rin_c > 1 else ''} and {rout_c} outputs)")
            for node in (lf, rin, rout):
                self.d.fix(node, reason)
            out[of] = rout
        return [out]

    def op_cumsum(self, eqn, ins):
        return self.along_axis(eqn, ins)

    op_cumprod = op_cummax = op_cummin = op_cumlogsumexp = op_cumsum


for _name in _REDUCTIONS:
    setattr(_Walker, f"op_{_name}", lambda self, eqn, ins: self.reduce_axes(
        eqn, ins, eqn.params["axes"]))


def channel_groups(fn: Callable[..., Any], variables: Any, *args: Any, **kwargs: Any
                   ) -> ChannelCoupling:
    """The groups of variable axes that share a channel, read from ``fn``'s jaxpr.

    Args:
      fn: the inference computation, called as ``fn(variables, *args, **kwargs)``
        (NNX: ``lambda state, x: nnx.merge(graphdef, state)(x)`` in eval mode).
      variables: the tree to permute: params and the batch statistics
        (an ``nnx.State``, Linen ``variables``, a dict of arrays).
      *args, **kwargs: example inputs (arrays or ``jax.ShapeDtypeStruct``); other
        values pass through as static.

    Returns:
      A `ChannelCoupling`: one `ChannelGroup` per channel dim that some float
      variable axis of size > 1 belongs to, with the reason when it must stay as
      it is. See the module docstring for how dims are tied and fixed.

    Example (a 2-layer MLP: the hidden channel ties ``w1``'s outputs, ``b1`` and
    ``w2``'s inputs; the input and output features are fixed):
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> p = {"w1": jnp.ones((8, 16)), "b1": jnp.ones(16), "w2": jnp.ones((16, 4))}
      >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]
      >>> coupling = sparse_jax.channel_groups(fn, p, jnp.ones((2, 8)))
      >>> for g in coupling.groups:
      ...     print(g.size, g.members, g.permutable)
      16 (('b1', 0), ('w1', 1), ('w2', 0)) True
      8 (('w1', 0),) False
      4 (('w2', 1),) False
    """
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(variables)[0]
    paths = tuple(_paths.path_to_str(path) for path, _ in leaves_with_paths)
    leaves = [leaf for _, leaf in leaves_with_paths]
    tree = jax.tree.structure(variables)
    for path, leaf in zip(paths, leaves):
        if not _is_array(leaf):
            raise TypeError(f"{path or '<root>'}: variables leaves must be arrays or "
                            f"jax.ShapeDtypeStruct, got {type(leaf).__name__}")
    arg_leaves, arg_tree = jax.tree.flatten((args, kwargs))
    traced = [i for i, leaf in enumerate(arg_leaves) if _is_array(leaf)]

    def flat_fn(*flat):
        v = jax.tree.unflatten(tree, flat[:len(leaves)])
        filled = list(arg_leaves)
        for i, leaf in zip(traced, flat[len(leaves):]):
            filled[i] = leaf
        call_args, call_kwargs = jax.tree.unflatten(arg_tree, filled)
        out = fn(v, *call_args, **call_kwargs)
        return [x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)]

    closed = jax.make_jaxpr(flat_fn)(*leaves, *(arg_leaves[i] for i in traced))
    dims = _Dims()
    walker = _Walker(dims)
    leaf_dims = []
    for leaf in leaves:
        reason = None if _is_float(leaf) else "a non-float variable"
        leaf_dims.append([dims.new(s, reason) for s in leaf.shape])
    in_dims = leaf_dims + [walker.fresh(np.shape(arg_leaves[i]), "an input of fn")
                           for i in traced]
    outs = walker.walk_closed(closed, in_dims)
    for out in outs:
        for node in out:
            dims.fix(node, "an output of fn")

    by_root: dict[int, list[tuple[int, int, int]]] = {}
    for i, nodes in enumerate(leaf_dims):
        for axis, node in enumerate(nodes):
            root, copies = dims.resolve(node)
            if dims.size[root] > 1 and _is_float(leaves[i]):
                by_root.setdefault(root, []).append((i, axis, copies))
    reasons: dict[int, set[str]] = {}
    for root in set(dims.tiles) | set(dims.reasons):  # a tiled root's reasons fix its inner root
        final = dims.resolve(root)[0]
        reasons.setdefault(final, set()).update(dims.reasons.get(dims.find(root), ()))
        chain = dims.find(root)
        while chain in dims.tiles and chain != final:
            reasons[final].update(dims.reasons.get(chain, ()))
            chain = dims.find(dims.tiles[chain][0])
    groups = []
    for root, members in by_root.items():
        why = reasons.get(root)
        groups.append(ChannelGroup(
            size=dims.size[root],
            members=tuple((paths[i], a) for i, a, _ in members),
            reason="; ".join(sorted(why)) if why else None,
            leaves=tuple(i for i, _, _ in members),
            copies=tuple(c for _, _, c in members),
        ))
    groups.sort(key=lambda g: (not g.permutable, min(zip(g.leaves, (a for _, a in g.members)))))
    return ChannelCoupling(tuple(groups), paths)


__all__ = ["ChannelCoupling", "ChannelGroup", "channel_groups"]
