"""Shared recipe code: models, input pipelines, the dense -> prune -> retrain -> evaluate workflow."""
