"""`rules_from_model`: `sparse_jax.rules_from_computation` for a Flax NNX module."""

from __future__ import annotations

from typing import Any

from flax import nnx

from sparse_jax import _trace


def rules_from_model(model: nnx.Module, *args: Any, **kwargs: Any):
    """Selection rules read from the computation ``model(*args, **kwargs)``.

    Splits ``model`` into its ``nnx.Param`` state and the rest, and traces the
    call once with `sparse_jax.rules_from_computation` (nothing runs; the
    model is not changed). The rules name the leaves of
    ``nnx.state(model, nnx.Param)``, so they apply to
    ``sparse_jax.prune(nnx.state(model, nnx.Param), rules=rules)`` and to
    `sparse_jax.plan_tree`, `sparse_jax.masked`, `sparse_jax.check_masks` and
    `sparse_jax.sparsity_report` on that state.

    Args:
      model: an NNX module.
      *args, **kwargs: example inputs of ``model(...)``, as arrays (or
        ``jax.ShapeDtypeStruct``); other values are passed as static.

    Returns:
      ``(regex, sparse_jax.Layout(..., source="computation"))`` rules.

    Example:
      >>> import jax.numpy as jnp, sparse_jax
      >>> from flax import nnx
      >>> model = nnx.Einsum("...F,NHF->...NH", (2, 8, 16), rngs=nnx.Rngs(0))
      >>> rules = sparse_jax.nn.rules_from_model(model, jnp.ones((3, 16)))
      >>> params = nnx.state(model, nnx.Param)
      >>> [(p.path, p.axis) for p in sparse_jax.plan_tree(params, rules=rules)]
      [('kernel', 2)]
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    # The rest of the state (batch statistics, RNG state) is traced too, so that an
    # abstract model (``nnx.eval_shape``) works; it is not followed.
    def call(params_state: Any, rest_state: Any, *call_args: Any, **call_kwargs: Any) -> Any:
        return nnx.merge(graphdef, params_state, rest_state, copy=True)(*call_args, **call_kwargs)

    return _trace._rules(call, params, (rest,), args, kwargs, stacklevel=3)
