"""Time of the one-shot layer solves (`sparse_jax.sparsegpt`, `sparse_jax.wanda`).

For the four GPT-2-small layer shapes of one transformer block (Dense kernels
``(in, out)``: attn c_attn 768x2304, attn c_proj 768x768, mlp c_fc 768x3072,
mlp c_proj 3072x768) it prints, on the current default device:
  * the compile time of each solve (lower + compile, measured separately),
  * the steady-state time per call (median of ``--repeats``),
and sums them to seconds per transformer block and for all 12 blocks.

Only the solve is timed: the Hessians are random ``X^T X`` of the right size.
Collecting the statistics from a model (running calibration batches and
accumulating `sparse_jax.CalibrationStats` per layer) needs the model-level
code, which is not in the library yet; this script says so in its output.

Usage: python benchmarks/oneshot.py [--repeats 3] [--block-size 128] [--jsonl PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

import sparse_jax
from sparse_jax import _oneshot

GPT2_SMALL_BLOCK = {
    "attn/c_attn": (768, 2304),
    "attn/c_proj": (768, 768),
    "mlp/c_fc": (768, 3072),
    "mlp/c_proj": (3072, 768),
}
GPT2_SMALL_LAYERS = 12


def layer_inputs(size: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A kernel, a Hessian X^T X (512 random tokens) and the squared input norms."""
    k_kernel, k_x = jax.random.split(key)
    x = jax.random.normal(k_x, (512, size), jnp.float32)
    stats = sparse_jax.CalibrationStats.zeros(size).update(x)
    return k_kernel, stats.xtx, stats.sq_norms


def time_solve(fn, args, repeats: int) -> tuple[float, float]:
    """(compile seconds, steady-state seconds per call) of a jitted ``fn``."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--jsonl", default=None, help="also write one JSON record per measurement")
    args = parser.parse_args()

    device = jax.devices()[0]
    device_name = getattr(device, "device_kind", str(device))
    print(f"device: {device_name} ({jax.default_backend()}), jax {jax.__version__}, "
          f"block_size={args.block_size}, repeats={args.repeats}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print("statistics collection (calibration forward passes + CalibrationStats): not timed; "
          "it needs the model-level one-shot code, which is not in sparse_jax yet")
    records = []
    per_block = {"sparsegpt": 0.0, "wanda": 0.0}
    compile_total = {"sparsegpt": 0.0, "wanda": 0.0}
    print(f"{'layer':<12} {'shape':>10} {'method':>10} {'compile s':>10} {'solve s':>10}")
    for index, (name, (size, outputs)) in enumerate(GPT2_SMALL_BLOCK.items()):
        k_kernel, hessian, sq_norms = layer_inputs(size, jax.random.key(index))
        kernel = jax.random.normal(k_kernel, (size, outputs), jnp.float32) * size**-0.5
        solves = {
            "sparsegpt": (
                jax.jit(lambda k, h: _oneshot._sparsegpt(
                    k, h, jnp.float32(0.01), n=2, m=4, axis=0,
                    block_size=min(args.block_size, size))),
                (kernel, hessian),
            ),
            "wanda": (
                jax.jit(lambda k, s: _oneshot._wanda(k, s, n=2, m=4, axis=0)),
                (kernel, sq_norms),
            ),
        }
        for method, (fn, fn_args) in solves.items():
            compile_s, solve_s = time_solve(fn, fn_args, args.repeats)
            per_block[method] += solve_s
            compile_total[method] += compile_s
            print(f"{name:<12} {size:>4}x{outputs:<5} {method:>10} {compile_s:>10.3f} {solve_s:>10.3f}")
            records.append({
                "device": device_name, "jax": jax.__version__, "op": f"oneshot_{method}",
                "layer": name, "in": size, "out": outputs, "block_size": args.block_size,
                "compile_s": compile_s, "solve_s": solve_s,
            })
    for method in per_block:
        print(f"{method}: {per_block[method]:.3f} s per transformer block (4 layers, steady state), "
              f"{GPT2_SMALL_LAYERS * per_block[method]:.2f} s for {GPT2_SMALL_LAYERS} blocks; "
              f"compile {compile_total[method]:.2f} s once (the 4 shapes; later blocks reuse it)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.jsonl:
        with open(args.jsonl, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
