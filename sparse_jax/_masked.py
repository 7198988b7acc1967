"""`masked`: an optax transformation that keeps parameters exactly on an N:M mask."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparse_jax import _packing, _prune, _selection

MaskSpec = Any  # a mask tree, a callable params -> mask tree, or None


class MaskedState(NamedTuple):
    """State of `masked`.

    Attributes:
      inner_state: the wrapped transformation's state.
      packed_masks: one entry per params leaf (in ``jax.tree.leaves`` order):
        the leaf's mask packed 8 entries per uint8 along its second-to-last
        axis (see ``sparse_jax._packing``), or
        ``None`` for a leaf that is not pruned.
    """

    inner_state: optax.OptState
    packed_masks: tuple[jax.Array | None, ...]


def _follow_sharding(packed: jax.Array, param: Any) -> jax.Array:
    """Places ``packed`` with the param's NamedSharding where the shapes allow."""
    sharding = getattr(param, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or isinstance(
        param, jax.core.Tracer
    ):
        return packed
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

    Each step (1) zeroes the gradient of pruned weights, so no optimizer state
    (momentum, Adam moments) builds up on them; (2) runs ``inner`` on that
    gradient; (3) returns the update that makes the new parameters exactly
    ``mask * (params + update)``: kept weights get ``inner``'s update unchanged,
    pruned weights become 0 whatever ``inner`` did (weight decay, Adam's
    epsilon, Lion's sign, ...). This is the "retrain with the mask fixed" step of
    NVIDIA's 2:4 recipe.

    Not to be confused with ``optax.masked``, which chooses *which parameter
    leaves* a transformation applies to (and leaves the others' updates
    untouched). `sparse_jax.masked` masks *entries inside* leaves and forces
    the pruned entries of the parameters themselves to zero.

    Place it outermost (``masked(optax.chain(...))``, or last in a chain): a
    transformation applied after it may move pruned weights off zero again.
    Parameters should be pruned before the first step; if they are not, the
    first step zeroes the pruned entries.

    Args:
      inner: the optimizer to wrap (any ``GradientTransformation``).
      masks: a mask tree (bool arrays for pruned leaves, ``None`` for skipped,
        e.g. from `sparse_jax.prune`), a callable ``params -> masks``, or
        ``None`` to compute the masks from the params at ``init`` with the
        default rules (magnitude 2:4, as ASP's ``prune_trained_model``).
      check_masks: at ``init``, raise unless every mask is ``n:m`` along its
        leaf's reduction axis (see `sparse_jax.check_masks`).
      n, m, rules: the pattern and rules used by ``check_masks`` and when
        ``masks`` is ``None``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Its ``update`` requires
      ``params``; extra keyword arguments go to ``inner``. The state keeps the
      masks bit-packed (1 bit per pruned weight when the input axis is a multiple
      of 8).

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
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        if params is None:
            raise ValueError("sparse_jax.masked: init needs the params tree")
        mask_tree = _resolve_masks(masks, params, n, m, rules)
        aligned = _prune.align_masks(mask_tree, params)
        if check_masks:
            _prune.check_masks(params, mask_tree, n, m, rules)
        packed = tuple(
            None if mask is None else _follow_sharding(_packing.pack_bits(mask), param)
            for mask, param in zip(aligned, jax.tree.leaves(params))
        )
        return MaskedState(inner_state=inner.init(params), packed_masks=packed)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "sparse_jax.masked needs the current params to keep them on the "
                "mask: call tx.update(grads, state, params)"
            )
        grad_leaves, treedef = jax.tree.flatten(updates)
        param_leaves = jax.tree.leaves(params)
        if len(grad_leaves) != len(state.packed_masks) or len(param_leaves) != len(
            state.packed_masks
        ):
            raise ValueError(
                f"sparse_jax.masked was initialised for {len(state.packed_masks)} "
                f"leaves but got {len(grad_leaves)} update leaves and "
                f"{len(param_leaves)} params leaves"
            )
        unpacked = [
            None if packed is None else _packing.unpack_bits(packed, jnp.shape(param))
            for packed, param in zip(state.packed_masks, param_leaves)
        ]
        masked_grads = treedef.unflatten(
            [
                g if mask is None else jnp.where(mask, g, jnp.zeros_like(g))
                for g, mask in zip(grad_leaves, unpacked)
            ]
        )
        inner_updates, inner_state = inner.update(
            masked_grads, state.inner_state, params, **extra_args
        )
        update_leaves, update_treedef = jax.tree.flatten(inner_updates)
        # where(), not mask * (p + u) - p: kept weights then get inner's update
        # bit for bit, and p + (-p) is exactly 0 for the pruned ones.
        final = [
            u if mask is None else jnp.where(mask, u, -p)
            for u, p, mask in zip(update_leaves, param_leaves, unpacked)
        ]
        return update_treedef.unflatten(final), MaskedState(inner_state, state.packed_masks)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def masks_from_state(opt_state: Any, params: Any) -> Any:
    """Recovers the mask tree of the (first) `masked` state found in ``opt_state``.

    Useful after restoring a checkpoint: the masks travel inside the optimizer
    state, so they cannot be lost separately from it.

    Args:
      opt_state: an optimizer state containing a `MaskedState` anywhere (inside
        ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``, ...).
      params: the params tree (for structure and shapes).

    Returns:
      The mask tree (bool arrays, ``None`` where not pruned).
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MaskedState))
        if isinstance(s, MaskedState)
    ]
    if not found:
        raise ValueError("no sparse_jax.masked state found in opt_state")
    leaves, treedef = jax.tree.flatten(params)
    packed = found[0].packed_masks
    if len(packed) != len(leaves):
        raise ValueError(
            f"the masked state holds {len(packed)} leaves but params has {len(leaves)}"
        )
    return treedef.unflatten(
        [None if p is None else _packing.unpack_bits(p, jnp.shape(x)) for p, x in zip(packed, leaves)]
    )
