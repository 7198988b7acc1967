"""`masked`: an optax transformation that keeps parameters exactly on an N:M mask."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparse_jax import _leafwise, _opt_state, _packing, _paths, _prune, _selection

MaskSpec = Any  # a mask tree, a callable params -> mask tree, or None


@dataclasses.dataclass(frozen=True)
class PackedMask:
    """One leaf's mask, bit-packed (see ``sparse_jax._packing``).

    Attributes:
      bits: the packed uint8 array (the only array; it is what checkpoints hold).
      shape: the parameter's shape, static (part of the tree structure), so an
        update whose parameter has another shape is caught at trace time.
    """

    bits: jax.Array
    shape: tuple[int, ...]

    def unpack(self) -> jax.Array:
        """The bool mask, of the parameter's shape."""
        return _packing.unpack_bits(self.bits, self.shape)


jax.tree_util.register_dataclass(PackedMask, data_fields=["bits"], meta_fields=["shape"])


class MaskedState(NamedTuple):
    """State of `masked`.

    Attributes:
      inner_state: the wrapped transformation's state.
      packed_masks: a tree of the params' structure with a `PackedMask` for
        each pruned leaf and ``None`` for each leaf that is not pruned.
        (For a params tree without leaves, such as the placeholder
        ``optax.tree_map_params`` passes to ``init``, an empty uint8 array.)
    """

    inner_state: optax.OptState
    packed_masks: Any


def _is_mask_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PackedMask)


def _named_leaves(tree: Any, is_leaf=None) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return [(_paths.path_to_str(path) or "<root>", leaf) for path, leaf in flat]


def _describe(path: str, shape: tuple[int, ...] | None) -> str:
    return f"{path!r} {'(not pruned)' if shape is None else tuple(shape)}"


def _aligned_masks(packed_masks: Any, tree: Any, what: str) -> list[PackedMask | None]:
    """The state's packed masks in the leaf order of ``tree``, after checking that
    ``tree`` has the paths of the params seen at ``init`` and, on every pruned
    leaf, the same shape. Static checks only: free inside ``jit``.
    """
    stored = _named_leaves(packed_masks, is_leaf=_is_mask_leaf)
    given = _named_leaves(tree)
    for i in range(max(len(stored), len(given))):
        if i >= len(given):
            path, mask = stored[i]
            raise ValueError(
                f"sparse_jax.masked: {what} has {len(given)} leaves but the params at init had "
                f"{len(stored)}; the first one missing is {_describe(path, getattr(mask, 'shape', None))}"
            )
        path, leaf = given[i]
        shape = tuple(np.shape(leaf))
        if i >= len(stored):
            raise ValueError(
                f"sparse_jax.masked: {what} has {len(given)} leaves but the params at init had "
                f"{len(stored)}; the first extra one is {path!r} {shape}"
            )
        stored_path, mask = stored[i]
        if not _is_mask_leaf(mask):
            raise ValueError(
                f"sparse_jax.masked: the state holds no mask tree (got {type(mask).__name__} at "
                f"{stored_path!r}); was it initialised with an empty params tree?"
            )
        if stored_path != path:
            raise ValueError(
                f"sparse_jax.masked: {what} leaf {i} is {path!r} {shape}, but the params at init "
                f"had {_describe(stored_path, getattr(mask, 'shape', None))} there; masks are "
                "matched to params by path, so the trees must have the same structure"
            )
        if mask is not None and tuple(mask.shape) != shape:
            raise ValueError(
                f"sparse_jax.masked: {what} leaf {path!r} has shape {shape}, but its mask was "
                f"built at init for shape {tuple(mask.shape)}"
            )
    return [mask for _, mask in stored]


def _tree_like(params: Any, leaves: list[Any]) -> Any:
    """``leaves`` in the structure of ``params``, with NNX variables unwrapped.

    An ``nnx.Param`` holding a `PackedMask` would not survive ``nnx.jit`` (its
    value is flattened into plain dicts), so the mask tree keeps the params'
    paths but not their variable wrappers.
    """
    remaining = iter(leaves)
    return jax.tree.map(
        lambda _: next(remaining), params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def _find_state(opt_state: Any) -> MaskedState:
    return _opt_state.find_state(opt_state, MaskedState, "masked")


def _follow_sharding(packed: jax.Array, param: Any) -> jax.Array:
    """Places ``packed`` with the param's NamedSharding where the shapes allow."""
    if isinstance(param, getattr(jax.core, "Tracer", ())):
        return packed  # inside jit: the compiler places it
    try:
        sharding = param.sharding
    except AttributeError:  # a numpy array, or a tracer of another jax version
        return packed
    if not isinstance(sharding, jax.sharding.NamedSharding) or packed.ndim != np.ndim(param):
        return packed  # the strided flat layout has lost the param's axes
    mesh, spec = sharding.mesh, sharding.spec
    for dim, names in zip(packed.shape, spec):
        if names is None:
            continue
        names = names if isinstance(names, tuple) else (names,)
        if dim % math.prod(mesh.shape[name] for name in names):
            return packed  # the packed axis no longer splits evenly
    return jax.device_put(packed, sharding)


def _resolve_masks(masks: MaskSpec, params: Any, n: int, m: int, rules) -> Any:
    if masks is None:
        return _prune.prune(params, n, m, rules)[1]
    if callable(masks):
        return masks(params)
    return masks


def masked(
    inner: optax.GradientTransformation,
    masks: MaskSpec = None,
    *,
    check_masks: bool = False,
    n: int = 2,
    m: int = 4,
    rules: _selection.Rules | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that the parameters stay exactly on an N:M mask.

    Each step (1) zeroes the gradient of pruned weights, so that no pruned entry
    reaches a kept one through ``inner`` (a global-norm clip, LAMB's trust
    ratio, Adafactor's factored moments, ...); (2) runs ``inner`` on that
    gradient; (3) returns the update that makes the new parameters exactly
    ``mask * (params + update)``: kept weights get ``inner``'s update unchanged
    (bit for bit), pruned weights become 0 whatever ``inner`` did (weight decay,
    Adam's epsilon, Lion's sign, ...). Where ``inner`` acts on each leaf entry
    by entry (SGD, momentum, Adam(W), Lion, RMSProp, per-leaf decay, schedules:
    proven from its jaxpr at trace time, conservatively), a pruned entry can
    only reach pruned entries, which (3) overwrites, so (1) is skipped: it is
    the dearest part of the masking on the CPU. The kept weights get the same
    updates (the same arithmetic; under ``jit`` XLA may round their last bit
    differently, as after any change to a compiled program); the moments of
    pruned weights then hold values that never reach the params. This is the
    "retrain with the mask fixed" step of NVIDIA's 2:4 recipe.

    Not to be confused with ``optax.masked``, which chooses *which parameter
    leaves* a transformation applies to (and leaves the others' updates
    untouched). `sparse_jax.masked` masks *entries inside* leaves and forces
    the pruned entries of the parameters themselves to zero.

    Place it outermost (``masked(optax.chain(...))``, or last in a chain): a
    transformation applied after it may move pruned weights off zero again.

    **Exactly zero, and its one limit.** The update of a pruned weight is
    ``-params``, so ``optax.apply_updates`` lands it on exactly 0, provided the
    weight was finite: no update turns ``nan`` or ``inf`` into 0 under
    ``params + update``. Pruned weights are 0 after the first step, so only
    params that are non-finite at pruned positions *before the first step*
    are affected (`sparse_jax.prune` and `sparse_jax.apply_masks` return
    exact zeros there, NaN included). For a guarantee whatever the params,
    apply with `sparse_jax.apply_updates` (``params, updates, opt_state``)
    instead of ``optax.apply_updates``: it sets pruned weights to 0 rather
    than adding to them, and kept weights get ``params + update`` as optax
    computes it. ``nnx.Optimizer.update`` calls ``optax.apply_updates``
    itself, so with NNX prune (or `apply_masks`) the model's params before
    building the optimizer.

    **Tied to the params tree.** ``init`` keeps the masks in the params' tree
    structure (see `MaskedState`), and ``update`` raises a ``ValueError``
    naming the first differing path and both shapes if its params or updates
    differ from the params seen at ``init`` in structure, paths or the shape of
    a pruned leaf (checked at trace time, free inside ``jit``).
    ``optax.tree_map_params(tx, f, state, ...)`` maps ``f`` over the params-
    shaped parts of the inner state and leaves the packed masks as they are
    (they are uint8 and packed, not params-shaped); ``transform_non_params``,
    if given, receives the whole packed-masks tree.

    Args:
      inner: the optimizer to wrap (any ``GradientTransformation``).
      masks: a mask tree (bool arrays for pruned leaves, ``None`` for skipped,
        e.g. from `sparse_jax.prune`), a callable ``params -> masks``, or
        ``None`` to compute the masks from the params at ``init`` with the
        default rules (magnitude 2:4, as ASP's ``prune_trained_model``).
      check_masks: at ``init``, raise unless every group of ``m`` along each
        mask's reduction axis keeps exactly ``n`` (see `sparse_jax.check_masks`;
        an all-False mask fails). Needs concrete masks (not inside ``jit``).
      n, m, rules: the pattern and rules used by ``check_masks`` and when
        ``masks`` is ``None``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Its ``update`` requires
      ``params``; extra keyword arguments go to ``inner``. The state keeps the
      masks bit-packed: 1 bit per pruned weight when some axis other than the
      last, or the leaf's size, is a multiple of 8 (at most 7 bits more per
      leaf otherwise).

    Example:
      >>> import jax, jax.numpy as jnp, optax, sparse_jax
      >>> params = {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}
      >>> params, masks = sparse_jax.prune(params)
      >>> tx = sparse_jax.masked(optax.adamw(1e-2, weight_decay=0.1), masks)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> bool(sparse_jax.is_nm_sparse(params["kernel"], 2, 4, axis=0))
      True
      >>> state.packed_masks["kernel"].bits.shape  # 16 x 8 bits
      (2, 8)
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        if params is None:
            raise ValueError("sparse_jax.masked: init needs the params tree")
        param_leaves = jax.tree.leaves(params)
        if not param_leaves:
            # No leaves: e.g. the placeholder of optax.tree_map_params. An array
            # here (not a params-shaped tree) tells it the masks are not params.
            return MaskedState(inner.init(params), np.zeros((0,), np.uint8))
        mask_tree = _resolve_masks(masks, params, n, m, rules)
        aligned = _prune.align_masks(mask_tree, params)
        if check_masks:
            _prune.check_masks(params, mask_tree, n, m, rules)
        packed = [
            None
            if mask is None
            else PackedMask(
                _follow_sharding(_packing.pack_bits(mask), param), tuple(np.shape(param))
            )
            for mask, param in zip(aligned, param_leaves)
        ]
        return MaskedState(inner.init(params), _tree_like(params, packed))

    leafwise_by_signature: dict[Any, bool] = {}

    def leafwise(updates, inner_state, params, extra_args) -> bool:
        # One trace of inner.update per signature (an eager loop would trace every step).
        args = (updates, inner_state, params, extra_args)
        prove = lambda: _leafwise.is_leafwise_elementwise(
            inner.update, updates, inner_state, params, **extra_args
        )
        try:
            key = (jax.tree.structure(args), tuple(jax.typeof(x) for x in jax.tree.leaves(args)))
            hash(key)
        except TypeError:  # a leaf without a hashable type: prove it each time
            return prove()
        if key not in leafwise_by_signature:
            leafwise_by_signature[key] = prove()
        return leafwise_by_signature[key]

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "sparse_jax.masked needs the current params to keep them on the "
                "mask: call tx.update(grads, state, params)"
            )
        grad_leaves, grad_treedef = jax.tree.flatten(updates)
        param_leaves = jax.tree.leaves(params)
        if not param_leaves and not grad_leaves:
            inner_updates, inner_state = inner.update(
                updates, state.inner_state, params, **extra_args
            )
            return inner_updates, MaskedState(inner_state, state.packed_masks)
        packed = _aligned_masks(state.packed_masks, params, "params")
        _aligned_masks(state.packed_masks, updates, "updates")
        unpacked = [None if p is None else p.unpack() for p in packed]
        if not leafwise(updates, state.inner_state, params, extra_args):
            # Zeroed, so that no pruned entry reaches a kept one through the inner optimizer
            # (a global norm, a factored moment, ...). A leafwise elementwise inner needs no
            # zeroing: its pruned entries only reach pruned entries, overwritten below.
            updates = grad_treedef.unflatten(
                [
                    g if mask is None else jnp.where(mask, g, jnp.zeros_like(g))
                    for g, mask in zip(grad_leaves, unpacked)
                ]
            )
        inner_updates, inner_state = inner.update(
            updates, state.inner_state, params, **extra_args
        )
        update_leaves, update_treedef = jax.tree.flatten(inner_updates)
        # where(), not mask * (p + u) - p: kept weights then get inner's update
        # bit for bit, and p + (-p) is exactly 0 for the finite pruned ones.
        final = [
            u if mask is None else jnp.where(mask, u, -p)
            for u, p, mask in zip(update_leaves, param_leaves, unpacked)
        ]
        return update_treedef.unflatten(final), MaskedState(inner_state, state.packed_masks)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def apply_updates(params: Any, updates: Any, opt_state: Any) -> Any:
    """``optax.apply_updates`` that also sets the pruned weights to exactly 0.

    Uses the masks of the (first) `masked` state in ``opt_state``. Kept and
    unpruned weights get ``params + updates`` exactly as ``optax.apply_updates``
    computes it (cast back to the params' dtype); pruned weights are set to 0
    instead of added to, so a ``nan`` or ``inf`` there becomes 0 too.

    Example:
      >>> import jax.numpy as jnp, optax, sparse_jax
      >>> params = {"w": jnp.array([[1.0], [jnp.nan], [3.0], [jnp.inf]])}
      >>> masks = {"w": jnp.array([[True], [False], [True], [False]])}
      >>> tx = sparse_jax.masked(optax.sgd(0.5), masks)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones((4, 1))}, state, params)
      >>> sparse_jax.apply_updates(params, updates, state)["w"].ravel().tolist()
      [0.5, 0.0, 2.5, 0.0]
    """
    packed = _aligned_masks(_find_state(opt_state).packed_masks, params, "params")
    _aligned_masks(_find_state(opt_state).packed_masks, updates, "updates")
    param_leaves, treedef = jax.tree.flatten(params)
    update_leaves = treedef.flatten_up_to(updates)
    new = []
    for p, u, mask in zip(param_leaves, update_leaves, packed):
        added = jnp.asarray(p + u).astype(jnp.asarray(p).dtype)
        new.append(added if mask is None else jnp.where(mask.unpack(), added, jnp.zeros_like(added)))
    return treedef.unflatten(new)


def masks_from_state(opt_state: Any, params: Any = None) -> Any:
    """Recovers the mask tree of the (first) `masked` state found in ``opt_state``.

    Useful after restoring a checkpoint: the masks travel inside the optimizer
    state, so they cannot be lost separately from it.

    Args:
      opt_state: an optimizer state containing a `MaskedState` anywhere (inside
        ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``, ...).
      params: optional params tree; if given, the masks are returned in its
        structure after checking its paths and shapes against the state.

    Returns:
      The mask tree (bool arrays, ``None`` where not pruned).
    """
    packed_masks = _find_state(opt_state).packed_masks
    if params is None:
        return jax.tree.map(
            lambda p: None if p is None else p.unpack(), packed_masks, is_leaf=_is_mask_leaf
        )
    packed = _aligned_masks(packed_masks, params, "params")
    treedef = jax.tree.structure(params)
    return treedef.unflatten([None if p is None else p.unpack() for p in packed])
