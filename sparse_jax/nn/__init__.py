"""Flax NNX layers on the compressed 2:4 format.

* `SparseLinear`, `SparseLinearGeneral`, `SparseEinsum`, `SparseConv`: the
  compressed forms of ``nnx.Linear``, ``nnx.LinearGeneral`` (attention
  projections), ``nnx.Einsum`` and ``nnx.Conv``, stacked forms included.
* `sparsify` / `densify`: swap a pruned model's layers to those and back;
  `sparsify` lists what it cannot convert, with the reason, in a
  `SparsifyReport` (or a `SparsifyWarning`).
* `TransposableSparseLinear`: a trainable layer whose transposable 2:4 kernel
  runs both ``x @ W`` and ``dY @ W.T`` on compressed weights.
* `rules_from_model`: selection rules (reduction and stacked axes) read from
  a model's computation (`sparse_jax.rules_from_computation` for NNX).
* `oneshot_prune_model`: `sparse_jax.oneshot_prune` (SparseGPT, Wanda,
  magnitude from calibration batches) for an NNX model.
"""

from sparse_jax.nn._base import SparseKernelLayer, SparseMeta
from sparse_jax.nn._convert import LayerResult, SparsifyReport, SparsifyWarning, densify, sparsify
from sparse_jax.nn._layers import (
    SparseConv,
    SparseEinsum,
    SparseLinearGeneral,
    einsum_reduction_axis,
)
from sparse_jax.nn._oneshot import oneshot_prune_model
from sparse_jax.nn._rules import rules_from_model
from sparse_jax.nn._sparse_linear import SparseLinear
from sparse_jax.nn._transposable_linear import TransposableSparseLinear, TransposedLayout

__all__ = [
    "LayerResult",
    "SparseConv",
    "SparseEinsum",
    "SparseKernelLayer",
    "SparseLinear",
    "SparseLinearGeneral",
    "SparseMeta",
    "SparsifyReport",
    "SparsifyWarning",
    "TransposableSparseLinear",
    "TransposedLayout",
    "densify",
    "einsum_reduction_axis",
    "oneshot_prune_model",
    "rules_from_model",
    "sparsify",
]
