"""benchmarks/masked_update_loop.py: its loop finder on a hand-written listing, and a real run."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "masked_update_loop.py"

# An outer loop (0x20..0x60) around an inner one (0x28..0x50) unrolled twice: two square roots,
# so two vectors of 8 weights per pass; a forward jump (0x58) that is no loop.
LISTING = """
0000000000000000 <fusion>:
      20:	mov    %rdi,%rax
      28:	vmulps -0x20(%r14,%rsi,4),%ymm4,%ymm7
      2f:	vsqrtps %ymm7,%ymm7
      33:	vdivps %ymm7,%ymm8,%ymm7
      37:	vmovups %ymm7,-0x20(%r15,%rsi,4)
      3e:	vmulps (%r14,%rsi,4),%ymm4,%ymm7
      44:	vsqrtps %ymm7,%ymm7
      48:	vmovups %ymm7,(%r15,%rsi,4)
      4c:	add    $0x10,%rsi
      50:	jne    28 <fusion+0x28>
      56:	inc    %r9
      58:	je     70 <fusion+0x70>
      5c:	cmp    $0x3,%r9
      60:	jne    20 <fusion+0x20>
      70:	ret
"""


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_masked_update_loop", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_innermost_loop_is_the_tightest_backward_jump_around_the_square_root():
    bench = _bench_module()
    loop = bench.innermost_loop(LISTING)
    assert [addr for addr, _, _ in loop] == [0x28, 0x2F, 0x33, 0x37, 0x3E, 0x44, 0x48, 0x4C, 0x50]
    lanes, counts = bench.per_vector(loop)
    assert lanes == 8  # ymm registers, float32
    # 9 instructions in the pass, 2 vectors: by hand, 2 vmulps, 2 vsqrtps, 1 vdivps, ...
    assert counts == {"vmulps": 1.0, "vsqrtps": 1.0, "vdivps": 0.5, "vmovups": 1.0,
                      "add": 0.5, "jne": 0.5}
    assert sum(counts.values()) == pytest.approx(9 / 2)


def test_no_loop_without_a_square_root_or_a_backward_jump():
    bench = _bench_module()
    assert bench.innermost_loop(LISTING.replace("vsqrtps", "vaddps")) is None
    forward_only = "\n".join(line for line in LISTING.splitlines() if "jne" not in line)
    assert bench.innermost_loop(forward_only) is None


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_run_finds_every_loop_and_the_mask_adds_instructions():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = re.findall(r"^(\w+)\s+([0-9.]+)\s+([0-9.]+)$", run.stdout, re.M)
    per = {name: float(count) for name, count, _ in rows}
    assert set(per) == {"bare", "masked", "masked_sparse_apply", "hand_shift", "hand_sign_bit",
                        "hand_params_nonzero"}
    # both masked loops read and test the mask bits: strictly more work than bare AdamW's
    assert per["masked"] > per["bare"] and per["masked_sparse_apply"] > per["bare"]
    for name, count, ratio in rows:
        assert float(ratio) == pytest.approx(float(count) / per["bare"], abs=1e-3)
