"""Reduction and stacked axes read from the computation, not guessed from names.

`rules_from_computation` traces ``fn(params, *args, **kwargs)`` once with
`jax.make_jaxpr` (abstract evaluation: nothing runs, nothing is compiled) and
follows every floating-point params leaf through the jaxpr to the contraction
that consumes it. It returns selection rules that pin each leaf's layout, for
`sparse_jax.prune`, `sparse_jax.masked`, `sparse_jax.check_masks`,
`sparse_jax.sparsity_report` and `sparse_jax.plan_tree` (``rules=``).

How a leaf is followed
----------------------
Each traced value derived from a leaf records, for every one of its dims, the
leaf axes it is made of (a reshape merges and splits axes; a broadcast adds
dims that belong to no axis) and the leaf axes sliced away so far (the layer
axes). The walk goes through

* dtype casts, copies, elementwise arithmetic with constants or other params
  (``w * mask``, ``w + delta``), ``stop_gradient``, sharding constraints;
* ``reshape`` (merging or splitting contiguous dims), ``transpose``,
  ``squeeze``, ``broadcast_in_dim`` (``expand_dims``), ``rev``;
* ``slice`` / ``dynamic_slice`` / ``split`` / ``concatenate`` / ``pad``: an
  index of size 1 slices a layer out (that axis is *stacked*); a sub-range
  marks the axis as partial;
* ``jit`` / ``pjit``, ``closed_call``, ``remat`` (``checkpoint``),
  ``custom_jvp_call`` / ``custom_vjp_call`` (into the inner jaxpr), ``cond``
  (every branch), ``while`` (``fori_loop``);
* ``scan``: a params operand scanned over (Linen ``nn.scan``, ``nnx.scan``,
  ``lax.scan`` over stacked weights, after a ``jnp.moveaxis`` for MaxText's
  ``(embed, layers, mlp)``) is seen sliced along its leading dim, so that leaf
  axis is stacked; scan constants pass unsliced; a stacked output (``ys``)
  gets its layer axis back.

``vmap`` leaves no trace of its own in a jaxpr: a vmapped contraction is a
``dot_general`` with batch dims, and a leaf axis that is such a batch dim is
stacked. (When only the weight is vmapped, jax may instead keep the layer
axis as a free dim of the ``dot_general``; it is then not reported as stacked,
which does not change the reduction axis.)

What decides the axis
---------------------
* ``dot_general``: of the leaf axes a tracked operand is contracted over (its
  contracting dims), the *innermost* one in the leaf's own axis order (the
  one contiguous in the flattened reduction dimension as the leaf is stored,
  which is what TensorRT and cuSPARSELt see): an attention out kernel
  ``(heads, head_dim, out)`` contracted over ``(heads, head_dim)`` gets
  ``head_dim`` (axis 1); a q/k/v kernel ``(in, heads, head_dim)`` gets ``in``
  (axis 0); an ``Einsum`` kernel ``(2, F, H)`` used as ``...F,NFH->...NH``
  gets 1, as ``...F,NHF->...NH`` gets 2.
* ``conv_general_dilated``: the kernel's input-feature dim (from the
  dimension numbers; per group for a grouped conv). Spatial dims are neither
  reduction nor stacked axes.

Values that depend on the non-params inputs of ``fn`` (activations, token
ids, flags) are *inputs*, and a leaf combined elementwise with one stops being
followed: ``x * scale`` then a matmul is not a contraction of ``scale``, so a
norm scale, a bias, a position embedding added to the activations "feed no
contraction". Two exceptions keep a weight a weight: the predicate of a
``select`` (``jnp.where(train, w, w_frozen)``) and PRNG-key inputs (weight
noise drawn from a key passed in). An operand broadcast into a bigger
elementwise result is used up as well.

What comes back, per floating-point leaf
----------------------------------------
========================================  =====================================
what the computation does with the leaf   rule
========================================  =====================================
contracted, along one axis everywhere     ``Layout(axis=a, stacked=(...),
                                          source="computation")``
feeds no contraction (bias, norm scale)   ``Layout(skip="feeds no contraction",
                                          source="computation")``
not used at all (a head this call does    ``Layout(skip="not used by the
not reach)                                computation", ...)``
a lookup table (a ``gather`` or a         ``Layout(skip="used as a lookup
``dynamic_slice`` at indices that come    table ...", ...)``, also when it is
from the inputs: an embedding)            contracted elsewhere (tied
                                          embeddings)
a vector (fewer than 2 dims besides the    ``Layout(skip="a vector ...")``
layer axes: a learned initial state), or
contracted after a broadcast over a
batch (learned latents, an activation)    ``Layout(skip="... broadcast ...")``
contracted along different axes in        ``Layout(skip="contracted along
different places                          different axes ...")``
contracted over part of an axis only (a   a skip that says so
reshape splits it, or a slice or
concatenation of it is contracted), or
over 1 input channel per group
(depthwise conv)
reaches an op this walk does not follow   **no rule**: the name/shape defaults
(``ragged_dot``, ``pallas_call``,         decide, the report says ``default``
``shard_map`` with shards, a scatter, a   for it, and a `UserWarning` lists
``gather`` at fixed indices)              the leaf and the ops
========================================  =====================================

Non-float leaves (integers, PRNG keys) get no rule. A rule's regex is the
leaf's whole path, ``f"^{re.escape(path)}$"``, so rules written by hand can
be put before (to win) or after the computed ones. If ``fn`` uses none of
the floating-point leaves it is given (it closes over other params), this is
an error rather than a list of skips.

The rules do not depend on ``n``/``m``: a leaf whose reduction size ``m``
does not divide (a 3-channel stem conv) still gets its axis, and
`sparse_jax.plan_tree` decides what to do with it.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from sparse_jax import _paths
from sparse_jax._selection import Layout

# Same layout in, same layout out (the leaf's values may change, its axes do not).
_ELEMENTWISE = frozenset(
    """
    add add_any sub mul div rem pow max min neg sign floor ceil round abs
    exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh
    asinh acosh atanh atan2 sqrt rsqrt cbrt integer_pow square erf erfc erf_inv
    lgamma digamma convert_element_type reduce_precision select_n clamp
    stop_gradient real imag conj nextafter copy copy_p not and or xor
    """.split()
)
# Operand i passes unchanged to output i.
_IDENTITY = frozenset(
    "optimization_barrier device_put sharding_constraint pvary mesh_cast reshard".split()
)
# Uses that consume a leaf without contracting it (statistics, comparisons, printing).
_NO_CONTRACTION = frozenset(
    """
    reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor
    argmax argmin eq ne lt le gt ge is_finite cumsum cumprod cummax cummin
    cumlogsumexp sort top_k debug_callback debug_print
    """.split()
)
_CALL_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_MAX_LOOP_PASSES = 4  # loop carries reach a fixed point in a pass or two


@dataclasses.dataclass(frozen=True)
class _Atom:
    """A piece of one dim of a traced value: a factor of a leaf axis, or of nothing.

    ``axis`` is the leaf axis (None for a dim a broadcast made); ``inner`` the
    stride of this piece within the axis (a reshape that splits an axis makes
    pieces); ``partial`` marks a dim that holds a sub-range of the axis or a
    concatenation with other data; ``flipped`` one that ``rev`` reversed.
    """

    axis: int | None
    size: int
    inner: int = 1
    partial: bool = False
    flipped: bool = False  # a ``rev`` reversed this piece (the order matters to statistics)


@dataclasses.dataclass(frozen=True)
class _Track:
    """How a traced value is laid out in terms of one params leaf."""

    leaf: int
    dims: tuple[tuple[_Atom, ...], ...]
    stacked: frozenset = frozenset()  # leaf axes sliced away (layer axes)
    # (scan id, the atoms the scan sliced off, the axes that made stacked) per
    # enclosing scan over this leaf, innermost last: a stacked output gets them back.
    slices: tuple = ()


@dataclasses.dataclass(frozen=True)
class _Value:
    tracks: tuple[_Track, ...] = ()
    tainted: bool = False  # depends on fn's non-params inputs (activations, indices)


_PLAIN = _Value()


def _merge(a: _Value, b: _Value) -> _Value:
    tracks = a.tracks + tuple(t for t in b.tracks if t not in a.tracks)
    return _Value(tracks, a.tainted or b.tainted)


class _Lost(Exception):
    """The walk cannot follow a leaf through an op (the message says why)."""


@dataclasses.dataclass
class _Uses:
    contractions: set = dataclasses.field(default_factory=set)  # (axis, stacked, op)
    problems: set = dataclasses.field(default_factory=set)  # contracted, but not along one axis
    lookups: set = dataclasses.field(default_factory=set)
    lost: set = dataclasses.field(default_factory=set)
    used: bool = False  # some op reads the leaf


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(getattr(var.aval, "shape", ()))


def _is_literal(var: Any) -> bool:
    return isinstance(var, jex.Literal)


def _real(atoms: Sequence[_Atom]) -> list[_Atom]:
    return [a for a in atoms if a.axis is not None]


class _Walker:
    def __init__(self, leaf_shapes: Sequence[tuple[int, ...]]):
        self.leaf_shapes = list(leaf_shapes)
        self.uses = [_Uses() for _ in leaf_shapes]
        self._scan_ids = itertools.count()

    # --- bookkeeping -------------------------------------------------------

    def covers_axis(self, track: _Track, atom: _Atom) -> bool:
        """Whether ``atom`` is a whole leaf axis (not a piece, not a sub-range)."""
        return not atom.partial and atom.size == self.leaf_shapes[track.leaf][atom.axis]

    def lose(self, value: _Value, why: str) -> None:
        for track in value.tracks:
            self.uses[track.leaf].lost.add(why)

    def map_tracks(self, value: _Value, name: str, fn: Callable[[_Track], _Track | None]) -> _Value:
        tracks = []
        for track in value.tracks:
            try:
                new = fn(track)
            except _Lost as lost:
                self.uses[track.leaf].lost.add(f"{name} ({lost})")
                continue
            if new is not None:
                tracks.append(new)
        return _Value(tuple(tracks), value.tainted)

    def index_away(self, track: _Track, atoms: Sequence[_Atom]) -> frozenset:
        """The leaf axes a dim of ``atoms`` holds, when one index of it is kept."""
        axes = set()
        for atom in _real(atoms):
            if atom.size > 1 and not self.covers_axis(track, atom) and not atom.partial:
                raise _Lost(f"indexes a piece of axis {atom.axis} that a reshape split")
            axes.add(atom.axis)
        return frozenset(axes)

    # --- walking -----------------------------------------------------------

    def walk_closed(self, closed: Any, ins: Sequence[_Value]) -> list[_Value]:
        if isinstance(closed, jex.ClosedJaxpr):
            return self.walk(closed.jaxpr, ins)
        return self.walk(closed, ins)

    def walk(self, jaxpr: Any, ins: Sequence[_Value]) -> list[_Value]:
        env: dict[Any, _Value] = {}
        for var in jaxpr.constvars:
            env[var] = _PLAIN
        for var, value in zip(jaxpr.invars, ins):
            env[var] = value

        def read(var: Any) -> _Value:
            return _PLAIN if _is_literal(var) else env.get(var, _PLAIN)

        for eqn in jaxpr.eqns:
            values = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, values)
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[_Value]) -> list[_Value]:
        name = eqn.primitive.name
        tainted = any(v.tainted for v in ins)
        n_out = len(eqn.outvars)
        if not any(v.tracks for v in ins):
            return [_Value((), tainted)] * n_out
        for value in ins:
            for track in value.tracks:
                self.uses[track.leaf].used = True
        handler = getattr(self, f"op_{name}", None)
        if handler is not None:
            return handler(eqn, ins, tainted)
        if name in _ELEMENTWISE:
            return [self.elementwise(eqn, ins, tainted)]
        if name in _IDENTITY and n_out == len(ins):
            return list(ins)
        if name in _NO_CONTRACTION:
            return [_Value((), tainted)] * n_out
        called = self.call(eqn, ins)
        if called is not None:
            return called
        for value in ins:
            self.lose(value, name)
        return [_Value((), tainted)] * n_out

    def call(self, eqn: Any, ins: list[_Value]) -> list[_Value] | None:
        """A call-like op (jit, remat, custom_jvp/vjp): walk its jaxpr, invars 1:1."""
        for key in _CALL_JAXPR_PARAMS:
            inner = eqn.params.get(key)
            if not isinstance(inner, (jex.ClosedJaxpr, jex.Jaxpr)):
                continue
            open_jaxpr = inner.jaxpr if isinstance(inner, jex.ClosedJaxpr) else inner
            same_in = [_shape(v) for v in open_jaxpr.invars] == [_shape(v) for v in eqn.invars]
            same_out = [_shape(v) for v in open_jaxpr.outvars] == [_shape(v) for v in eqn.outvars]
            if same_in and same_out:
                return self.walk_closed(inner, ins)
        return None

    # --- elementwise and layout ops ----------------------------------------

    def elementwise(self, eqn: Any, ins: list[_Value], tainted: bool) -> _Value:
        if any(v.tainted and not v.tracks for v in ins):
            return _Value((), True)  # mixed with the inputs: a scale or bias, not a weight
        out_shape = _shape(eqn.outvars[0])
        tracks: list[_Track] = []
        for var, value in zip(eqn.invars, ins):
            if _shape(var) == out_shape:  # an operand broadcast into the output is used up
                tracks.extend(t for t in value.tracks if t not in tracks)
        return _Value(tuple(tracks), tainted)

    def op_select_n(self, eqn, ins, tainted):
        # The predicate only chooses between the cases (a train flag, a mask): it
        # does not mix the inputs into the leaf.
        cases = self.elementwise(eqn, [_Value((), False)] + ins[1:], tainted)
        return [_Value(cases.tracks, tainted)]

    def op_transpose(self, eqn, ins, tainted):
        perm = eqn.params["permutation"]
        return [
            self.map_tracks(
                ins[0], "transpose", lambda t: dataclasses.replace(t, dims=tuple(t.dims[p] for p in perm))
            )
        ]

    def drop_dims(self, track: _Track, dims: Sequence[int]) -> _Track:
        """Removes size-1 dims; a size-1 leaf axis that disappears counts as stacked."""
        gone = frozenset(a.axis for d in dims for a in _real(track.dims[d]))
        kept = tuple(atoms for i, atoms in enumerate(track.dims) if i not in set(dims))
        return dataclasses.replace(track, dims=kept, stacked=track.stacked | gone)

    def op_squeeze(self, eqn, ins, tainted):
        dims = [d % len(_shape(eqn.invars[0])) for d in eqn.params["dimensions"]]
        return [self.map_tracks(ins[0], "squeeze", lambda t: self.drop_dims(t, dims))]

    def op_reshape(self, eqn, ins, tainted):
        in_shape = _shape(eqn.invars[0])
        out_shape = _shape(eqn.outvars[0])
        order = eqn.params.get("dimensions")

        def reshape(track: _Track) -> _Track:
            dims = track.dims if order is None else tuple(track.dims[d] for d in order)
            queue = [a for atoms in dims for a in atoms if a.size > 1]
            gone = frozenset(a.axis for atoms in dims for a in _real(atoms) if a.size == 1)
            out: list[tuple[_Atom, ...]] = []
            for size in out_shape:
                dim: list[_Atom] = []
                need = size
                while need > 1:
                    if not queue:
                        raise _Lost("sizes do not match")
                    atom = queue.pop(0)
                    if need % atom.size == 0:
                        dim.append(atom)
                        need //= atom.size
                    elif atom.size % need == 0 and not atom.partial:
                        rest = atom.size // need
                        dim.append(_Atom(atom.axis, need, atom.inner * rest, flipped=atom.flipped))
                        queue.insert(0, _Atom(atom.axis, rest, atom.inner, flipped=atom.flipped))
                        need = 1
                    else:
                        raise _Lost(f"dims of {in_shape} do not regroup into {out_shape}")
                out.append(tuple(dim))
            if queue:
                raise _Lost("sizes do not match")
            return dataclasses.replace(track, dims=tuple(out), stacked=track.stacked | gone)

        return [self.map_tracks(ins[0], "reshape", reshape)]

    def op_broadcast_in_dim(self, eqn, ins, tainted):
        in_shape = _shape(eqn.invars[0])
        out_shape = eqn.params["shape"]
        where = eqn.params["broadcast_dimensions"]

        def broadcast(track: _Track) -> _Track:
            out = [((_Atom(None, s),) if s > 1 else ()) for s in out_shape]
            gone = set()
            for i, j in enumerate(where):
                if in_shape[i] == out_shape[j]:
                    out[j] = track.dims[i]
                else:
                    gone.update(a.axis for a in _real(track.dims[i]))
            return dataclasses.replace(track, dims=tuple(out), stacked=track.stacked | gone)

        # Extra operands (dynamic shapes) are never params.
        return [self.map_tracks(ins[0], "broadcast_in_dim", broadcast)]

    def op_rev(self, eqn, ins, tainted):
        # Groups of m along a reversed axis are still groups (m divides it); the
        # flip is recorded for the calibration statistics, whose order it changes.
        reversed_dims = set(eqn.params["dimensions"])

        def rev(track: _Track) -> _Track:
            dims = tuple(
                tuple(dataclasses.replace(a, flipped=not a.flipped) for a in atoms)
                if d in reversed_dims else atoms
                for d, atoms in enumerate(track.dims)
            )
            return dataclasses.replace(track, dims=dims)

        return [self.map_tracks(ins[0], "rev", rev)]

    def sliced_dim(self, track: _Track, d: int, new_size: int, full: int, strided: bool):
        """(new atoms for dim d, leaf axes indexed away) after keeping ``new_size`` of ``full``."""
        atoms = track.dims[d]
        if new_size == full:
            return atoms, frozenset()
        if new_size == 1:
            return (), self.index_away(track, atoms)
        real = _real(atoms)
        if not real:
            return (_Atom(None, new_size),), frozenset()
        if strided:
            raise _Lost(f"takes a strided slice of axis {real[0].axis}")
        if len(atoms) != 1:
            raise _Lost("takes a sub-range of a dim that merges several axes")
        return (_Atom(real[0].axis, new_size, 1, partial=True),), frozenset()

    def slice_track(self, track: _Track, in_shape, out_shape, strides) -> _Track:
        dims = list(track.dims)
        stacked = set(track.stacked)
        for d, (full, new) in enumerate(zip(in_shape, out_shape)):
            strided = strides is not None and strides[d] not in (None, 1)
            dims[d], away = self.sliced_dim(track, d, new, full, strided)
            stacked |= away
        return dataclasses.replace(track, dims=tuple(dims), stacked=frozenset(stacked))

    def op_slice(self, eqn, ins, tainted):
        in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
        strides = eqn.params.get("strides")
        return [
            self.map_tracks(ins[0], "slice", lambda t: self.slice_track(t, in_shape, out_shape, strides))
        ]

    def op_dynamic_slice(self, eqn, ins, tainted):
        in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
        starts = ins[1 : 1 + len(in_shape)]
        kept = []
        for track in ins[0].tracks:
            if any(
                new < full and _real(track.dims[d]) and starts[d].tainted
                for d, (full, new) in enumerate(zip(in_shape, out_shape))
            ):
                self.uses[track.leaf].lookups.add("dynamic_slice at an index from the inputs")
            else:
                kept.append(track)
        out = self.map_tracks(
            _Value(tuple(kept)), "dynamic_slice", lambda t: self.slice_track(t, in_shape, out_shape, None)
        )
        return [_Value(out.tracks, tainted)]

    def op_split(self, eqn, ins, tainted):
        in_shape = _shape(eqn.invars[0])
        outs = []
        for var in eqn.outvars:
            out_shape = _shape(var)
            outs.append(
                self.map_tracks(
                    ins[0], "split", lambda t, o=out_shape: self.slice_track(t, in_shape, o, None)
                )
            )
        return outs

    def widened(self, track: _Track, d: int, new_size: int) -> _Track:
        """Dim ``d`` now holds this leaf's axis among other data (concatenate, pad)."""
        real = _real(track.dims[d])
        if not real:
            atoms: tuple[_Atom, ...] = (_Atom(None, new_size),)
        elif len(track.dims[d]) == 1:
            atoms = (_Atom(real[0].axis, new_size, 1, partial=True),)
        else:
            raise _Lost("widens a dim that merges several axes")
        dims = list(track.dims)
        dims[d] = atoms
        return dataclasses.replace(track, dims=tuple(dims))

    def op_concatenate(self, eqn, ins, tainted):
        if any(v.tainted and not v.tracks for v in ins):
            return [_Value((), True)]  # joined to the inputs (a class token): not a weight
        d = eqn.params["dimension"]
        size = _shape(eqn.outvars[0])[d]
        out = _PLAIN
        for value in ins:
            out = _merge(out, self.map_tracks(value, "concatenate", lambda t: self.widened(t, d, size)))
        return [_Value(out.tracks, tainted)]

    def op_pad(self, eqn, ins, tainted):
        out_shape = _shape(eqn.outvars[0])
        config = eqn.params["padding_config"]
        if ins[1].tainted and not ins[1].tracks:
            return [_Value((), True)]

        def pad(track: _Track) -> _Track:
            for d, (lo, hi, interior) in enumerate(config):
                if lo or hi or interior:
                    track = self.widened(track, d, out_shape[d])
            return track

        return [_Value(self.map_tracks(ins[0], "pad", pad).tracks, tainted)]

    def op_gather(self, eqn, ins, tainted):
        if not ins[1].tainted:  # fixed indices (a static permutation): not followed
            self.lose(ins[0], "gather at indices that do not come from the inputs")
            return [_Value((), tainted)]
        for track in ins[0].tracks:
            self.uses[track.leaf].lookups.add("gather")
        return [_Value((), tainted)]

    # --- contractions ------------------------------------------------------

    def contract(self, track: _Track, contracting: Sequence[int], batch: Sequence[int], op: str,
                 conv: bool = False) -> None:
        shape = self.leaf_shapes[track.leaf]
        uses = self.uses[track.leaf]
        if any(
            atom.axis is None and atom.size > 1
            for d, atoms in enumerate(track.dims) if d not in contracting for atom in atoms
        ):
            uses.problems.add(f"{op} takes it broadcast over a batch (an activation, not a weight)")
            return
        roles: dict[int, list[tuple[str, _Atom]]] = {}
        for d, atoms in enumerate(track.dims):
            role = "contracted" if d in contracting else "batch" if d in batch else "kept"
            for atom in _real(atoms):
                roles.setdefault(atom.axis, []).append((role, atom))
        contracted = sorted(
            axis for axis, entries in roles.items()
            if shape[axis] > 1 and any(role == "contracted" for role, _ in entries)
        )
        if not contracted:
            if conv:
                uses.problems.add(f"{op} over 1 input channel per group (depthwise or 1-channel)")
            return  # an outer product or a broadcast: no reduction along the leaf
        axis = contracted[-1]
        entries = roles[axis]
        if any(role != "contracted" for role, _ in entries):
            uses.problems.add(f"{op} contracts only part of axis {axis} (a reshape splits it)")
            return
        if any(atom.partial for _, atom in entries):
            uses.problems.add(f"{op} contracts a slice or concatenation of axis {axis}")
            return
        stacked = set(track.stacked)
        stacked.update(a for a, entries in roles.items() if any(r == "batch" for r, _ in entries))
        if axis in stacked:
            uses.problems.add(f"{op} contracts axis {axis}, which is also sliced as a layer axis")
            return
        uses.contractions.add((axis, frozenset(stacked), op))

    def op_dot_general(self, eqn, ins, tainted):
        (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
        for value, contracting, batch in ((ins[0], lhs_c, lhs_b), (ins[1], rhs_c, rhs_b)):
            for track in value.tracks:
                self.contract(track, tuple(contracting), tuple(batch), "dot_general")
        return [_Value((), tainted)]

    def op_conv_general_dilated(self, eqn, ins, tainted):
        lhs_spec, rhs_spec, _ = eqn.params["dimension_numbers"]
        for track in ins[0].tracks:  # a params leaf convolved as the image: its features
            self.contract(track, (lhs_spec[1],), (), "conv_general_dilated", conv=True)
        for track in ins[1].tracks:  # the kernel: its input-feature dim
            self.contract(track, (rhs_spec[1],), (), "conv_general_dilated", conv=True)
        return [_Value((), tainted)]

    # --- control flow ------------------------------------------------------

    def slice_leading(self, value: _Value, scan_id: int) -> _Value:
        """A scanned-over operand as the body sees it: dim 0 sliced away (a layer axis)."""

        def slice_off(track: _Track) -> _Track:
            atoms = track.dims[0]
            away = self.index_away(track, atoms)
            added = away - track.stacked
            return _Track(
                track.leaf, track.dims[1:], track.stacked | away,
                track.slices + ((scan_id, atoms, added),),
            )

        return self.map_tracks(value, "scan", slice_off)

    def stack_leading(self, value: _Value, scan_id: int, length: int) -> _Value:
        """A scan's stacked output (ys): the layer axis a body slice lost comes back."""

        def stack(track: _Track) -> _Track:
            if track.slices and track.slices[-1][0] == scan_id:
                _, atoms, added = track.slices[-1]
                return _Track(track.leaf, (atoms,) + track.dims, track.stacked - added, track.slices[:-1])
            if any(entry[0] == scan_id for entry in track.slices):
                raise _Lost("a layer slice leaves a nested scan")
            fill = (_Atom(None, length),) if length > 1 else ()
            return dataclasses.replace(track, dims=(fill,) + track.dims)

        return self.map_tracks(value, "scan", stack)

    def leave_scan(self, value: _Value, scan_id: int) -> _Value:
        def check(track: _Track) -> _Track:
            if any(entry[0] == scan_id for entry in track.slices):
                raise _Lost("a layer slice leaves a scan as its carry")
            return track

        return self.map_tracks(value, "scan", check)

    def loop(self, body: Any, fixed: list[_Value], init: list[_Value], n_carry: int,
             extra: list[_Value] = (), cond: Any = None, cond_fixed: list[_Value] = ()):
        carry = list(init)
        outs: list[_Value] = []
        for _ in range(_MAX_LOOP_PASSES):
            if cond is not None:
                self.walk_closed(cond, list(cond_fixed) + carry)
            outs = self.walk_closed(body, list(fixed) + carry + list(extra))
            merged = [_merge(c, o) for c, o in zip(carry, outs[:n_carry])]
            if merged == carry:
                break
            carry = merged
        return carry, outs[n_carry:]

    def op_scan(self, eqn, ins, tainted):
        p = eqn.params
        n_consts, n_carry = p["num_consts"], p["num_carry"]
        consts, init, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
        scan_id = next(self._scan_ids)
        xs = [self.slice_leading(v, scan_id) for v in xs]
        carry, ys = self.loop(p["jaxpr"], consts, init, n_carry, xs)
        carry = [self.leave_scan(v, scan_id) for v in carry]
        ys = [self.stack_leading(v, scan_id, p["length"]) for v in ys]
        return carry + ys

    def op_while(self, eqn, ins, tainted):
        p = eqn.params
        n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
        cond_consts = ins[:n_cond]
        body_consts = ins[n_cond:n_cond + n_body]
        init = ins[n_cond + n_body:]
        carry, _ = self.loop(
            p["body_jaxpr"], body_consts, init, len(init), cond=p["cond_jaxpr"], cond_fixed=cond_consts
        )
        return carry

    def op_cond(self, eqn, ins, tainted):
        index, operands = ins[0], ins[1:]
        outs = [_Value((), index.tainted)] * len(eqn.outvars)
        for branch in eqn.params["branches"]:
            outs = [_merge(o, b) for o, b in zip(outs, self.walk_closed(branch, operands))]
        return outs


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _is_float(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _layout(uses: _Uses, shape: tuple[int, ...]) -> Layout | None:
    """The rule for one leaf from what the walk saw; None when the defaults decide."""
    if uses.lost:
        return None
    axes = sorted({axis for axis, _, _ in uses.contractions})
    if uses.lookups:
        how = " and ".join(sorted(uses.lookups))
        also = f", and contracted along axis {', '.join(map(str, axes))}" if axes else ""
        return Layout(skip=f"used as a lookup table ({how}){also}", source="computation")
    if uses.problems:
        return Layout(skip="; ".join(sorted(uses.problems)), source="computation")
    if not uses.used:
        return Layout(skip="not used by the computation", source="computation")
    if not axes:
        return Layout(skip="feeds no contraction", source="computation")
    if len(axes) > 1:
        return Layout(
            skip=f"contracted along different axes in different places ({', '.join(map(str, axes))})",
            source="computation",
        )
    stacked = frozenset().union(*(s for _, s, _ in uses.contractions))
    if len(shape) - len(stacked) < 2:
        return Layout(skip="a vector (fewer than 2 dims besides the layer axes), not a matmul "
                      "weight", source="computation")
    return Layout(axis=axes[0], stacked=tuple(sorted(stacked)), source="computation")


def rules_from_computation(fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any):
    """Selection rules read from the computation ``fn(params, *args, **kwargs)``.

    Traces the call once (``jax.make_jaxpr``: nothing runs), follows every
    floating-point leaf of ``params`` to the ``dot_general`` or
    ``conv_general_dilated`` that contracts it, and pins the leaf's reduction
    axis and stacked (layer) axes; a leaf that feeds no contraction, or is a
    lookup table, is skipped. See the module docstring for the details.

    Args:
      fn: called as ``fn(params, *args, **kwargs)``; it may take ``params`` as a
        dict, Linen ``params`` or an ``nnx.State``.
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``); the rules
        name its leaves by their ``'/'``-joined paths.
      *args, **kwargs: example inputs, as arrays (or ``jax.ShapeDtypeStruct``);
        other values (Python flags, ints) are passed through as static.

    Returns:
      A list of ``(regex, sparse_jax.Layout(..., source="computation"))`` rules,
      one per floating-point leaf except those the walk could not follow (a
      `UserWarning` names them; the defaults decide them).

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> params = {"w": jnp.ones((2, 8, 16)), "b": jnp.zeros(8)}
      >>> def fn(p, x):  # the Einsum weight (N, H, F) is contracted over its last axis
      ...     return jnp.einsum("...F,NHF->...NH", x, p["w"]) + p["b"]
      >>> rules = sparse_jax.rules_from_computation(fn, params, jnp.ones((4, 16)))
      >>> [(p.path, p.axis, p.source) for p in sparse_jax.plan_tree(params, rules=rules)]
      [('b', None, 'computation'), ('w', 2, 'computation')]
    """
    return _rules(fn, params, (), args, kwargs, stacklevel=3)


def _rules(
    fn: Callable[..., Any],
    params: Any,
    constants: Sequence[Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    stacklevel: int,
):
    """`rules_from_computation` of ``fn(params, *constants, *args, **kwargs)``.

    ``constants`` (an NNX model's non-param state: batch statistics, RNG
    state) are traced like the inputs but mix into nothing: they are neither
    followed nor taint what they touch.
    """
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [_paths.path_to_str(path) for path, _ in leaves_with_paths]
    param_leaves = [leaf for _, leaf in leaves_with_paths]
    param_tree = jax.tree.structure(params)
    const_leaves, const_tree = jax.tree.flatten(tuple(constants))
    arg_leaves, arg_tree = jax.tree.flatten((args, kwargs))
    traced_args = [i for i, leaf in enumerate(arg_leaves) if _is_array(leaf)]
    n_params, n_consts = len(param_leaves), len(const_leaves)

    def flat_fn(*flat):
        p = jax.tree.unflatten(param_tree, flat[:n_params])
        consts = jax.tree.unflatten(const_tree, flat[n_params:n_params + n_consts])
        filled = list(arg_leaves)
        for i, leaf in zip(traced_args, flat[n_params + n_consts:]):
            filled[i] = leaf
        call_args, call_kwargs = jax.tree.unflatten(arg_tree, filled)
        out = fn(p, *consts, *call_args, **call_kwargs)
        return [x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)]

    for path, leaf in zip(paths, param_leaves):
        if not _is_array(leaf):
            raise TypeError(
                f"{path or '<root>'}: params leaves must be arrays or jax.ShapeDtypeStruct, "
                f"got {type(leaf).__name__}"
            )
    closed = jax.make_jaxpr(flat_fn)(
        *param_leaves, *const_leaves, *(arg_leaves[i] for i in traced_args)
    )
    shapes = [tuple(leaf.shape) for leaf in param_leaves]
    walker = _Walker(shapes)
    ins = []
    for i, leaf in enumerate(param_leaves):
        if _is_float(leaf):
            dims = tuple((_Atom(axis, size),) for axis, size in enumerate(shapes[i]))
            ins.append(_Value((_Track(i, dims),), False))
        else:
            ins.append(_PLAIN)
    ins.extend(_PLAIN for _ in const_leaves)
    # The inputs taint what they touch (activations, token ids); PRNG keys do not
    # (weight noise drawn from a key passed in still leaves the weight a weight).
    ins.extend(_Value((), not _is_key(arg_leaves[i])) for i in traced_args)
    walker.walk_closed(closed, ins)
    floats = [i for i, leaf in enumerate(param_leaves) if _is_float(leaf)]
    if floats and not any(walker.uses[i].used for i in floats):
        raise ValueError(
            f"fn does not use any of the {len(floats)} floating-point params leaves it is "
            "given (does it close over other params instead of using its first argument?)"
        )

    rules = []
    lost = []
    for i, (path, leaf) in enumerate(zip(paths, param_leaves)):
        if not _is_float(leaf):
            continue
        layout = _layout(walker.uses[i], shapes[i])
        if layout is None:
            lost.append(f"{path} ({', '.join(sorted(walker.uses[i].lost))})")
            continue
        rules.append((f"^{re.escape(path)}$", layout))
    if lost:
        warnings.warn(
            "rules_from_computation could not follow these params leaves (the name/shape "
            "defaults decide them): " + "; ".join(lost),
            UserWarning,
            stacklevel=stacklevel,
        )
    return rules


__all__ = ["rules_from_computation"]
