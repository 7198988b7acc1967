"""Every public module's docstring examples run and pass.

A module is public when it defines a name that ``sparse_jax``, ``sparse_jax.nn`` or
``sparse_jax.kernels`` exports, or is a public submodule (``export``, ``inspect``).
"""

import doctest
import importlib
import inspect

import pytest

import sparse_jax

NAMESPACES = ("sparse_jax", "sparse_jax.nn", "sparse_jax.kernels")
PUBLIC_SUBMODULES = ("sparse_jax.export", "sparse_jax.inspect")


def public_modules() -> list[str]:
    modules = set(PUBLIC_SUBMODULES)
    for namespace in NAMESPACES:
        package = importlib.import_module(namespace)
        for name in dir(package):
            obj = getattr(package, name)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            module = getattr(obj, "__module__", "") or ""
            if module.startswith("sparse_jax"):
                modules.add(module)
    return sorted(modules)


def test_public_modules_are_found():
    found = public_modules()
    assert {"sparse_jax._masked", "sparse_jax._prune", "sparse_jax._compressed"} <= set(found)
    assert sparse_jax.prune.__module__ in found


# sparse_jax.export's examples build and check ONNX models (7 s): with the slow tests.
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow)
                                  if name == "sparse_jax.export" else name
                                  for name in public_modules()])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0, f"{name} has public names but no docstring example"
    assert result.failed == 0
