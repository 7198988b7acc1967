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


@pytest.fixture(scope="module")
def shared_compilation_cache(tmp_path_factory):
    """A persistent compilation cache for one module: its several recipe runs compile the same
    steps (about 4x faster); use with ``pytest.mark.usefixtures("shared_compilation_cache")``."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    try:  # forget the temporary directory (private API; harmless if it moves)
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass
