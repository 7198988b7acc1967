"""Model-level one-shot N:M pruning from calibration batches (SparseGPT, Wanda, magnitude).

`oneshot_prune` runs ``fn(params, batch)`` over calibration batches and, for
every params leaf the selection rules prune, collects the statistics of the
activations that the leaf is contracted with, then solves each layer with
`sparse_jax.sparsegpt`, `sparse_jax.wanda` or plain magnitude.

How the statistics are found
----------------------------
The call is traced once per batch shape (``jax.make_jaxpr``) and the jaxpr is
evaluated equation by equation (each equation's primitive bound to concrete
arrays), with the leaf tracking of `sparse_jax.rules_from_computation` running
alongside: every value derived from a leaf (casts, reshapes, transposes,
``w * mask``, a ``scan`` slice) knows which leaf axes each of its dims holds.
Calls (``jit``, ``remat``, ``custom_jvp``/``custom_vjp``) that carry a
tracked leaf are entered, ``cond`` takes its branch, ``while`` loops, and
``scan`` is unrolled so that a scan-stacked leaf is seen one layer slice at a
time (statistics per slice). Runs of equations that touch no tracked leaf
are compiled and called as one jitted function each (once per call of
`oneshot_prune`, reused over batches, passes and scan steps).

At a ``dot_general`` that contracts a tracked leaf, the other operand is
flattened to ``(tokens, K)``: tokens are all its dims that are not contracted,
``K`` the contracted leaf axes flattened in the leaf's own order with the
reduction axis innermost (a Dense kernel ``(in, out)``: ``in``; an attention
out kernel ``(heads, head_dim, out)``: ``heads * head_dim``, head_dim
innermost). At a ``conv_general_dilated`` the image patches
(``lax.conv_general_dilated_patches``) play that part, over ``(kh, kw, in)``
for an ``HWIO`` kernel, input channels innermost. Groups of ``m`` along that
flattened ``K`` are then groups of ``m`` along the reduction axis, so the
layer is solved as one ``(K, outputs)`` matrix against the ``K x K`` Hessian
``X^T X`` (`CalibrationStats`, float32, streamed over batches: memory
``O(K^2)`` per layer, not ``O(tokens)``).

Sequential (the default, as in the SparseGPT paper): the calibration batches
are run up to the first contraction of a layer that is not pruned yet; that
layer, with every other layer contracted with the same input (q/k/v, a gate
and an up projection), is the next group. Its statistics are accumulated
over all batches, the group is solved and written back, and the next pass
runs with it pruned, so each layer's inputs come from the already-pruned
earlier layers. Each pass re-runs the prefix per batch: nothing but the
statistics is stored between batches. ``sequential=False`` collects every
layer's statistics in one pass with the dense weights.

Limits: a layer slice must come from ``scan`` (a stacked leaf indexed in a
Python loop or a ``fori_loop``, or vmapped together with its inputs, gives a
clear error; weights vmapped over one shared input are contracted with the
layer axis as an output, which solves every layer against the same Hessian,
as per-layer solves would); a leaf used in several
places gets, in sequential mode, the statistics of its uses before the next
layer's first use; ops the tracking does not follow (``pallas_call``,
``shard_map``) hide the leaf, which is then reported as never contracted.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from sparse_jax import _oneshot, _paths, _patterns, _selection, _trace

METHODS = ("sparsegpt", "wanda", "magnitude")
_HIGHEST = jax.lax.Precision.HIGHEST


class OneShotRow(NamedTuple):
    """One pruned layer (one slice of a stacked leaf) in a `OneShotResult`.

    Attributes:
      path: the leaf's ``'/'``-joined path.
      index: the layer slice along the leaf's stacked axes (``()`` if none).
      method: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
      shape: the shape of the layer (the slice).
      tokens: calibration tokens (rows of ``X``) the statistics saw.
      masked_error: ``||X W - X (W * mask)||^2 / ||X W||^2`` over the
        calibration inputs: the chosen mask applied to the dense weights.
      error: the same for the returned weights (SparseGPT's update makes it
        smaller than ``masked_error``; for the other methods they are equal).
      seconds: wall time of the solve (with its compilation, the first time
        a layer shape is seen).
      stats: the layer's `CalibrationStats` (``K`` in the order described in
        the module docstring) when ``keep_stats=True``, else None.
    """

    path: str
    index: tuple[int, ...]
    method: str
    shape: tuple[int, ...]
    tokens: int
    masked_error: float
    error: float
    seconds: float
    stats: _oneshot.CalibrationStats | None


class OneShotResult(NamedTuple):
    """What `oneshot_prune` returns: ``params, masks, report = result``.

    Attributes:
      params: the pruned params (same structure, dtypes and shardings).
      masks: the mask tree in the params structure (bool arrays, ``None`` for
        leaves not pruned), ready for `sparse_jax.masked`.
      report: one `OneShotRow` per pruned layer, in the order solved.
    """

    params: Any
    masks: Any
    report: tuple[OneShotRow, ...]

    def summary(self) -> str:
        """The report as a text table."""
        lines = [f"{'layer':<40} {'method':>9} {'tokens':>7} {'masked err':>10} "
                 f"{'error':>10} {'s':>6}"]
        for row in self.report:
            name = row.path + ("" if not row.index else f"[{','.join(map(str, row.index))}]")
            lines.append(f"{name:<40} {row.method:>9} {row.tokens:>7} {row.masked_error:>10.4g} "
                         f"{row.error:>10.4g} {row.seconds:>6.2f}")
        return "\n".join(lines)


class _Stop(Exception):
    """Ends a sequential pass at the first layer of the next group."""


class _Unsupported(ValueError):
    pass


def _bind(eqn: Any, values: list[Any]) -> list[Any]:
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: list[Any] = []
    if isinstance(bind_params, tuple):  # (subfuns, params) in some jax versions
        subfuns, bind_params = bind_params
    context = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
    with context:
        out = eqn.primitive.bind(*subfuns, *values, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _last_uses(jaxpr: Any) -> dict[Any, int]:
    last: dict[Any, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if not isinstance(var, jex.Literal):
                last[var] = i
    for var in jaxpr.outvars:
        if not isinstance(var, jex.Literal):
            last[var] = len(jaxpr.eqns)
    return last


def _closed_parts(closed: Any) -> tuple[Any, list[Any]]:
    if isinstance(closed, jex.ClosedJaxpr):
        return closed.jaxpr, list(closed.consts)
    return closed, []


class _Interpreter(_trace._Walker):
    """Evaluates a jaxpr concretely while following the tracked params leaves."""

    def __init__(self, leaf_shapes, paths, on_contract: Callable[..., None], segments: dict):
        super().__init__(leaf_shapes)
        self.paths = paths
        # Called as on_contract(track, contracted dims, inputs(), operand): ``inputs``
        # makes the (tokens, *contracted dims) array only when it is needed.
        self.on_contract = on_contract
        # Jitted runs of equations by (id(jaxpr), first, last), shared by the passes
        # of one call; the jaxpr is kept with its entry so that its id stays its own.
        self.segments = segments
        self.scan_index: dict[int, int] = {}

    def run(self, closed: Any, args: list[Any], values: list[_trace._Value]):
        jaxpr, consts = _closed_parts(closed)
        env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
        tracks: dict[Any, _trace._Value] = {}
        for var, arg, value in zip(jaxpr.invars, args, values):
            env[var] = arg
            tracks[var] = value
        last = _last_uses(jaxpr)

        def read(var):
            return var.val if isinstance(var, jex.Literal) else env[var]

        def read_track(var):
            return _trace._PLAIN if isinstance(var, jex.Literal) else tracks.get(var, _trace._PLAIN)

        def forget(used, i):  # free activations as soon as they are dead
            for var in used:
                if not isinstance(var, jex.Literal) and last.get(var) == i:
                    env.pop(var, None)
                    tracks.pop(var, None)

        pending: list[int] = []  # a run of equations that touch no tracked leaf

        def flush():
            if not pending:
                return
            start, stop = pending[0], pending[-1]
            fn, in_vars, out_vars, tainted_out = self.segment(jaxpr, start, stop, last)
            outs = fn(*[env[v] for v in in_vars])
            taint = {v: tracks.get(v, _trace._PLAIN).tainted for v in in_vars}
            for var, out, tainted in zip(out_vars, outs, tainted_out(taint)):
                env[var] = out
                tracks[var] = _trace._Value((), tainted)
            for i in pending:
                forget(jaxpr.eqns[i].invars, i)
            pending.clear()

        for i, eqn in enumerate(jaxpr.eqns):
            in_values = [read_track(v) for v in eqn.invars]
            if not any(v.tracks for v in in_values):
                pending.append(i)
                continue
            flush()
            outs, out_values = self.step(eqn, [read(v) for v in eqn.invars], in_values)
            for var, out, value in zip(eqn.outvars, outs, out_values):
                env[var] = out
                tracks[var] = value
            forget(eqn.invars, i)
        flush()
        return [read(v) for v in jaxpr.outvars], [read_track(v) for v in jaxpr.outvars]

    def segment(self, jaxpr: Any, start: int, stop: int, last: dict[Any, int]):
        """Equations ``start..stop`` of ``jaxpr`` as one jitted call (compiled once)."""
        key = (id(jaxpr), start, stop)
        cached = self.segments.get(key)
        if cached is not None and cached[0] is jaxpr:
            return cached[1]
        eqns = jaxpr.eqns[start:stop + 1]
        defined: set = set()
        in_vars: list[Any] = []
        for eqn in eqns:
            for var in eqn.invars:
                if not isinstance(var, jex.Literal) and var not in defined and var not in in_vars:
                    in_vars.append(var)
            defined.update(eqn.outvars)
        out_vars = [v for eqn in eqns for v in eqn.outvars if last.get(v, -1) > stop]

        def evaluate(*in_arrays):
            env = dict(zip(in_vars, in_arrays))
            for eqn in eqns:
                outs = _bind(eqn, [v.val if isinstance(v, jex.Literal) else env[v]
                                   for v in eqn.invars])
                env.update(zip(eqn.outvars, outs))
            return [env[v] for v in out_vars]

        def tainted_out(taint: dict) -> list[bool]:
            taint = dict(taint)
            for eqn in eqns:
                t = any(taint.get(v, False) for v in eqn.invars if not isinstance(v, jex.Literal))
                taint.update((v, t) for v in eqn.outvars)
            return [taint[v] for v in out_vars]

        entry = (jax.jit(evaluate), in_vars, out_vars, tainted_out)
        self.segments[key] = (jaxpr, entry)
        return entry

    def step(self, eqn: Any, args: list[Any], values: list[_trace._Value]):
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        tainted = any(v.tainted for v in values)
        if name == "scan":
            return self.scan(eqn, args, values)
        if name == "cond":
            branch = eqn.params["branches"][int(args[0])]
            return self.run(branch, args[1:], values[1:])
        if name == "while":
            return self.while_loop(eqn, args, values)
        if name in ("dot_general", "conv_general_dilated"):
            outs = _bind(eqn, args)
            self.contraction(eqn, args, values)
            return outs, self.eqn(eqn, values)
        for key in _trace._CALL_JAXPR_PARAMS:
            inner = eqn.params.get(key)
            if isinstance(inner, (jex.ClosedJaxpr, jex.Jaxpr)):
                jaxpr, _ = _closed_parts(inner)
                if [_trace._shape(v) for v in jaxpr.invars] == [_trace._shape(v) for v in eqn.invars]:
                    return self.run(inner, args, values)
        return _bind(eqn, args), self.eqn(eqn, values)

    # --- control flow, concretely ---------------------------------------------

    def scan(self, eqn, args, values):
        p = eqn.params
        n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
        consts, carry = args[:n_consts], args[n_consts:n_consts + n_carry]
        xs = args[n_consts + n_carry:]
        const_values = values[:n_consts]
        carry_values = values[n_consts:n_consts + n_carry]
        scan_id = next(self._scan_ids)
        xs_values = [self.slice_leading(v, scan_id) for v in values[n_consts + n_carry:]]
        ys_by_index: dict[int, list[Any]] = {}
        ys_values: list[_trace._Value] = []
        for step in range(length):
            index = length - 1 - step if p["reverse"] else step
            self.scan_index[scan_id] = index
            outs, out_values = self.run(
                p["jaxpr"], list(consts) + list(carry) + [x[index] for x in xs],
                list(const_values) + list(carry_values) + xs_values,
            )
            carry, carry_values = outs[:n_carry], out_values[:n_carry]
            ys_by_index[index] = outs[n_carry:]
            ys_values = out_values[n_carry:]
        del self.scan_index[scan_id]
        n_ys = len(eqn.outvars) - n_carry
        ys = []
        for j in range(n_ys):
            aval = eqn.outvars[n_carry + j].aval
            if length == 0:
                ys.append(jnp.zeros(aval.shape, aval.dtype))
            else:
                ys.append(jnp.stack([ys_by_index[i][j] for i in range(length)]))
        if not ys_values:
            ys_values = [_trace._PLAIN] * n_ys
        carry_values = [self.leave_scan(v, scan_id) for v in carry_values]
        ys_values = [self.stack_leading(v, scan_id, length) for v in ys_values]
        return list(carry) + ys, carry_values + ys_values

    def while_loop(self, eqn, args, values):
        p = eqn.params
        n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts = args[:n_cond], args[n_cond:n_cond + n_body]
        cond_values, body_values = values[:n_cond], values[n_cond:n_cond + n_body]
        carry, carry_values = list(args[n_cond + n_body:]), list(values[n_cond + n_body:])
        while True:
            (go,), _ = self.run(p["cond_jaxpr"], list(cond_consts) + carry,
                                list(cond_values) + carry_values)
            if not bool(go):
                return carry, carry_values
            carry, carry_values = self.run(p["body_jaxpr"], list(body_consts) + carry,
                                           list(body_values) + carry_values)

    # --- contractions ------------------------------------------------------------

    def fail(self, track: _trace._Track, message: str):
        raise ValueError(f"oneshot_prune: {self.paths[track.leaf]} (shape "
                         f"{self.leaf_shapes[track.leaf]}) {message}")

    def contraction(self, eqn, args, values):
        if eqn.primitive.name == "dot_general":
            (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
            sides = ((0, lhs_c, lhs_b, rhs_c), (1, rhs_c, rhs_b, lhs_c))
            for side, contracting, batch, other_contracting in sides:
                for track in values[side].tracks:
                    if any(_trace._real([a for a in track.dims[d] if a.size > 1]) for d in batch):
                        self.fail(track, "is a batch dim of a dot_general (layers stacked by "
                                  "vmap); one-shot pruning follows layer slices through scan only")
                    other = args[1 - side]

                    def inputs(other=other, other_contracting=other_contracting):
                        keep = [d for d in range(other.ndim) if d not in other_contracting]
                        x = jnp.transpose(other, keep + list(other_contracting))
                        return x.reshape((-1,) + tuple(other.shape[d] for d in other_contracting))

                    self.on_contract(track, [track.dims[d] for d in contracting], inputs, other)
            return
        lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
        for track in values[0].tracks:
            self.fail(track, "is convolved as the image of a conv_general_dilated")
        for track in values[1].tracks:
            if eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1:
                self.fail(track, "is the kernel of a grouped convolution (not supported yet)")
        lhs, rhs = args
        spatial = [rhs.shape[d] for d in rhs_spec[2:]]

        def inputs():
            patches = jax.lax.conv_general_dilated_patches(
                lhs, spatial, eqn.params["window_strides"], eqn.params["padding"],
                lhs_dilation=eqn.params["lhs_dilation"], rhs_dilation=eqn.params["rhs_dilation"],
                dimension_numbers=eqn.params["dimension_numbers"], precision=_HIGHEST,
            )
            features = out_spec[1]
            keep = [d for d in range(patches.ndim) if d != features]
            x = jnp.transpose(patches, keep + [features])
            # The patches' features run (in, *spatial), the kernel's dims in rhs_spec order.
            return x.reshape((-1, rhs.shape[rhs_spec[1]], *spatial))

        for track in values[1].tracks:
            dims = [track.dims[rhs_spec[1]]] + [track.dims[d] for d in rhs_spec[2:]]
            self.on_contract(track, dims, inputs, lhs)


class _LeafInfo(NamedTuple):
    path: str
    shape: tuple[int, ...]
    axis: int
    stacked: tuple[int, ...]


def _layer_index(interp: _Interpreter, info: _LeafInfo, track: _trace._Track) -> tuple[int, ...]:
    index: dict[int, int] = {}
    for scan_id, atoms, _ in track.slices:
        position = interp.scan_index[scan_id]
        sizes = [a.size for a in atoms]
        for atom, i in zip(atoms, np.unravel_index(position, sizes) if sizes else ()):
            if atom.axis is None:
                continue
            i = atom.size - 1 - int(i) if atom.flipped else int(i)
            index[atom.axis] = index.get(atom.axis, 0) + i * atom.inner
    for axis in track.stacked:
        if axis not in index:
            if info.shape[axis] != 1:
                raise _Unsupported(
                    f"has layer axis {axis} sliced outside a scan (a Python loop or fori_loop "
                    "over stacked weights); one-shot pruning follows layer slices through "
                    "scan only")
            index[axis] = 0
    extra = sorted(a for a in index if a not in info.stacked and info.shape[a] > 1)
    missing = [a for a in info.stacked if a not in index and info.shape[a] > 1]
    if extra or missing:
        raise _Unsupported(
            f"is sliced by the computation along axes {sorted(index)} but its plan stacks "
            f"axes {list(info.stacked)}")
    return tuple(index.get(a, 0) for a in info.stacked)


def _tokens_by_features(info: _LeafInfo, dims: list[tuple], x: jax.Array):
    """``x`` (tokens, *contracted dims) as (tokens, K), K in leaf order, ``axis`` innermost."""
    pieces = [a for atoms in dims for a in atoms]
    x = x.reshape((x.shape[0],) + tuple(a.size for a in pieces))
    for j, atom in enumerate(pieces):
        if atom.axis is None and atom.size > 1:
            raise _Unsupported("is contracted after a broadcast")
        if atom.flipped and atom.size > 1:
            x = jnp.flip(x, axis=1 + j)
    real = [j for j, a in enumerate(pieces) if a.axis is not None and a.size > 1]
    contracted = sorted({pieces[j].axis for j in real})
    if info.axis not in contracted:
        raise _Unsupported(
            f"has reduction axis {info.axis} in its plan, but the computation contracts axes "
            f"{contracted}")
    order = [a for a in contracted if a != info.axis] + [info.axis]
    for axis in order:
        covered = math.prod(pieces[j].size for j in real if pieces[j].axis == axis)
        if covered != info.shape[axis] or any(pieces[j].partial for j in real):
            raise _Unsupported(f"has axis {axis} contracted only in part")
    real.sort(key=lambda j: (order.index(pieces[j].axis), -pieces[j].inner))
    rest = [j for j in range(len(pieces)) if j not in real]
    x = jnp.transpose(x, [0] + [1 + j for j in real] + [1 + j for j in rest])
    return x.reshape(x.shape[0], -1), tuple(order)


def _single_device(x: jax.Array) -> jax.Array:
    sharding = getattr(x, "sharding", None)
    if sharding is not None and len(sharding.device_set) > 1:
        return jax.device_put(x, jax.devices()[0])  # gather a sharded layer for the solve
    return x


@jax.jit
def _relative_errors(hessian, dense, mask, pruned):
    """``tr(D^T H D) / tr(W^T H W)`` for D = W - W*mask and D = W - pruned (float32)."""

    def quad(d):
        return jnp.sum(d * jnp.matmul(hessian, d, precision=_HIGHEST))

    dense = dense.astype(jnp.float32)
    total = quad(dense)
    errors = jnp.stack([quad(jnp.where(mask, 0.0, dense)), quad(dense - pruned.astype(jnp.float32))])
    return jnp.where(total > 0, errors / jnp.where(total > 0, total, 1.0), 0.0)


def _solve(method, leaf, info, index, order, stats, *, n, m, block_size, damp):
    """Prunes one layer slice; returns (new leaf, slice mask, masked error, error)."""
    where = [slice(None)] * leaf.ndim
    for axis, i in zip(info.stacked, index):
        where[axis] = i
    where = tuple(where)
    layer = _single_device(leaf[where])
    # Axis numbers within the slice (the stacked axes are indexed away).
    kept_axes = [a for a in range(leaf.ndim) if a not in info.stacked]
    slice_order = [kept_axes.index(a) for a in order]
    moved = jnp.moveaxis(layer, slice_order, list(range(len(order))))
    matrix = moved.reshape(math.prod(moved.shape[:len(order)]), -1)
    hessian = _single_device(stats.xtx)
    if method == "sparsegpt":
        pruned, mask = _oneshot.sparsegpt(matrix, hessian, n=n, m=m, axis=0,
                                          block_size=block_size, damp=damp)
    elif method == "wanda":
        pruned, mask = _oneshot.wanda(matrix, _single_device(stats.sq_norms), n=n, m=m, axis=0)
    else:
        mask = _patterns.nm_mask(matrix, n, m, axis=0)
        pruned = jnp.where(mask, matrix, jnp.zeros((), matrix.dtype))
    masked_error, error = (float(e) for e in _relative_errors(hessian, matrix, mask, pruned))

    def back(x):
        return jnp.moveaxis(x.reshape(moved.shape), list(range(len(order))), slice_order)

    return back(pruned), back(mask), where, masked_error, error


def oneshot_prune(
    fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterable[Any],
    *,
    method: str = "sparsegpt",
    n: int = 2,
    m: int = 4,
    rules: _selection.Rules | None = None,
    sequential: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
    keep_stats: bool = False,
    progress: bool = True,
) -> OneShotResult:
    """One-shot N:M pruning of a model's params from calibration batches.

    For every leaf the rules prune, collects ``X^T X`` and ``sum x^2`` of the
    activations it is contracted with in ``fn(params, batch)`` (Dense,
    ``LinearGeneral``/attention projections, ``Einsum``, Conv through its
    patches; per layer slice for ``scan``-stacked leaves) and solves each
    layer with SparseGPT, Wanda or magnitude. See the module docstring for
    how the activations are found and for the sequential order.

    Args:
      fn: called as ``fn(params, batch)``.
      params: the parameter tree (dict, Linen ``params``, ``nnx.State``);
        may be bf16 (statistics and solves run in float32; results keep the
        leaf's dtype) and sharded (each layer is gathered for its solve and
        the result put back with the leaf's sharding).
      batches: calibration batches (pytrees of arrays); read into a list, as
        sequential mode passes over them once per layer group.
      method: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
      n, m: keep ``n`` of every ``m`` along each leaf's reduction axis.
      rules: selection rules tried before those read from the computation
        (`sparse_jax.rules_from_computation` of ``fn`` on the first batch).
      sequential: each layer's inputs computed with the earlier layers
        already pruned (True, as in the SparseGPT paper), or every layer's
        from the dense model in one pass (False).
      block_size, damp: passed to `sparse_jax.sparsegpt`.
      keep_stats: put each layer's `CalibrationStats` into its report row.
      progress: a tqdm bar over layers, when tqdm is installed and stderr
        is a terminal.

    Returns:
      A `OneShotResult` ``(params, masks, report)``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, sparse_jax
      >>> params = {"w1": jax.random.normal(jax.random.key(0), (16, 32)),
      ...           "w2": jax.random.normal(jax.random.key(1), (32, 8))}
      >>> def fn(p, x):
      ...     return jax.nn.relu(x @ p["w1"]) @ p["w2"]
      >>> batches = [jax.random.normal(jax.random.key(i), (64, 16)) for i in range(2)]
      >>> pruned, masks, report = sparse_jax.oneshot_prune(fn, params, batches, progress=False)
      >>> [(row.path, row.tokens) for row in report]
      [('w1', 128), ('w2', 128)]
      >>> bool(sparse_jax.is_nm_sparse(pruned["w2"], 2, 4, axis=0))
      True
      >>> all(row.error <= row.masked_error for row in report)  # SparseGPT's update helps
      True
    """
    return _oneshot_prune(
        fn, params, batches, method=method, n=n, m=m, rules=rules, sequential=sequential,
        block_size=block_size, damp=damp, keep_stats=keep_stats, progress=progress, stacklevel=4)


def _oneshot_prune(fn, params, batches, *, method, n, m, rules, sequential, block_size, damp,
                   keep_stats, progress, stacklevel):
    """`oneshot_prune`; ``stacklevel`` points the trace's warnings at the user's call."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: one-shot pruning needs calibration data")
    batches = [jax.tree.map(jnp.asarray, b) for b in batches]
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [_paths.path_to_str(p) for p, _ in with_paths]
    leaves = [jnp.asarray(leaf) for _, leaf in with_paths]
    shardings = [getattr(leaf, "sharding", None) for leaf in leaves]
    shapes = [tuple(leaf.shape) for leaf in leaves]
    computed = _trace._rules(fn, params, (), (batches[0],), {}, stacklevel=stacklevel)
    plans = _selection.plan_tree(params, n, m, list(rules or []) + computed)
    infos = {
        i: _LeafInfo(paths[i], shapes[i], plan.axis, tuple(plan.stacked_axes))
        for i, plan in enumerate(plans) if plan.pruned
    }
    units = [
        (i, index) for i, info in infos.items()
        for index in itertools.product(*(range(shapes[i][a]) for a in info.stacked))
    ]
    jaxprs: dict[Any, Any] = {}
    segments: dict[tuple, tuple] = {}

    def traced(batch):
        batch_leaves, batch_tree = jax.tree.flatten(batch)
        key = (batch_tree, tuple((x.shape, x.dtype) for x in batch_leaves))
        if key not in jaxprs:
            def flat_fn(*flat):
                p = jax.tree.unflatten(treedef, flat[:len(leaves)])
                out = fn(p, jax.tree.unflatten(batch_tree, flat[len(leaves):]))
                return [x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)]

            jaxprs[key] = jax.make_jaxpr(flat_fn)(*leaves, *batch_leaves)
        return jaxprs[key], batch_leaves

    stats: dict[tuple, _oneshot.CalibrationStats] = {}
    orders: dict[int, tuple[int, ...]] = {}

    def run(batch, accept: Callable[[tuple, Any], bool]):
        closed, batch_leaves = traced(batch)

        def on_contract(track, dims, inputs, source):
            if track.leaf not in infos:
                return
            info = infos[track.leaf]
            try:
                unit = (track.leaf, _layer_index(interp, info, track))
                if not accept(unit, source):
                    return
                x2d, order = _tokens_by_features(info, dims, inputs())
            except _Unsupported as e:
                raise ValueError(f"oneshot_prune: {info.path} (shape {info.shape}) {e}") from None
            if orders.setdefault(track.leaf, order) != order:
                raise ValueError(
                    f"oneshot_prune: {info.path} (shape {info.shape}) is contracted over axes "
                    f"{order} in one place and {orders[track.leaf]} in another")
            if unit not in stats:
                stats[unit] = _oneshot.CalibrationStats.zeros(x2d.shape[1])
            stats[unit] = stats[unit].update(x2d)

        interp = _Interpreter(shapes, paths, on_contract, segments)
        values = []
        for i, shape in enumerate(shapes):
            if i in infos:
                dims = tuple((_trace._Atom(axis, size),) for axis, size in enumerate(shape))
                values.append(_trace._Value((_trace._Track(i, dims),), False))
            else:
                values.append(_trace._PLAIN)
        values += [_trace._Value((), not _trace._is_key(x)) for x in batch_leaves]
        interp.run(closed, leaves + batch_leaves, values)

    bar = _progress_bar(len(units), progress)
    report: list[OneShotRow] = []
    mask_leaves: dict[int, jax.Array] = {}

    def solve(unit):
        i, index = unit
        info = infos[i]
        if unit not in stats:
            return
        start = time.perf_counter()
        pruned, mask, where, masked_error, error = _solve(
            method, leaves[i], info, index, orders[i], stats[unit],
            n=n, m=m, block_size=block_size, damp=damp)
        new = leaves[i].at[where].set(pruned.astype(leaves[i].dtype)) if index else pruned
        if i not in mask_leaves:
            mask_leaves[i] = jnp.zeros(shapes[i], bool)
        new_mask = mask_leaves[i].at[where].set(mask) if index else mask
        if shardings[i] is not None:  # back where the leaf lives, for the next passes
            new, new_mask = jax.device_put((new, new_mask), shardings[i])
        leaves[i], mask_leaves[i] = new, new_mask
        unit_stats = stats.pop(unit)
        report.append(OneShotRow(
            info.path, index, method, tuple(pruned.shape), int(unit_stats.count), masked_error,
            error, time.perf_counter() - start, unit_stats if keep_stats else None))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(info.path + (str(list(index)) if index else ""))

    try:
        if sequential:
            done: set = set()
            while True:
                group: dict = {}
                group_input: list[Any] = []
                for b, batch in enumerate(batches):
                    def accept(unit, source, first=(b == 0)):
                        if unit in done:
                            return False
                        if first and (not group or (source is group_input[0] and unit not in group)):
                            if not group:
                                group_input.append(source)
                            group[unit] = True
                        if unit not in group:
                            raise _Stop
                        return True

                    try:
                        run(batch, accept)
                    except _Stop:
                        pass
                    if not group:
                        break
                if not group:
                    break
                for unit in group:
                    solve(unit)
                done.update(group)
        else:
            for batch in batches:
                run(batch, lambda unit, source: True)
            for unit in list(stats):
                solve(unit)
    finally:
        if bar is not None:
            bar.close()

    solved = {(i, row_index) for i, row_index in _solved_units(report, paths)}
    never = sorted({infos[i].path for i, index in units if (i, index) not in solved})
    if never:
        raise ValueError(
            "oneshot_prune: these leaves are selected for pruning but fn never contracts them "
            f"with the calibration inputs (no statistics): {', '.join(never)}; skip them with "
            "rules=[(regex, 'skip')] or prune them with sparse_jax.prune")
    new_leaves: list[Any] = []
    all_masks: list[Any] = []
    for i, leaf in enumerate(leaves):
        new_leaves.append(leaf)
        all_masks.append(mask_leaves.get(i))
    return OneShotResult(treedef.unflatten(new_leaves), treedef.unflatten(all_masks), tuple(report))


def _solved_units(report, paths):
    index_of = {path: i for i, path in enumerate(paths)}
    return [(index_of[row.path], row.index) for row in report]


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="one-shot pruning", unit="layer", disable=None)


__all__ = ["OneShotResult", "OneShotRow", "oneshot_prune"]
