"""Flax NNX layers on the compressed 2:4 format.

* `SparseLinear`: ``nnx.Linear`` with a `sparse_jax.Sparse24` kernel.
* `sparsify` / `densify`: swap a pruned model's ``Linear`` layers to
  `SparseLinear` and back.
* `rules_from_model`: selection rules (reduction and stacked axes) read from
  a model's computation (`sparse_jax.rules_from_computation` for NNX).
"""

from sparse_jax.nn._convert import densify, sparsify
from sparse_jax.nn._rules import rules_from_model
from sparse_jax.nn._sparse_linear import SparseLinear, SparseMeta

__all__ = ["SparseLinear", "SparseMeta", "densify", "rules_from_model", "sparsify"]
