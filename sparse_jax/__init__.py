"""sparse_jax: N:M (2:4) structured sparsity for JAX, optax and Flax."""

# --- core: patterns, selection rules, pruning, the masked transform (issue 2) ---
# (filled in by the core work)

# --- compressed format, matmul, kernels, nn layers (issue 3) ---

__version__ = "0.1.0"
