#!/usr/bin/env bash
# One prepared GPU run for issue 24's pieces that wait for a Hopper GPU (H100/H200), in
# order of value per second: the wgmma.sp layout probe (seconds), the cuSPARSELt FFI build
# and its float64 tests, then the large-M benchmark with the cusparselt_ffi column.
# Each step has its own time limit and a failure does not stop the next; logs go to
# ${OUT:-build/gpu_check}/. The limits add up to 13 min, more than one 10-minute device
# command, so name the steps to run per call (default: all):
#   bash benchmarks/gpu_check_wgmma_sp.sh probe build_cusparselt gpu_tests   # <= 7 min
#   bash benchmarks/gpu_check_wgmma_sp.sh matmul_large                        # <= 6 min
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-build/gpu_check}
mkdir -p "$LOGS"
WANTED=" ${*:-probe build_cusparselt gpu_tests matmul_large} "
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  [[ $WANTED == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -25 "$LOGS/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step probe 120 python3 benchmarks/wgmma_sp_probe.py --build
step build_cusparselt 120 bash benchmarks/build_cusparselt_ffi.sh
step gpu_tests 180 python3 -m pytest -q -rs tests/test_cusparselt.py tests/test_wgmma_sp_probe.py
step matmul_large 360 python3 benchmarks/matmul.py --large --out benchmarks/results
cp benchmarks/results/*.txt benchmarks/results/*.jsonl "$LOGS"/ 2>/dev/null || true
