"""Shared test set-up: 8 CPU devices for sharding tests, the gpu marker."""

import os

# Must happen before jax is imported anywhere (conftest is imported first).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Implicit rank promotion is allowed: Flax's own layers (e.g. nnx.Conv's bias) rely on it.


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none visible to jax)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
