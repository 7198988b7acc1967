"""Runnable 2:4 sparsity recipes: one thin script per model; the workflow engine in `recipes.engine`, the tasks by domain in `recipes.vision`, `recipes.text` and `recipes.detection`."""
