"""Whether an optimizer update acts on each parameter leaf alone, entry by entry.

`masked` zeroes the gradient of pruned weights before the inner optimizer so that no pruned
entry can reach a kept one. When the inner update is *leafwise elementwise* (every entry of a
leaf's update and new state depends only on the same entry of that leaf's gradient, params and
state, and on scalars such as the step count or the learning rate: SGD, momentum, Adam(W), Lion,
RMSProp, per-leaf weight decay, ``optax.masked`` / ``multi_transform`` of those), a pruned entry
can only reach pruned entries, which `masked` overwrites anyway; the zeroing is then skipped,
because on the CPU it costs more than the rest of the masking (a second operand in the light
moment-update loops; see ``benchmarks/masked_overhead_anatomy.py``).

The test traces the update once (a jaxpr; nothing runs) and is conservative: any primitive
outside a small elementwise set applied to a params-dependent array (a reduction such as a global
norm, a reshape, a dot, a gather, control flow, random bits, ...) makes it fail, and so does an
elementwise operation that combines two different parameter leaves or a state leaf that moves to
another parameter's position between steps.
"""

from __future__ import annotations

from typing import Any

import jax

# Primitives that compute each output entry from the same entry of same-shaped operands.
_ELEMENTWISE = frozenset("""
    abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type copy
    copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite
    le lgamma digamma log log1p logistic lt max min mul ne neg nextafter not or pow real
    reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh xor
""".split())
# Primitives that call a sub-jaxpr on their operands, and the parameter that holds it.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}


class _NotLeafwise(Exception):
    pass


class _Classes:
    """Union-find over labels; a class may hold at most one parameter leaf's label."""

    def __init__(self):
        self.parent: dict[Any, Any] = {}

    def find(self, label):
        self.parent.setdefault(label, label)
        while self.parent[label] != label:
            self.parent[label] = self.parent[self.parent[label]]
            label = self.parent[label]
        return label

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[a] = b
        return b


def _is_literal(var) -> bool:
    return type(var).__name__ == "Literal"


def _walk(jaxpr, in_labels: list, classes: _Classes) -> list:
    """The labels of ``jaxpr``'s outputs (None: depends on no labelled input)."""
    labels = {}
    for var, label in zip(jaxpr.invars, in_labels):
        labels[var] = label
    for eqn in jaxpr.eqns:
        ins = [None if _is_literal(v) else labels.get(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS and _CALLS[name] in eqn.params:
            sub = eqn.params[_CALLS[name]]
            sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr or Jaxpr
            if len(sub.invars) != len(ins):
                raise _NotLeafwise(name)
            outs = _walk(sub, ins, classes)
        elif all(label is None for label in ins):
            outs = [None] * len(eqn.outvars)  # constants and scalars: the same at every entry
        elif name in _ELEMENTWISE:
            shape = tuple(eqn.outvars[0].aval.shape)
            merged = None
            for var, label in zip(eqn.invars, ins):
                if label is None:
                    continue
                if tuple(var.aval.shape) != shape:
                    raise _NotLeafwise(name)
                merged = label if merged is None else classes.union(merged, label)
            outs = [merged] * len(eqn.outvars)
        else:
            raise _NotLeafwise(name)
        for var, label in zip(eqn.outvars, outs):
            labels[var] = label
    return [None if _is_literal(v) else labels.get(v) for v in jaxpr.outvars]


def is_leafwise_elementwise(update, updates, state, params, **extra_args) -> bool:
    """Whether ``update(updates, state, params, **extra_args)`` acts on each params leaf alone,
    entry by entry (see the module docstring). Traces ``update`` once; runs nothing."""
    grad_leaves, grad_def = jax.tree.flatten(updates)
    state_leaves, state_def = jax.tree.flatten(state)
    param_leaves, param_def = jax.tree.flatten(params)
    extra_leaves, extra_def = jax.tree.flatten(extra_args)
    if grad_def != param_def:
        return False

    def flat_update(g, s, p, e):
        out_updates, out_state = update(jax.tree.unflatten(grad_def, g),
                                        jax.tree.unflatten(state_def, s),
                                        jax.tree.unflatten(param_def, p),
                                        **jax.tree.unflatten(extra_def, e))
        return jax.tree.leaves(out_updates), out_state

    try:
        closed, out_shape = jax.make_jaxpr(flat_update, return_shape=True)(
            grad_leaves, state_leaves, param_leaves, extra_leaves)
    except Exception:  # noqa: BLE001 (a transformation that cannot be traced alone: not proven)
        return False
    _, out_state_shape = out_shape
    if jax.tree.structure(out_state_shape) != state_def or len(out_shape[0]) != len(param_leaves):
        return False
    ndim = lambda x: len(getattr(x, "shape", ()))
    in_labels = ([("param", i) for i in range(len(grad_leaves))]
                 + [("state", k) if ndim(x) else None for k, x in enumerate(state_leaves)]
                 + [("param", i) for i in range(len(param_leaves))]
                 + [None] * len(extra_leaves))  # extra arguments carry no gradient
    classes = _Classes()
    jaxpr = closed.jaxpr
    if len(jaxpr.invars) != len(in_labels):
        return False
    try:
        outs = _walk(jaxpr, in_labels, classes)
    except _NotLeafwise:
        return False
    out_updates, out_state = outs[:len(param_leaves)], outs[len(param_leaves):]
    for i, label in enumerate(out_updates):  # leaf i's update stays with leaf i
        if label is not None:
            classes.union(label, ("param", i))
    for k, label in enumerate(out_state):  # a state leaf keeps its place across steps
        if label is not None:
            if in_labels[len(grad_leaves) + k] is None:
                return False  # a scalar state leaf became params-dependent
            classes.union(label, ("state", k))
    owners: dict[Any, int] = {}
    for label in list(classes.parent):
        if label[0] != "param":
            continue
        root = classes.find(label)
        if owners.setdefault(root, label[1]) != label[1]:
            return False  # two parameter leaves combined
    return True
