"""The optional cuSPARSELt FFI handler: it compiles (CPU), loads, and matches float64 (GPU)."""

import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax
from sparse_jax.kernels import _cusparselt
from tests._sparse_data import as_f64, random_24, random_x

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "benchmarks" / "build_cusparselt_ffi.sh"


@pytest.mark.slow  # about 10 s of g++ on the XLA FFI headers
def test_handler_source_compiles_against_the_headers():
    """g++ -fsyntax-only through the build script; skipped where the headers are absent."""
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    result = subprocess.run(["bash", str(BUILD), "--syntax-only"], capture_output=True, text=True, cwd=ROOT,
                            check=False)
    if result.returncode and "not found (" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1] + "; set CUSPARSELT_ROOT / CUDA_HOME to run this")
    assert result.returncode == 0, result.stderr[-3000:]


def test_missing_library_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_JAX_CUSPARSELT_LIB", str(tmp_path / "absent.so"))
    monkeypatch.setattr(_cusparselt, "_library", None)
    with pytest.raises(_cusparselt.CusparseltUnavailable, match="build_cusparselt_ffi.sh"):
        _cusparselt.load()


def test_built_library_exports_the_handlers():
    path = _cusparselt.library_path()
    if not path.is_file():
        pytest.skip(f"not built ({path}); {_cusparselt.BUILD_HINT}")
    library = _cusparselt.load()  # also registers both targets for platform CUDA
    for symbol in ("SparseJaxCusparseltCompress", "SparseJaxCusparseltMatmul",
                   "sparse_jax_cusparselt_compressed_size"):
        assert getattr(library, symbol) is not None


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_cpu_backend_is_refused_clearly():
    if not _cusparselt.library_path().is_file():
        pytest.skip("not built")
    with pytest.raises(RuntimeError, match="CUDA devices only"):
        _cusparselt.cusparselt_compress(jnp.zeros((64, 64), jnp.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m", [16, 256])
def test_cusparselt_matmul_matches_float64(dtype, m):
    try:
        _cusparselt.load()
    except _cusparselt.CusparseltUnavailable as err:
        pytest.skip(str(err))
    key = jax.random.key(0)
    k, n = 512, 384
    w = random_24(key, (k, n), dtype)
    x = random_x(jax.random.fold_in(key, 1), (m, k), dtype)
    wc = _cusparselt.cusparselt_compress(w)
    y = jax.jit(lambda x, wc: _cusparselt.cusparselt_matmul(x, wc, n))(x, wc)
    ref = as_f64(x) @ as_f64(w)
    err = np.linalg.norm(as_f64(y) - ref) / np.linalg.norm(ref)
    assert y.shape == (m, n) and y.dtype == dtype
    assert err < (1e-2 if dtype == jnp.bfloat16 else 2e-3), err
    # The searched plan computes the same product.
    y2 = _cusparselt.cusparselt_matmul(x, wc, n, search=True)
    assert np.linalg.norm(as_f64(y2) - ref) / np.linalg.norm(ref) < (1e-2 if dtype == jnp.bfloat16 else 2e-3)
    # And so does the weight stored by sparse_jax, decompressed for cuSPARSELt.
    wc2 = _cusparselt.cusparselt_compress(sparse_jax.decompress(sparse_jax.compress(w)))
    np.testing.assert_array_equal(np.asarray(wc2), np.asarray(wc))
