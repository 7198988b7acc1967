"""Flax NNX layers on the compressed 2:4 format.

* `SparseLinear`: ``nnx.Linear`` with a `sparse_jax.Sparse24` kernel.
* `sparsify` / `densify`: swap a pruned model's ``Linear`` layers to
  `SparseLinear` and back.
"""

from sparse_jax.nn._convert import densify, sparsify
from sparse_jax.nn._sparse_linear import SparseLinear, SparseMeta

__all__ = ["SparseLinear", "SparseMeta", "densify", "sparsify"]
from sparse_jax.nn._transposable_linear import TransposableSparseLinear, TransposedLayout  # noqa: E402

__all__ += ["TransposableSparseLinear", "TransposedLayout"]
