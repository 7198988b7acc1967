"""Tree-level pruning: one-shot N:M masks, applying them, checking and reporting.

A *mask tree* has the structure of the parameter tree, with a bool array for
each pruned leaf and ``None`` for each skipped one. It works alike for plain
dicts, Flax Linen ``params`` and ``nnx.State`` (where the ``None`` sits inside
the ``nnx.Param``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import _paths, _patterns, _selection, _transposable


def _where_str(path: str, shape: tuple[int, ...]) -> str:
    return f"{path or '<root>'} {tuple(shape)}: "


def align_masks(masks: Any, params: Any) -> list[jax.Array | None]:
    """Flattens ``masks`` in the leaf order of ``params``, validating it.

    Raises:
      ValueError: if the trees' leaves differ in number, names or shapes.
      TypeError: if a mask is not boolean or masks a non-float parameter.
    """
    param_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    mask_leaves = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_paths.is_none)[0]
    param_paths = [_paths.path_to_str(p) for p, _ in param_leaves]
    mask_paths = [_paths.path_to_str(p) for p, _ in mask_leaves]
    if param_paths != mask_paths:
        missing = sorted(set(param_paths) - set(mask_paths))
        extra = sorted(set(mask_paths) - set(param_paths))
        detail = []
        if missing:
            detail.append(f"params leaves with no mask entry: {missing[:5]}")
        if extra:
            detail.append(f"mask entries with no params leaf: {extra[:5]}")
        if not detail:
            detail.append("same leaf names in a different order")
        raise ValueError(
            "the mask tree does not have the structure of the params "
            f"({len(mask_paths)} mask entries for {len(param_paths)} params leaves; "
            + "; ".join(detail)
            + "). Build masks with sparse_jax.prune(params) or "
            "jax.tree.map over the same params tree; use None for skipped leaves."
        )
    aligned = []
    for (path, param), (_, mask) in zip(param_leaves, mask_leaves):
        if mask is None:
            aligned.append(None)
            continue
        name = _paths.path_to_str(path)
        where = _where_str(name, np.shape(param))
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"{where}mask must be a bool array, got dtype {mask.dtype}")
        if mask.shape != np.shape(param):
            raise ValueError(
                f"{where}mask has shape {mask.shape}, expected the parameter's shape "
                f"{tuple(np.shape(param))}"
            )
        if not jnp.issubdtype(jnp.result_type(param), jnp.floating):
            raise TypeError(
                f"{where}cannot prune a {jnp.result_type(param)} parameter; only "
                "floating-point parameters can carry a mask"
            )
        aligned.append(mask)
    return aligned


@functools.partial(jax.jit, static_argnames=("n", "m", "axes", "pairs"))
def _prune_leaves(leaves, *, n: int, m: int, axes: tuple[int, ...], pairs: tuple | None = None):
    pairs = pairs or (None,) * len(axes)
    masks = [
        _patterns._nm_mask(x, n=n, m=m, axis=a)
        if pair is None
        else _transposable._transposable_mask(
            x, n=n, m=m, axes=pair, method="exact" if m <= _transposable._EXACT_MAX_M else "greedy"
        )
        for x, a, pair in zip(leaves, axes, pairs)
    ]
    pruned = [jnp.where(k, x, jnp.zeros_like(x)) for x, k in zip(leaves, masks)]
    return pruned, masks


def prune(
    params: Any,
    n: int = 2,
    m: int = 4,
    rules: _selection.Rules | None = None,
    *,
    asp_size_rule: bool = False,
    transposable: bool = False,
) -> tuple[Any, Any]:
    """One-shot magnitude pruning of a parameter tree to N:M.

    Each selected leaf keeps the ``n`` largest magnitudes of every contiguous
    group of ``m`` along its reduction axis (see `sparse_jax.plan_tree` for the
    rules); all others are returned unchanged.

    Args:
      params: a pytree of arrays (plain dict, Flax Linen ``params``, ``nnx.State``).
      n: kept entries per group.
      m: group size.
      rules: ``(regex, action)`` overrides matched on leaf paths; an action is
        ``"skip"``, an ``int`` axis, or ``"default"``.
      asp_size_rule: also skip layers with in % 16 or out % 8 (as ASP does).
      transposable: give leaves with an (in, out) pair that ``m`` divides
        (Dense, Conv ``(..., in, out)``, stacked) a mask that is N:M along
        both, `sparse_jax.transposable_nm_mask`, so ``dY @ W.T`` can be
        sparse too; other pruned leaves get the ordinary N:M mask.

    Returns:
      ``(pruned_params, masks)``: the params with pruned entries set to 0, and a
      mask tree of the params' structure (bool arrays, ``None`` where skipped).

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 4)),
      ...                     "bias": jnp.zeros(4)}}
      >>> pruned, masks = sparse_jax.prune(params)
      >>> masks["dense"]["bias"] is None
      True
      >>> bool(sparse_jax.is_nm_sparse(pruned["dense"]["kernel"], 2, 4, axis=0))
      True
    """
    plans = _selection.plan_tree(params, n, m, rules, asp_size_rule=asp_size_rule)
    leaves, treedef = jax.tree.flatten(params)
    chosen = [i for i, plan in enumerate(plans) if plan.pruned]
    pruned_leaves, mask_leaves = _prune_leaves(
        [jnp.asarray(leaves[i]) for i in chosen],
        n=int(n),
        m=int(m),
        axes=tuple(plans[i].axis for i in chosen),
        pairs=tuple(
            _transposable.block_axes_for(plans[i].shape, plans[i].axis, plans[i].stacked_axes, m)
            for i in chosen
        )
        if transposable
        else None,
    )
    new_leaves = list(leaves)
    all_masks: list[jax.Array | None] = [None] * len(leaves)
    for i, pruned, mask in zip(chosen, pruned_leaves, mask_leaves):
        new_leaves[i] = pruned
        all_masks[i] = mask
    return treedef.unflatten(new_leaves), treedef.unflatten(all_masks)


def apply_masks(params: Any, masks: Any) -> Any:
    """Zeroes the entries of ``params`` that ``masks`` drops (``None``: keep all)."""
    aligned = align_masks(masks, params)
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(
        [x if k is None else jnp.where(k, x, jnp.zeros_like(x)) for x, k in zip(leaves, aligned)]
    )


def _nm_axes(shape: tuple[int, ...], n: int, m: int, array: jax.Array) -> list[int]:
    return [
        axis
        for axis in range(len(shape))
        if shape[axis] % m == 0 and bool(_patterns.is_nm_sparse(array, n, m, axis))
    ]


def _group_counts(mask: Any, m: int, axis: int) -> np.ndarray:
    """Kept entries of each contiguous group of ``m`` along ``axis`` (flat)."""
    moved = np.moveaxis(np.asarray(mask, dtype=bool), axis, -1)
    return moved.reshape(-1, m).sum(axis=-1)


def _bad_groups(mask: Any, n: int, m: int, axis: int, allow_fewer: bool) -> np.ndarray:
    counts = _group_counts(mask, m, axis)
    return counts[counts > n] if allow_fewer else counts[counts != n]


def check_masks(
    params: Any,
    masks: Any,
    n: int = 2,
    m: int = 4,
    rules: _selection.Rules | None = None,
    *,
    allow_fewer: bool = False,
) -> None:
    """Raises unless every mask keeps exactly ``n`` of each group of ``m`` on its axis.

    The axis comes from the rules (`sparse_jax.plan_tree`; stacked layer axes
    need nothing special, since groups run along one axis); for a mask on a
    leaf the rules would skip, any axis on which it passes is accepted. An
    all-False mask (a scoring function gone wrong) fails.

    Args:
      params: the parameter tree.
      masks: its mask tree (bool arrays, ``None`` where not pruned).
      n, m: the pattern.
      rules: the rules used to prune (to recover each leaf's axis).
      allow_fewer: accept groups keeping fewer than ``n`` (only more than ``n``
        fails), as for a weight that is pruned and exactly zero anyway.

    Raises:
      ValueError: naming the leaf path, shape, axis, the number of bad groups
        of ``m`` and the counts they keep.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}
      >>> _, masks = sparse_jax.prune(params)
      >>> sparse_jax.check_masks(params, masks)  # passes silently
      >>> sparse_jax.check_masks(params, {"kernel": jnp.zeros((8, 4), bool)})
      Traceback (most recent call last):
      ...
      ValueError: kernel (8, 4): mask is not 2:4 along axis 0: 8 of 8 groups of 4 keep other than exactly 2 (they keep 0)
    """
    aligned = align_masks(masks, params)
    plans = _selection.plan_tree(params, n, m, rules)
    rule = "more than" if allow_fewer else "other than exactly"
    for plan, mask in zip(plans, aligned):
        if mask is None:
            continue
        where = _where_str(plan.path, plan.shape)
        if plan.axis is None:
            passing = [
                axis
                for axis in range(len(plan.shape))
                if plan.shape[axis] % m == 0
                and not _bad_groups(mask, n, m, axis, allow_fewer).size
            ]
            if not passing:
                raise ValueError(
                    f"{where}mask is not {n}:{m} along any axis (no axis where every group of "
                    f"{m} keeps {'at most' if allow_fewer else 'exactly'} {n}; the rules skip "
                    f"this leaf: {plan.reason})"
                )
            continue
        if plan.shape[plan.axis] % m:
            raise ValueError(
                f"{where}axis {plan.axis} has size {plan.shape[plan.axis]}, not a multiple of {m}"
            )
        bad = _bad_groups(mask, n, m, plan.axis, allow_fewer)
        if bad.size:
            groups = math.prod(plan.shape) // m
            kept = ", ".join(str(int(c)) for c in np.unique(bad))
            raise ValueError(
                f"{where}mask is not {n}:{m} along axis {plan.axis}: {bad.size} of "
                f"{groups} groups of {m} keep {rule} {n} (they keep {kept})"
            )


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One leaf of a `SparsityReport`."""

    path: str
    shape: tuple[int, ...]
    axis: int | None
    pruned: bool
    reason: str
    size: int
    nonzero: int
    nm_ok: bool | None  # is the parameter itself N:M on `axis`? None if skipped
    stacked_axes: tuple[int, ...] = ()  # layer axes: every slice along them is one layer
    source: str = "default"  # where the axis came from (see `LeafPlan.source`)

    @property
    def density(self) -> float:
        return self.nonzero / self.size if self.size else 1.0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Per-leaf sparsity of a parameter tree; ``print(report)`` gives a table."""

    rows: tuple[ReportRow, ...]
    n: int
    m: int

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.rows)

    @property
    def pruned_size(self) -> int:
        return sum(r.size for r in self.rows if r.pruned)

    @property
    def density(self) -> float:
        """Non-zeros over all parameters."""
        return sum(r.nonzero for r in self.rows) / max(self.total_size, 1)

    @property
    def all_nm(self) -> bool:
        """Whether every pruned leaf is N:M on its axis."""
        return all(r.nm_ok for r in self.rows if r.pruned)

    def __str__(self) -> str:
        header = (
            "path", "shape", "axis", "stacked", "status", "density", f"{self.n}:{self.m}",
            "from", "why",
        )
        body = [
            (
                r.path,
                "x".join(map(str, r.shape)) or "()",
                "-" if r.axis is None else str(r.axis),
                ",".join(map(str, r.stacked_axes)) or "-",
                "pruned" if r.pruned else "skipped",
                f"{r.density:.3f}",
                "-" if r.nm_ok is None else ("yes" if r.nm_ok else "NO"),
                r.source,
                r.reason,
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"pruned {self.pruned_size:,} of {self.total_size:,} parameters "
            f"({self.pruned_size / max(self.total_size, 1):.1%}); overall density "
            f"{self.density:.3f}; every pruned leaf {self.n}:{self.m}: "
            f"{'yes' if self.all_nm else 'NO'}"
        )
        return "\n".join(lines)


def sparsity_report(
    params: Any,
    masks: Any = None,
    n: int = 2,
    m: int = 4,
    rules: _selection.Rules | None = None,
    *,
    print_table: bool = False,
) -> SparsityReport:
    """Reports, per leaf: path, shape, axis, pruned or skipped and why, density.

    Args:
      params: the parameter tree (after pruning/training).
      masks: the mask tree in use; ``None`` reports what the rules would do.
      n, m: the pattern.
      rules: the rules used to prune (to recover each leaf's axis).
      print_table: also print the table.

    Returns:
      A `SparsityReport`; ``print(report)`` shows the table.
    """
    plans = _selection.plan_tree(params, n, m, rules)
    aligned = align_masks(masks, params) if masks is not None else [None] * len(plans)
    leaves = jax.tree.leaves(params)
    rows = []
    for plan, leaf, mask in zip(plans, leaves, aligned):
        array = jnp.asarray(leaf)
        pruned = plan.pruned if masks is None else mask is not None
        axis, reason = plan.axis, plan.reason
        if pruned and axis is None:  # a user mask on a leaf the rules skip
            found = _nm_axes(plan.shape, n, m, array)
            axis = found[0] if found else None
            reason = "pruned by the given mask"
        elif not pruned and plan.pruned:
            axis, reason = None, "no mask given for it"
        nm_ok = None
        if pruned:
            nm_ok = axis is not None and bool(_patterns.is_nm_sparse(array, n, m, axis))
        rows.append(
            ReportRow(
                path=plan.path,
                shape=plan.shape,
                axis=axis,
                pruned=pruned,
                reason=reason,
                size=int(array.size),
                nonzero=int(jnp.count_nonzero(array)),
                nm_ok=nm_ok,
                stacked_axes=plan.stacked_axes,
                source=plan.source if masks is None or plan.pruned == pruned else "mask",
            )
        )
    report = SparsityReport(rows=tuple(rows), n=int(n), m=int(m))
    if print_table:
        print(report)
    return report
