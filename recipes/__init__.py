"""Runnable 2:4 sparsity recipes (one script per model) and their shared code in `recipes.common`."""
