"""Finding a sparse_jax transformation's state inside any optimizer state."""

from __future__ import annotations

from typing import Any, TypeVar

import jax

State = TypeVar("State")


def find_state(opt_state: Any, state_type: type[State], name: str) -> State:
    """The first ``state_type`` in ``opt_state`` (inside ``optax.chain``,
    ``inject_hyperparams``, ``MultiSteps``, an ``nnx.Optimizer``'s state, ...).

    ``nnx.Optimizer`` keeps the state's leaves in variables; they come back unwrapped.

    Raises:
      ValueError: if there is none, naming the transformation (``name``).
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, state_type))
        if isinstance(s, state_type)
    ]
    if not found:
        raise ValueError(f"no sparse_jax.{name} state found in opt_state")
    is_variable = lambda x: hasattr(x, "get_value")  # noqa: E731
    return jax.tree.map(
        lambda x: x.get_value() if is_variable(x) else x, found[0], is_leaf=is_variable
    )
