"""cuSPARSELt's 2:4 matmul through ``jax.ffi``: optional, built by hand, the yardstick.

The handler (``sparse_jax/kernels/cusparselt/cusparselt_ffi.cc``) is plain host C++
calling the cuSPARSELt and CUDA runtime APIs; build it on the GPU machine with::

    bash benchmarks/build_cusparselt_ffi.sh   # -> build/cusparselt/libsparse_jax_cusparselt.so

(needs g++, the pip wheel ``nvidia-cusparselt-cu13`` or ``CUSPARSELT_ROOT``, and the CUDA
runtime headers from ``CUDA_HOME`` or the ``nvidia-cuda-runtime`` + ``nvidia-cuda-crt``
wheels). ``SPARSE_JAX_CUSPARSELT_LIB`` points elsewhere. Nothing here is imported by
``sparse_jax`` itself; the benchmark uses it when the library loads.

cuSPARSELt keeps its own compressed format, so the weight goes through
`cusparselt_compress` once (a dense ``(K, N)`` 2:4 array, e.g. `sparse_jax.decompress`'s
output) and `cusparselt_matmul` takes the opaque bytes. Both run only on a CUDA device.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

BUILD_HINT = "build it with `bash benchmarks/build_cusparselt_ffi.sh` (see sparse_jax/kernels/_cusparselt.py)"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "build" / "cusparselt" / "libsparse_jax_cusparselt.so"
COMPRESS_TARGET = "sparse_jax_cusparselt_compress"
MATMUL_TARGET = "sparse_jax_cusparselt_matmul"
_DTYPE_CODES = {jnp.dtype(jnp.bfloat16): 0, jnp.dtype(jnp.float16): 1}

_library: ctypes.CDLL | None = None


class CusparseltUnavailable(ImportError):
    """The cuSPARSELt FFI library is not built or cannot be loaded."""


def library_path() -> Path:
    """Where the handler library is looked for: ``$SPARSE_JAX_CUSPARSELT_LIB`` or the build dir."""
    return Path(os.environ.get("SPARSE_JAX_CUSPARSELT_LIB", DEFAULT_LIBRARY))


def load() -> ctypes.CDLL:
    """Loads the library and registers its two FFI targets for platform CUDA (once).

    Raises:
      CusparseltUnavailable: the library is missing or does not load (with the reason and
        how to build it).
    """
    global _library
    if _library is not None:
        return _library
    path = library_path()
    if not path.is_file():
        raise CusparseltUnavailable(f"cuSPARSELt FFI library not found at {path}; {BUILD_HINT}")
    try:
        library = ctypes.CDLL(str(path))
    except OSError as err:
        raise CusparseltUnavailable(
            f"cuSPARSELt FFI library at {path} does not load ({err}); is libcusparseLt.so.0 "
            f"on the library path? {BUILD_HINT}"
        ) from err
    for name in ("sparse_jax_cusparselt_compressed_size", "sparse_jax_cusparselt_version"):
        getattr(library, name).restype = ctypes.c_int64
    library.sparse_jax_cusparselt_compressed_size.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    jax.ffi.register_ffi_target(COMPRESS_TARGET, jax.ffi.pycapsule(library.SparseJaxCusparseltCompress),
                                platform="CUDA")
    jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(library.SparseJaxCusparseltMatmul),
                                platform="CUDA")
    _library = library
    return library


def version() -> int:
    """cuSPARSELt's version number as ``cusparseLtGetVersion`` reports it (needs a GPU)."""
    result = int(load().sparse_jax_cusparselt_version())
    if result < 0:
        raise RuntimeError("cusparseLtInit/GetVersion failed (no CUDA device?)")
    return result


def _check_operand(name: str, a, ndim: int = 2) -> None:
    if a.ndim != ndim or jnp.dtype(a.dtype) not in _DTYPE_CODES:
        raise ValueError(f"{name}: shape {a.shape} dtype {a.dtype}, expected a {ndim}-D bfloat16 or float16 array")
    if jax.default_backend() != "gpu":
        raise RuntimeError(f"cuSPARSELt runs on CUDA devices only; the default backend is {jax.default_backend()}")


def compressed_size(k: int, n: int, dtype) -> int:
    """Bytes of cuSPARSELt's compressed form of a ``(k, n)`` weight of ``dtype``."""
    result = int(load().sparse_jax_cusparselt_compressed_size(k, n, _DTYPE_CODES[jnp.dtype(dtype)]))
    if result < 0:
        raise RuntimeError(f"cuSPARSELt cannot describe a ({k}, {n}) {jnp.dtype(dtype).name} 2:4 weight")
    return result


def cusparselt_compress(w: jax.Array) -> jax.Array:
    """cuSPARSELt's compressed bytes (uint8) of a dense ``(K, N)`` weight, 2:4 along ``K``.

    Entries outside the 2:4 pattern are not checked here; prune first (`sparse_jax.prune`).
    """
    load()
    _check_operand("w", w)
    k, n = w.shape
    out = jax.ShapeDtypeStruct((compressed_size(k, n, w.dtype),), jnp.uint8)
    return jax.ffi.ffi_call(COMPRESS_TARGET, out)(w)


def cusparselt_matmul(x: jax.Array, w_compressed: jax.Array, n: int, *, search: bool = False) -> jax.Array:
    """``x (M, K) @ W (K, N)`` with cuSPARSELt, ``W`` given by `cusparselt_compress`.

    ``search=True`` lets cuSPARSELt time its algorithms once per shape (the first call
    with that shape is then slow; later ones use the winner).
    """
    load()
    _check_operand("x", x)
    want = (compressed_size(x.shape[1], n, x.dtype),)
    if tuple(w_compressed.shape) != want or w_compressed.dtype != jnp.uint8:
        raise ValueError(
            f"w_compressed: shape {w_compressed.shape} dtype {w_compressed.dtype}, expected uint8 {want} "
            f"(cusparselt_compress of a ({x.shape[1]}, {n}) {jnp.dtype(x.dtype).name} weight)"
        )
    out = jax.ShapeDtypeStruct((x.shape[0], n), x.dtype)
    return jax.ffi.ffi_call(MATMUL_TARGET, out)(x, w_compressed, n=np.int64(n), search=np.int64(bool(search)))
