"""Batch-norm recalibration: running statistics re-estimated after pruning.

After one-shot pruning, a network's batch-norm running means and variances still
describe the dense network. Running the pruned network over a few hundred training
images and replacing them by the statistics of what each norm now sees is a cheap,
standard remedy for the collapse of one-shot accuracy.

What is estimated
-----------------
The *population* statistics over all the batches given, not a momentum average:
for every norm, the mean and the (biased, as Flax's own batch statistics) variance
of its inputs over every example and position of every batch, exactly as if the
batches were concatenated. A momentum average would weigh the last batches most
and need many batches to forget the dense statistics; the population estimate
uses every batch equally and depends on nothing from before. The forward passes
run in training mode, so each norm normalises with its batch's statistics (as in
training and as PyTorch's ``torch.optim.swa_utils.update_bn`` does); the statistics
are accumulated in float64.

* NNX (`recalibrate_batch_norm`): every ``nnx.BatchNorm`` runs with momentum 0 for one
  batch at a time, so that its running statistics become that batch's; the batches are
  combined weighted by their size (the leading dim of the batch's first array: give
  batches of one image size).
* Linen (`recalibrate_batch_stats`): the inputs of every ``nn.BatchNorm`` call are read
  with ``nn.intercept_methods``, under ``jax.jit``, and their per-feature sums added up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _batch_size(batch: Any) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves or not np.shape(leaves[0]):
        raise ValueError("a batch must hold at least one array with a leading batch dim")
    return int(np.shape(leaves[0])[0])


def recalibrate_batch_norm(model: Any, batches: Iterable[Any],
                           forward: Callable[[Any, Any], Any] | None = None) -> Any:
    """Replaces the running statistics of every ``nnx.BatchNorm`` of ``model`` by their
    population values over ``batches`` (in place; returns ``model``).

    Args:
      model: an NNX module holding ``nnx.BatchNorm`` layers.
      batches: an iterable of model inputs (arrays, or pytrees whose first leaf has the batch
        dim), e.g. a few hundred training images in batches.
      forward: ``forward(model, batch)`` runs the model in *training* mode (batch statistics
        used and updated): e.g. ``lambda m, x: m(x, train=True)`` for the recipes' models;
        it may be an ``nnx.jit``-ed function. Default: ``model(batch)`` with every
        BatchNorm's ``use_running_average`` set to False for the duration.

    Returns:
      ``model``, whose BatchNorm ``mean`` / ``var`` are the mean and biased variance of each
      norm's inputs over all the batches (see the module docstring); momentum and
      ``use_running_average`` are as they were.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, sparse_jax
      >>> from flax import nnx
      >>> bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> batches = [jnp.arange(12.0).reshape(4, 3), 10 + jnp.arange(6.0).reshape(2, 3)]
      >>> bn = sparse_jax.recalibrate_batch_norm(bn, batches)
      >>> rows = np.concatenate([np.asarray(b) for b in batches])
      >>> bool(np.allclose(bn.mean[...], rows.mean(0)) and np.allclose(bn.var[...], rows.var(0)))
      True
    """
    from flax import nnx

    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    if not norms:
        raise ValueError(f"{type(model).__name__} holds no nnx.BatchNorm to recalibrate")
    saved = [(bn.momentum, bn.use_running_average) for bn in norms]
    if forward is None:
        def forward(m, batch):
            return m(batch)
    sums = [None] * len(norms)
    total = 0
    try:
        for bn in norms:  # momentum 0: after a batch, the running statistics are the batch's
            bn.momentum, bn.use_running_average = 0.0, False
        for batch in batches:
            size = _batch_size(batch)
            forward(model, batch)
            for i, bn in enumerate(norms):
                mean = np.asarray(bn.mean[...], np.float64)
                square = np.asarray(bn.var[...], np.float64) + mean**2
                part = (size * mean, size * square)
                sums[i] = part if sums[i] is None else (sums[i][0] + part[0], sums[i][1] + part[1])
            total += size
    finally:
        for bn, (momentum, use_running_average) in zip(norms, saved):
            bn.momentum, bn.use_running_average = momentum, use_running_average
    if total == 0:
        raise ValueError("batches is empty: nothing to recalibrate from")
    for bn, (sum_x, sum_x2) in zip(norms, sums):
        mean = sum_x / total
        var = np.maximum(sum_x2 / total - mean**2, 0.0)
        bn.mean[...] = jnp.asarray(mean, bn.mean[...].dtype)
        bn.var[...] = jnp.asarray(var, bn.var[...].dtype)
    return model


def recalibrate_batch_stats(forward: Callable[[Any, Any], Any], variables: Any,
                            batches: Iterable[Any]) -> Any:
    """Population ``batch_stats`` of a Linen model over ``batches``.

    Args:
      forward: ``forward(variables, batch)`` runs the model in *training* mode, e.g.
        ``lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])``; its result is
        not used. It is traced with ``jax.jit`` (once per batch shape).
      variables: the model's variables, with a ``"batch_stats"`` collection.
      batches: an iterable of model inputs.

    Returns:
      A new ``batch_stats`` tree (the structure of ``variables["batch_stats"]``) whose
      ``mean`` / ``var`` are the mean and biased variance of each ``nn.BatchNorm``'s inputs
      over all the batches. Put it back with ``{**variables, "batch_stats": new}``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, sparse_jax
      >>> model = nn.BatchNorm(use_running_average=False)
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> forward = lambda v, x: model.apply(v, x, mutable=["batch_stats"])
      >>> batches = [jnp.arange(12.0).reshape(4, 3), 10 + jnp.arange(6.0).reshape(2, 3)]
      >>> stats = sparse_jax.recalibrate_batch_stats(forward, variables, batches)
      >>> rows = np.concatenate([np.asarray(b) for b in batches])
      >>> bool(np.allclose(stats["mean"], rows.mean(0)) and np.allclose(stats["var"], rows.var(0)))
      True
    """
    import flax.linen as nn

    if "batch_stats" not in variables:
        raise ValueError(f"variables have no 'batch_stats' collection (collections: "
                         f"{sorted(variables)})")

    def moments(v, batch):
        found = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
                x = jnp.asarray(args[0], jnp.float32)
                feature_axes = {a % x.ndim for a in np.atleast_1d(module.axis)}
                reduce = tuple(a for a in range(x.ndim) if a not in feature_axes)
                count = np.prod([x.shape[a] for a in reduce])
                found[tuple(module.path)] = (jnp.sum(x, reduce), jnp.sum(x * x, reduce),
                                             jnp.float32(count))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            forward(v, batch)
        return found

    moments = jax.jit(moments)
    totals: dict = {}
    for batch in batches:
        for path, parts in moments(variables, batch).items():
            parts = tuple(np.asarray(p, np.float64) for p in parts)
            old = totals.get(path)
            totals[path] = parts if old is None else tuple(a + b for a, b in zip(old, parts))
    if not totals:
        raise ValueError("no nn.BatchNorm was called by forward (or batches is empty)")
    stats = jax.tree.map(lambda x: x, variables["batch_stats"])  # a copy to fill in
    stats = _to_dict(stats)
    for path, (sum_x, sum_x2, count) in totals.items():
        node = stats
        for name in path:
            if name not in node:
                raise ValueError(f"nn.BatchNorm at {'/'.join(path)} has no entry in batch_stats")
            node = node[name]
        mean = sum_x / count
        var = np.maximum(sum_x2 / count - mean**2, 0.0)
        shape, dtype = np.shape(node["mean"]), node["mean"].dtype
        node["mean"] = jnp.asarray(mean.reshape(shape), dtype)
        node["var"] = jnp.asarray(var.reshape(shape), dtype)
    return stats


def _to_dict(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


__all__ = ["recalibrate_batch_norm", "recalibrate_batch_stats"]
