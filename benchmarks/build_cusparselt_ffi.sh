#!/usr/bin/env bash
# Builds sparse_jax's cuSPARSELt XLA FFI handler (plain host C++, g++ only, no nvcc):
#   sparse_jax/kernels/cusparselt/cusparselt_ffi.cc -> build/cusparselt/libsparse_jax_cusparselt.so
# which sparse_jax.kernels._cusparselt loads (or $SPARSE_JAX_CUSPARSELT_LIB).
#
# Headers and libraries, first found wins (override with the variables):
#   XLA FFI headers   $XLA_FFI_INCLUDE   else jax.ffi.include_dir()
#   cuSPARSELt        $CUSPARSELT_ROOT   else the pip wheel nvidia-cusparselt-cu13 (nvidia/cu13),
#                                        else /usr/include + /usr/lib/x86_64-linux-gnu
#   CUDA runtime      $CUDA_HOME         else the pip wheels nvidia-cuda-runtime + nvidia-cuda-crt
#                                        (nvidia/cu13: the cudart jax's CUDA plugin uses), else /usr/local/cuda
# Options:  --syntax-only   check the source compiles (no .so; libraries not needed)
#           --out PATH      where to write the .so
# Usage on the GPU machine: bash benchmarks/build_cusparselt_ffi.sh && python benchmarks/matmul.py ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SRC=sparse_jax/kernels/cusparselt/cusparselt_ffi.cc
OUT=build/cusparselt/libsparse_jax_cusparselt.so
SYNTAX_ONLY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --syntax-only) SYNTAX_ONLY=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

XLA_FFI_INCLUDE=${XLA_FFI_INCLUDE:-$("$PY" -c 'import jax; print(jax.ffi.include_dir())')}

# Every directory of the `nvidia` namespace package that holds $1 (e.g. cu13/include/cusparseLt.h).
pip_nvidia_dir() {
  "$PY" - "$1" <<'PYEOF'
import os, sys
try:
    import nvidia
except ImportError:
    sys.exit(0)
for root in getattr(nvidia, "__path__", []):
    if os.path.exists(os.path.join(root, sys.argv[1])):
        print(os.path.join(root, os.path.dirname(sys.argv[1])))
        break
PYEOF
}

if [[ -n "${CUSPARSELT_ROOT:-}" ]]; then
  LT_INC=$CUSPARSELT_ROOT/include; LT_LIB=$CUSPARSELT_ROOT/lib
elif LT_INC=$(pip_nvidia_dir cu13/include/cusparseLt.h) && [[ -n "$LT_INC" ]]; then
  LT_LIB=$(dirname "$LT_INC")/lib
else
  LT_INC=/usr/include; LT_LIB=/usr/lib/x86_64-linux-gnu
fi
[[ -f $LT_INC/cusparseLt.h ]] || { echo "cusparseLt.h not found (pip install nvidia-cusparselt-cu13, or set CUSPARSELT_ROOT)" >&2; exit 1; }

if [[ -n "${CUDA_HOME:-}" ]]; then
  CUDA_INC=$CUDA_HOME/include; CUDA_LIB=$CUDA_HOME/lib64
elif CUDA_INC=$(pip_nvidia_dir cu13/include/crt/host_defines.h) && [[ -n "$CUDA_INC" ]] \
     && [[ -f $CUDA_INC/../cuda_runtime_api.h ]]; then
  CUDA_INC=$(dirname "$CUDA_INC"); CUDA_LIB=$(dirname "$CUDA_INC")/lib
else
  CUDA_INC=/usr/local/cuda/include; CUDA_LIB=/usr/local/cuda/lib64
fi
[[ -f $CUDA_INC/cuda_runtime_api.h ]] || { echo "cuda_runtime_api.h not found (set CUDA_HOME)" >&2; exit 1; }

FLAGS=(-std=c++17 -O2 -fPIC -Wall -Wextra -isystem "$XLA_FFI_INCLUDE" -isystem "$CUDA_INC" -isystem "$LT_INC")
echo "XLA FFI: $XLA_FFI_INCLUDE"; echo "cuSPARSELt: $LT_INC, $LT_LIB"; echo "CUDA: $CUDA_INC, $CUDA_LIB"
if [[ $SYNTAX_ONLY == 1 ]]; then
  set -x
  g++ "${FLAGS[@]}" -fsyntax-only "$SRC"
  exit 0
fi
# The wheels ship only versioned names (libcusparseLt.so.0, libcudart.so.13), hence -l:.
LT_SO=$(cd "$LT_LIB" && ls libcusparseLt.so* | sort | head -1)
CUDART_SO=$(cd "$CUDA_LIB" && ls libcudart.so* | sort | head -1)
mkdir -p "$(dirname "$OUT")"
set -x
g++ "${FLAGS[@]}" -shared "$SRC" -o "$OUT" \
  -L "$LT_LIB" -L "$CUDA_LIB" -l:"$LT_SO" -l:"$CUDART_SO" \
  -Wl,-rpath,"$LT_LIB" -Wl,-rpath,"$CUDA_LIB" -Wl,--no-undefined
