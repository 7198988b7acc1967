"""Time `sparse_jax.transposable_nm_mask` on a square kernel, after compilation.

Prints, for each size and method, the first call (compile included) and the
median of the steady-state calls on the default device, and checks that the
mask is N:M along both axes. The ordinary `sparse_jax.nm_mask` of the same
kernel is timed alongside for scale.

Usage: python benchmarks/transposable.py [--sizes 1024 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

import sparse_jax


def timed(fn, repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"{'kernel':>11}  {'mask':<26} {'first call s':>12} {'steady s':>9}  both axes N:M")
    for size in args.sizes:
        w = jax.random.normal(jax.random.key(0), (size, size))
        cases = [
            ("nm_mask 2:4 (axis 0)", lambda: sparse_jax.nm_mask(w, 2, 4, axis=0), None),
            ("transposable 2:4 exact", lambda: sparse_jax.transposable_nm_mask(w), (2, 4)),
            ("transposable 4:8 greedy", lambda: sparse_jax.transposable_nm_mask(w, 4, 8), (4, 8)),
        ]
        for name, fn, pattern in cases:
            first, steady = timed(fn, args.repeats)
            ok = "-" if pattern is None else str(bool(sparse_jax.is_transposable_nm(w * fn(), *pattern)))
            print(f"{size:>5}x{size:<5}  {name:<26} {first:>12.3f} {steady:>9.3f}  {ok}")


if __name__ == "__main__":
    main()
