"""SR-STE: train N:M sparse from the first step (Zhou et al., ICLR 2021).

"Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch"
keeps dense weights ``w`` and, every step:

1. runs the forward pass with ``w`` projected to its current N:M magnitude
   mask, ``mask(w) * w`` (`srste_project`);
2. passes the gradient straight through to the dense ``w`` (the gradient of
   the projected weights, unchanged, also for the pruned entries);
3. adds the *sparse-refined* decay ``lambda * (1 - mask) * w`` to that
   gradient (`srste`), which pulls the pruned weights towards zero so the
   mask settles instead of flipping back and forth.

The pieces work on any pytree of params (plain dicts, Flax Linen ``params``,
``nnx.State``); `srste_model` runs an NNX model on its projected weights
without rewriting it. The groups run along each leaf's reduction axis, as
`sparse_jax.plan_tree` decides with the usual ``rules``.

How lambda is scaled: as in the paper's update rule
``w <- w - lr * (g(mask * w) + lambda * (1 - mask) * w)`` and in the authors'
code (aojunzz/NM-sparsity, ``devkit/sparse_ops/sparse_ops.py``: the backward
returns ``grad + decay * (1 - mask) * weight`` with ``decay = 0.0002``, fed to
SGD with momentum), the term is added to the gradient, unscaled; the optimizer
that follows multiplies it by its learning rate (and feeds it to its momentum).
So `srste` goes *before* the optimizer in an ``optax.chain``; the default
``decay=2e-4`` is the paper's. After an adaptive optimizer such as Adam the
term would be rescaled per entry; keep it before.

Compared with qwix's N:M rule (``qwix.SparsityRule`` through a ``QtRule``'s
``additional_qt_config``): qwix intercepts ``dot_general`` and recomputes the
magnitude mask of the weight operand on every call, by default along the
operand's last axis (``order='R'``; ``'C'`` for the second-to-last); the
gradient reaches only the kept weights (it flows through a ``jnp.where``),
and there is no sparse-refined decay; start/update steps live in
``qwix.contrib.sparsity.SparsityModule``, which keeps the step and mask as
``nnx.BatchStat`` in the model. Here the gradient reaches every dense weight
straight through, the decay settles the mask, the axis per leaf comes from
`sparse_jax.plan_tree`, the mask and schedule (``start_step``,
``update_every``, the same refresh rule as qwix's) live in the optimizer
state, and the final mask goes to `sparse_jax.masked` / `compress` / export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparse_jax import _opt_state, _packing, _patterns, _prune, _selection, _transposable

# A leaf's layout: None (not pruned), ("nm", axis) or ("transposable", (in, out)).
MaskLayout = tuple[str, Any] | None


@jax.custom_vjp
def _straight_through(w: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, w, jnp.zeros_like(w))


def _straight_through_fwd(w, mask):
    return _straight_through(w, mask), None


def _straight_through_bwd(_, g):
    return g, None  # the dense weights get the gradient unchanged; the mask none


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def _layouts(params: Any, n: int, m: int, rules, transposable: bool) -> tuple[MaskLayout, ...]:
    layouts = []
    for plan in _selection.plan_tree(params, n, m, rules):
        if plan.axis is None:
            layouts.append(None)
            continue
        pair = (
            _transposable.block_axes_for(plan.shape, plan.axis, plan.stacked_axes, m)
            if transposable
            else None
        )
        layouts.append(("nm", plan.axis) if pair is None else ("transposable", pair))
    return tuple(layouts)


def _mask_for(w: jax.Array, layout: MaskLayout, n: int, m: int) -> jax.Array:
    kind, axes = layout
    w = jax.lax.stop_gradient(w)
    if kind == "transposable":
        method = "exact" if m <= _transposable._EXACT_MAX_M else "greedy"
        return _transposable._transposable_mask(w, n=n, m=m, axes=axes, method=method)
    return _patterns._nm_mask(w, n=n, m=m, axis=axes)


def srste_project(
    params: Any,
    masks: Any = None,
    *,
    n: int = 2,
    m: int = 4,
    rules: _selection.Rules | None = None,
    transposable: bool = False,
) -> Any:
    """The params projected to N:M for the forward pass, straight-through for the gradient.

    Each pruned leaf ``w`` becomes ``mask * w`` (exactly N:M along its
    reduction axis); the gradient of the result passes to ``w`` unchanged,
    pruned entries included (a ``custom_vjp``). Skipped leaves pass through.

    Args:
      params: a params pytree (dict, Linen ``params``, ``nnx.State``).
      masks: the mask tree to project with, e.g. ``srste_masks(opt_state,
        params)`` when the mask is only refreshed every k steps; ``None``:
        each leaf's current magnitude mask (SR-STE's default, a new mask
        every step).
      n, m, rules: the pattern and the selection rules (`sparse_jax.plan_tree`).
      transposable: with ``masks=None``, use `sparse_jax.transposable_nm_mask`
        on leaves with an (in, out) pair whose sizes m divides (Dense, Conv,
        stacked); the others get the ordinary N:M mask.

    Returns:
      The projected params, same structure.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}
      >>> loss = lambda p: jnp.sum(sparse_jax.srste_project(p)["kernel"] ** 2)
      >>> sparse = sparse_jax.srste_project(params)["kernel"]
      >>> bool(sparse_jax.is_nm_sparse(sparse, 2, 4, axis=0))
      True
      >>> grad = jax.grad(loss)(params)["kernel"]  # 2 * sparse, dense-shaped
      >>> bool(jnp.allclose(grad, 2 * sparse))
      True
    """
    leaves, treedef = jax.tree.flatten(params)
    if masks is None:
        layouts = _layouts(params, n, m, rules, transposable)
        mask_leaves = [
            None if layout is None else _mask_for(jnp.asarray(leaf), layout, int(n), int(m))
            for leaf, layout in zip(leaves, layouts)
        ]
    else:
        mask_leaves = _prune.align_masks(masks, params)
    return treedef.unflatten(
        [
            leaf if mask is None else _straight_through(jnp.asarray(leaf), mask)
            for leaf, mask in zip(leaves, mask_leaves)
        ]
    )


@contextlib.contextmanager
def srste_model(
    model: Any,
    masks: Any = None,
    *,
    n: int = 2,
    m: int = 4,
    rules: _selection.Rules | None = None,
    transposable: bool = False,
):
    """Runs an NNX model on its straight-through projected ``nnx.Param`` weights.

    Inside the ``with`` block the model's Params hold `srste_project` of
    themselves; on exit the dense values are put back. Other state (batch
    statistics, RNG counts) is updated in place as usual. Use it inside the
    loss function given to ``nnx.grad`` / ``nnx.value_and_grad``: the
    gradient reaches the dense Params straight through.

    Args:
      model: an ``nnx.Module``.
      masks: a mask tree over ``nnx.state(model, nnx.Param)`` (e.g.
        ``srste_masks(opt_state, params)``), or ``None`` for the current
        magnitude masks.
      n, m, rules, transposable: as in `srste_project`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sparse_jax
      >>> from flax import nnx
      >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
      >>> tx = optax.chain(sparse_jax.srste(), optax.sgd(0.1))
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      >>> def loss_fn(model, x):
      ...     with sparse_jax.srste_model(model) as sparse:
      ...         return jnp.mean(sparse(x) ** 2)
      >>> grads = nnx.grad(loss_fn)(model, jnp.ones((2, 8)))
      >>> _ = optimizer.update(model, grads)
      >>> with sparse_jax.srste_model(model) as sparse:
      ...     bool(sparse_jax.is_nm_sparse(sparse.kernel[...], 2, 4, axis=0))
      True
    """
    from flax import nnx

    dense = nnx.state(model, nnx.Param)
    nnx.update(
        model,
        srste_project(dense, masks, n=n, m=m, rules=rules, transposable=transposable),
    )
    try:
        yield model
    finally:
        nnx.update(model, dense)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["count", "packed_masks", "flip_fraction"],
    meta_fields=["n", "m", "layouts", "update_every", "start_step"],
)
@dataclasses.dataclass(frozen=True)
class SrsteState:
    """State of `srste`.

    Attributes:
      count: steps done (int32).
      packed_masks: per params leaf (``jax.tree.leaves`` order), the mask in
        effect at the last step (at ``init``: the params' magnitude mask),
        bit-packed as in `sparse_jax.masked`; ``None`` for a skipped leaf.
      flip_fraction: the fraction of mask entries (over all pruned leaves)
        that changed at the last step; 0 before the first.
      n, m, layouts, update_every, start_step: the static configuration.
    """

    count: jax.Array
    packed_masks: tuple[jax.Array | None, ...]
    flip_fraction: jax.Array
    n: int
    m: int
    layouts: tuple[MaskLayout, ...]
    update_every: int
    start_step: int


def _unpack(state: SrsteState, params: Any) -> list[jax.Array | None]:
    return [
        None if packed is None else _packing.unpack_bits(packed, jnp.shape(leaf))
        for packed, leaf in zip(state.packed_masks, jax.tree.leaves(params))
    ]


def _check_leaves(state: SrsteState, params: Any, what: str) -> list[Any]:
    leaves = jax.tree.leaves(params)
    if len(leaves) != len(state.layouts):
        raise ValueError(
            f"sparse_jax.srste was initialised for {len(state.layouts)} leaves but got "
            f"{len(leaves)} {what} leaves"
        )
    return leaves


def _masks_in_effect(state: SrsteState, params: Any) -> list[jax.Array | None]:
    """Per leaf, the mask of the step about to run (refreshed or kept)."""
    leaves = _check_leaves(state, params, "params")
    stored = _unpack(state, params)
    sparse = state.count >= state.start_step
    refresh = sparse & ((state.count - state.start_step) % state.update_every == 0)
    out = []
    for leaf, layout, old in zip(leaves, state.layouts, stored):
        if layout is None:
            out.append(None)
            continue
        leaf = jnp.asarray(leaf)
        fresh = jax.lax.cond(
            refresh, lambda w: _mask_for(w, layout, state.n, state.m), lambda w: old, leaf
        )
        out.append(jnp.where(sparse, fresh, jnp.ones_like(fresh)))
    return out


def _flipped(old: list, new: list) -> jax.Array:
    changed = sum(jnp.sum(a != b, dtype=jnp.int32) for a, b in zip(old, new) if a is not None)
    total = sum(a.size for a in old if a is not None)
    return jnp.asarray(changed, jnp.float32) / max(total, 1)


def srste(
    n: int = 2,
    m: int = 4,
    rules: _selection.Rules | None = None,
    *,
    decay: float = 2e-4,
    update_every: int = 1,
    start_step: int = 0,
    transposable: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SR-STE's sparse-refined decay, and the masks it trains with, as an optax transformation.

    Each ``update(grads, state, params)`` takes the mask in effect for this
    step (`srste_masks`: the params' current magnitude mask at a refresh
    step, the previous step's mask otherwise), adds ``decay * (1 - mask) *
    params`` to the incoming gradient (pruned entries only; the gradient of
    kept entries and of skipped leaves is unchanged), and records the mask and
    the fraction of its entries that flipped since the last step.

    Place it before the optimizer: ``optax.chain(srste(), optax.sgd(lr,
    momentum=0.9))``, as the paper adds the term to the gradient (the
    learning rate then scales it). The forward pass must use the same mask:
    ``srste_project(params, srste_masks(opt_state, params))`` (or
    ``srste_project(params)`` when ``update_every=1`` and ``start_step=0``,
    which computes the same masks).

    Args:
      n, m, rules: the pattern and the selection rules (`sparse_jax.plan_tree`).
      decay: the sparse-refined decay ``lambda_W``; the paper's 2e-4 by default.
      update_every: refresh the mask from the weights' magnitudes every this
        many steps (1: every step, as in the paper); in between the mask is
        kept, and the forward pass should project with `srste_masks`.
      start_step: train dense (all-True masks, no decay) before this step;
        the first sparse step then reports the fraction pruned as flipped.
      transposable: masks N:M along both axes of every m x m block
        (`sparse_jax.transposable_nm_mask`) where the leaf has an (in, out)
        pair m divides; the ordinary N:M mask elsewhere.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``params``; its state is a `SrsteState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sparse_jax
      >>> params = {"kernel": jnp.array([[4.0], [-3.0], [0.5], [1.0]])}
      >>> tx = optax.chain(sparse_jax.srste(decay=0.1), optax.sgd(1.0))
      >>> state = tx.init(params)
      >>> grads = {"kernel": jnp.zeros((4, 1))}
      >>> updates, state = tx.update(grads, state, params)
      >>> (-updates["kernel"]).ravel().tolist()  # lr * 0.1 * w on the pruned two
      [0.0, 0.0, 0.05000000074505806, 0.10000000149011612]
    """
    if not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"srste: update_every must be a positive int, got {update_every!r}")
    if not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"srste: start_step must be a non-negative int, got {start_step!r}")
    _patterns.check_nm_args((m,), n, m, 0, where="srste: ")

    def init_fn(params):
        if params is None:
            raise ValueError("sparse_jax.srste: init needs the params tree")
        layouts = _layouts(params, n, m, rules, transposable)
        def first_mask(leaf, layout):
            if start_step > 0:  # dense until then: the "last" mask keeps everything
                return jnp.ones(jnp.shape(leaf), jnp.bool_)
            return _mask_for(jnp.asarray(leaf), layout, int(n), int(m))

        packed = tuple(
            None if layout is None else _packing.pack_bits(first_mask(leaf, layout))
            for leaf, layout in zip(jax.tree.leaves(params), layouts)
        )
        return SrsteState(
            count=jnp.zeros([], jnp.int32),
            packed_masks=packed,
            flip_fraction=jnp.zeros([], jnp.float32),
            n=int(n),
            m=int(m),
            layouts=layouts,
            update_every=update_every,
            start_step=start_step,
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "sparse_jax.srste needs the current params for its decay: call "
                "tx.update(grads, state, params)"
            )
        update_leaves, treedef = jax.tree.flatten(updates)
        _check_leaves(state, updates, "update")
        param_leaves = _check_leaves(state, params, "params")
        masks = _masks_in_effect(state, params)
        decayed = [
            u
            if mask is None
            else u + (decay * jnp.where(mask, jnp.zeros_like(p), p)).astype(jnp.result_type(u))
            for u, p, mask in zip(update_leaves, param_leaves, masks)
        ]
        new_state = dataclasses.replace(
            state,
            count=state.count + 1,
            packed_masks=tuple(None if k is None else _packing.pack_bits(k) for k in masks),
            flip_fraction=_flipped(_unpack(state, params), masks),
        )
        return treedef.unflatten(decayed), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_state(opt_state: Any) -> SrsteState:
    return _opt_state.find_state(opt_state, SrsteState, "srste")


def srste_masks(opt_state: Any, params: Any) -> Any:
    """The mask tree the next step uses: what its forward pass should project with.

    At a refresh step (every ``update_every`` steps from ``start_step``) it is
    the params' current magnitude mask, otherwise the last step's; all True
    before ``start_step``. After training it is the final mask, for
    `sparse_jax.masked`, `sparse_jax.compress` or export like any mask from
    `sparse_jax.prune`.

    Args:
      opt_state: an optimizer state holding a `SrsteState` (inside
        ``optax.chain`` and the like).
      params: the current params.

    Returns:
      The mask tree (bool arrays, ``None`` where not pruned).
    """
    state = _find_state(opt_state)
    treedef = jax.tree.structure(params)
    return treedef.unflatten(_masks_in_effect(state, params))


def srste_flip_fraction(opt_state: Any) -> jax.Array:
    """Fraction of mask entries (over all pruned leaves) that flipped at the last step."""
    return _find_state(opt_state).flip_fraction


def mask_flip_fraction(old_masks: Any, new_masks: Any) -> jax.Array:
    """Fraction of entries that differ between two mask trees (``None`` leaves ignored).

    Example:
      >>> import jax.numpy as jnp, sparse_jax
      >>> old = {"k": jnp.array([True, False, True, False]), "b": None}
      >>> new = {"k": jnp.array([True, True, False, False]), "b": None}
      >>> float(sparse_jax.mask_flip_fraction(old, new))
      0.5
    """
    old = jax.tree.leaves(old_masks, is_leaf=lambda x: x is None)
    new = jax.tree.leaves(new_masks, is_leaf=lambda x: x is None)
    if len(old) != len(new):
        raise ValueError(
            f"mask_flip_fraction: the trees have {len(old)} and {len(new)} entries"
        )
    for a, b in zip(old, new):
        if (a is None) != (b is None) or (a is not None and jnp.shape(a) != jnp.shape(b)):
            raise ValueError(
                "mask_flip_fraction: the trees differ in which leaves are masked or in "
                f"shapes ({None if a is None else jnp.shape(a)} vs "
                f"{None if b is None else jnp.shape(b)})"
            )
    return _flipped(
        [None if a is None else jnp.asarray(a) for a in old],
        [None if b is None else jnp.asarray(b) for b in new],
    )


def srste_finalize(params: Any, opt_state: Any) -> tuple[Any, Any]:
    """The trained sparse params and their masks, as `sparse_jax.prune` returns them.

    Args:
      params: the dense params SR-STE trained.
      opt_state: the optimizer state holding the `SrsteState`.

    Returns:
      ``(pruned_params, masks)``: the params times `srste_masks` (exactly N:M;
      pruned entries 0) and that mask tree, ready for `sparse_jax.masked`
      fine-tuning, `sparse_jax.compress` or export.
    """
    masks = srste_masks(opt_state, params)
    return _prune.apply_masks(params, masks), masks
