"""`oneshot_prune_model`: `sparse_jax.oneshot_prune` for a Flax NNX module."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flax import nnx

from sparse_jax import _oneshot_model


def oneshot_prune_model(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    method: str = "sparsegpt",
    n: int = 2,
    m: int = 4,
    rules: Any = None,
    sequential: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
    keep_stats: bool = False,
    progress: bool = True,
):
    """One-shot N:M pruning of an NNX model's ``nnx.Param`` state from calibration batches.

    Splits ``model`` into its ``nnx.Param`` state and the rest and runs
    `sparse_jax.oneshot_prune` on ``model(batch)`` (the rest, e.g. batch
    statistics, is used as it is). The model is not changed: apply the
    result with ``nnx.update(model, result.params)``. The masks name the
    leaves of ``nnx.state(model, nnx.Param)``, as `sparse_jax.masked` on that
    state expects.

    Args:
      model: an NNX module, called as ``model(batch)`` (in the mode it is in:
        call ``model.eval()`` first for one with dropout).
      batches: calibration batches (arrays or pytrees of arrays).
      method, n, m, rules, sequential, block_size, damp, keep_stats, progress:
        as for `sparse_jax.oneshot_prune` (``rules`` name the paths of
        ``nnx.state(model, nnx.Param)``).

    Returns:
      A `sparse_jax.OneShotResult` ``(params, masks, report)``; ``params`` is
      an ``nnx.State`` of the model's params.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(32, 8, rngs=nnx.Rngs(1)))
      >>> batches = [jax.random.normal(jax.random.key(i), (32, 16)) for i in range(2)]
      >>> result = sparse_jax.nn.oneshot_prune_model(model, batches, method="wanda",
      ...                                            progress=False)
      >>> [row.path for row in result.report]
      ['layers/0/kernel', 'layers/2/kernel']
      >>> nnx.update(model, result.params)
      >>> bool(sparse_jax.is_nm_sparse(model.layers[2].kernel.value, 2, 4, axis=0))
      True
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def call(params_state: Any, batch: Any) -> Any:
        return nnx.merge(graphdef, params_state, rest, copy=True)(batch)

    return _oneshot_model._oneshot_prune(
        call, params, batches, method=method, n=n, m=m, rules=rules, sequential=sequential,
        block_size=block_size, damp=damp, keep_stats=keep_stats, progress=progress, stacklevel=4)
