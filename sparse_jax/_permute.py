"""Channel permutations that let an N:M mask keep more magnitude (Pool & Yu, NeurIPS 2021).

Permuting the input channels of a layer (and the output channels of the layers
that produce them, their biases, norm parameters and batch statistics: one
`sparse_jax.ChannelGroup`) leaves the network's function unchanged but changes
which weights share an m-group. `search_permutations` looks, per group, for a
permutation that raises the magnitude an n:m mask keeps in every kernel pruned
along that channel axis (the group's *consumers*); `apply_permutations` applies
it to the variables.

The search
----------
Channels are cut into stripes of ``m`` consecutive positions (one m-group per
stripe in every consumer column). For a pair of stripes, every way of sharing
their ``2m`` channels between the two (``C(2m, m) / 2``: 35 for m=4) is scored
exactly, and the best one is kept when it beats the current one. A round pairs
all stripes at random (disjoint pairs, so their gains add) and updates every
pair at once, vectorised with NumPy; rounds repeat until ``patience`` rounds in
a row gain nothing or the group's time budget is spent. This is ASP's stripe
recombination bounded in time (ASP's exhaustive search over all stripe pairs is
quadratic in the stripes). The search starts from the identity and accepts only
improvements, so a group's kept magnitude never goes down; a final check in
float64 returns the identity for a group whose result would not be higher.
The result depends only on ``seed`` unless ``time_limit`` cuts a group's search
short (then on the machine's speed too).

For the channels of a grouped convolution's groups (`ChannelGroup.copies` > 1),
one order is searched for the per-group channels, scored over every group's
copy, and applied to each copy.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sparse_jax._coupling import ChannelCoupling
from sparse_jax._selection import plan_tree


@dataclasses.dataclass(frozen=True)
class GroupSearch:
    """What the search did for one permutable group (index into ``coupling.groups``)."""

    group: int
    size: int
    consumers: tuple[str, ...]
    kept_before: float
    kept_after: float
    rounds: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class PermutationSearch:
    """`search_permutations`'s result: ``perms[g]`` is the new order of group ``g``'s channels
    (position ``i`` takes old channel ``perms[g][i]``)."""

    perms: dict[int, np.ndarray]
    groups: tuple[GroupSearch, ...]
    skipped: tuple[tuple[int, str], ...]  # (group, why no search ran)

    @property
    def kept_before(self) -> float:
        return sum(g.kept_before for g in self.groups)

    @property
    def kept_after(self) -> float:
        return sum(g.kept_after for g in self.groups)

    def __str__(self) -> str:
        gain = self.kept_after / self.kept_before - 1 if self.kept_before else 0.0
        seconds = sum(g.seconds for g in self.groups)
        return (f"{len(self.groups)} groups searched, {len(self.skipped)} skipped; kept magnitude "
                f"{self.kept_before:.6g} -> {self.kept_after:.6g} ({gain:+.2%}) in {seconds:.1f} s")


def _splits(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Every way to share 2m slots between two stripes, each once: (splits, m) index arrays."""
    slots = range(2 * m)
    first = [c for c in itertools.combinations(slots, m) if 0 in c]  # slot 0 fixes the order
    second = [tuple(s for s in slots if s not in c) for c in first]
    return np.array(first), np.array(second)


def _topn_sum(values: np.ndarray, n: int) -> np.ndarray:
    """Sum of the n largest along axis -2 (the m channels of a stripe)."""
    if n == 1:
        return values.max(axis=-2)
    if (n, values.shape[-2]) == (2, 4):  # 2:4 without a sort
        a, b, c, d = (values[..., i, :] for i in range(4))
        hi1, lo1, hi2, lo2 = np.maximum(a, b), np.minimum(a, b), np.maximum(c, d), np.minimum(c, d)
        return np.maximum(hi1, hi2) + np.maximum(np.minimum(hi1, hi2), np.maximum(lo1, lo2))
    m = values.shape[-2]
    return np.partition(values, m - n, axis=-2)[..., m - n:, :].sum(axis=-2)


def _kept(matrix: np.ndarray, order: np.ndarray, n: int, m: int) -> float:
    rows = matrix[order].astype(np.float64)
    return float(_topn_sum(rows.reshape(-1, m, rows.shape[1]), n).sum())


def _search_group(matrix: np.ndarray, n: int, m: int, rng: np.random.Generator,
                  time_limit: float, patience: int, max_rounds: int):
    """Best order found for the rows of ``matrix`` (channels x consumer columns, |w|)."""
    channels = matrix.shape[0]
    stripes = channels // m
    order = np.arange(channels)
    first, second = _splits(m)
    start = time.perf_counter()
    rounds = idle = 0
    # Pairs per chunk so that a chunk's (pairs, splits, m, columns) block stays ~64 MB.
    chunk = max(1, int(16e6 // (len(first) * m * matrix.shape[1])))
    while stripes >= 2 and rounds < max_rounds and idle < patience:
        if time.perf_counter() - start > time_limit:
            break
        rounds += 1
        shuffled = rng.permutation(stripes)
        pairs = shuffled[: stripes // 2 * 2].reshape(-1, 2)
        slots = order.reshape(stripes, m)[pairs].reshape(len(pairs), 2 * m)  # channel ids
        gained = 0.0
        for lo in range(0, len(pairs), chunk):
            if lo and time.perf_counter() - start > time_limit:  # a big group: part of a round
                break
            ids = slots[lo:lo + chunk]
            rows = matrix[ids]  # (P, 2m, R)
            score = _topn_sum(rows[:, first], n).sum(-1) + _topn_sum(rows[:, second], n).sum(-1)
            best = score.argmax(axis=1)  # (P,)
            gain = score[np.arange(len(ids)), best] - score[:, 0]  # split 0 = the current one
            better = gain > 1e-6 * np.maximum(score[:, 0], 1e-30)
            for p in np.nonzero(better)[0]:
                new = np.concatenate([ids[p, first[best[p]]], ids[p, second[best[p]]]])
                a, b = pairs[lo + p]
                order[a * m:(a + 1) * m], order[b * m:(b + 1) * m] = new[:m], new[m:]
            gained += float(gain[better].sum())
        idle = 0 if gained > 0 else idle + 1
    return order, rounds, time.perf_counter() - start


def search_permutations(
    variables: Any,
    coupling: ChannelCoupling,
    n: int = 2,
    m: int = 4,
    rules: Any = None,
    *,
    time_limit: float = 2.0,
    patience: int = 8,
    max_rounds: int = 1000,
    seed: int = 0,
) -> PermutationSearch:
    """Per permutable group, a channel order that raises the kept n:m magnitude of its consumers.

    Args:
      variables: the tree `sparse_jax.channel_groups` was given (params and batch statistics).
      coupling: its result.
      n, m: the pattern.
      rules: selection rules, as for `sparse_jax.prune`: they decide which leaves are pruned and
        along which axis (a group member pruned along its group axis is a consumer; the others,
        producers' output axes, norms, biases, keep their kept magnitude whatever the order).
      time_limit: seconds of search per group at most.
      patience: rounds in a row without a gain that end a group's search.
      max_rounds: rounds per group at most.
      seed: the stripe pairings are drawn from ``numpy.random.default_rng(seed)``.

    Returns:
      A `PermutationSearch`; groups without consumers (or whose size m does not divide) are
      listed in ``skipped``.

    Example (the hidden channel of an MLP; the kept magnitude never goes down):
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> p = {"w1": jax.random.normal(k1, (8, 16)), "w2": jax.random.normal(k2, (16, 8))}
      >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
      >>> coupling = sparse_jax.channel_groups(fn, p, jnp.ones((2, 8)))
      >>> result = sparse_jax.search_permutations(p, coupling)
      >>> result.groups[0].consumers, result.kept_after >= result.kept_before
      (('w2',), True)
      >>> permuted = sparse_jax.apply_permutations(p, coupling, result)
      >>> x = jnp.ones((2, 8))
      >>> bool(jnp.allclose(fn(permuted, x), fn(p, x), atol=1e-5))
      True
    """
    leaves = jax.tree.leaves(variables)
    if len(leaves) != len(coupling.paths):
        raise ValueError(f"variables have {len(leaves)} leaves, the coupling was found for "
                         f"{len(coupling.paths)}: pass the tree given to channel_groups")
    plans = plan_tree(variables, n, m, rules)
    rng = np.random.default_rng(seed)
    perms, done, skipped = {}, [], []
    for g, group in enumerate(coupling.groups):
        if not group.permutable:
            continue
        if group.size % m:
            skipped.append((g, f"{group.size} channels, not a multiple of m={m}"))
            continue
        columns, consumers = [], []
        for k, (leaf_index, (path, axis)) in enumerate(zip(group.leaves, group.members)):
            if plans[leaf_index].axis is None or plans[leaf_index].axis != axis:
                continue
            w = np.abs(np.asarray(leaves[leaf_index], dtype=np.float32))
            copies = group.copies[k] if group.copies else 1
            w = np.moveaxis(w, axis, 0).reshape(copies, group.size, -1)  # a copy per conv group
            columns.append(np.moveaxis(w, 1, 0).reshape(group.size, -1))
            consumers.append(path)
        if not columns:
            skipped.append((g, "no member is pruned along this axis"))
            continue
        matrix = np.concatenate(columns, axis=1)
        order, rounds, seconds = _search_group(matrix, n, m, rng, time_limit, patience,
                                               max_rounds)
        identity = np.arange(group.size)
        before, after = _kept(matrix, identity, n, m), _kept(matrix, order, n, m)
        if after <= before:
            order, after = identity, before
        perms[g] = order
        done.append(GroupSearch(g, group.size, tuple(consumers), before, after, rounds, seconds))
    return PermutationSearch(perms, tuple(done), tuple(skipped))


def _take(leaf: Any, order: np.ndarray, axis: int) -> Any:
    """``take`` along ``axis``, on the host for concrete arrays (an eager ``jnp.take`` compiles
    once per shape: seconds for a whole model), placed back where the leaf was."""
    try:
        host = np.asarray(leaf)
    except TypeError:  # a tracer (under jit): TracerArrayConversionError
        return jax.numpy.take(leaf, order, axis=axis)
    taken = np.take(host, order, axis=axis)
    if isinstance(leaf, jax.Array):
        return jax.device_put(taken, leaf.sharding)
    return taken


def apply_permutations(variables: Any, coupling: ChannelCoupling,
                       perms: PermutationSearch | dict[int, Sequence[int]]) -> Any:
    """``variables`` with every member axis of group ``g`` reordered by ``perms[g]``.

    Position ``i`` of each permuted axis takes old channel ``perms[g][i]``. When the
    coupling was found from the same computation, the permuted variables compute the same
    function (up to float rounding of reordered sums). See `search_permutations`.
    """
    if isinstance(perms, PermutationSearch):
        perms = perms.perms
    leaves, tree = jax.tree.flatten(variables)
    if len(leaves) != len(coupling.paths):
        raise ValueError(f"variables have {len(leaves)} leaves, the coupling was found for "
                         f"{len(coupling.paths)}: pass the tree given to channel_groups")
    leaves = list(leaves)
    for g, order in perms.items():
        group = coupling.groups[g]
        if not group.permutable:
            raise ValueError(f"group {g} ({', '.join(p for p, _ in group.members)}) may not be "
                             f"permuted: {group.reason}")
        order = np.asarray(order)
        if sorted(order.tolist()) != list(range(group.size)):
            raise ValueError(f"perms[{g}] is not a permutation of {group.size} channels")
        for k, (leaf_index, (path, axis)) in enumerate(zip(group.leaves, group.members)):
            leaf = leaves[leaf_index]
            axis_order = group.axis_order(k, order)
            if leaf.shape[axis] != len(axis_order):
                raise ValueError(f"{path}: shape {tuple(leaf.shape)}, expected {len(axis_order)} "
                                 f"channels along axis {axis}")
            leaves[leaf_index] = _take(leaf, axis_order, axis)
    return jax.tree.unflatten(tree, leaves)


__all__ = ["GroupSearch", "PermutationSearch", "apply_permutations", "search_permutations"]
