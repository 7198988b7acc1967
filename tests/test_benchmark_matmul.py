"""benchmarks/matmul.py runs on the CPU (reduced sizes) and writes correct records."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "matmul.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_matmul", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_large_mode_on_cpu_writes_tflops_and_small_errors(tmp_path, capsys):
    bench = _bench_module()
    assert bench.main(["--large", "--m", "64", "--shapes", "128x64", "--iters", "1", "--warmup", "0",
                       "--out", str(tmp_path)]) == 0
    records = [json.loads(line) for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    assert {r["impl"] for r in records} == {"dense_xla", "sparse_jax_reference"}
    for r in records:
        assert (r["m"], r["k"], r["n"]) == (64, 128, 64)
        assert abs(r["tflops"] - 2 * 64 * 128 * 64 / (r["ms"] * 1e-3) / 1e12) <= 1e-3 * r["tflops"] + 1e-9
        assert r["rel_err"] < 2e-2  # bf16 output against the float32 product
    out = capsys.readouterr().out
    assert "TFLOP/s" in out
