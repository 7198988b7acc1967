"""Benchmark: compressed 2:4 matmul vs dense, x (M, K) @ W (K, N), bf16.

Times, in one run on one device: XLA's dense ``jnp.dot``; sparse_jax's kernels
(portable Pallas, Mosaic GPU); and, when PyTorch with CUDA is importable,
PyTorch dense ``F.linear`` and its semi-structured sparse matmul
(``torch.sparse.to_sparse_semi_structured``, cuSPARSELt); and, when built
(``bash benchmarks/build_cusparselt_ffi.sh``), cuSPARSELt called straight from JAX
through ``jax.ffi`` (``cusparselt_ffi``, sparse_jax/kernels/_cusparselt.py; the weight is
compressed into cuSPARSELt's format once, outside the timing). Prints a table of
milliseconds (median of many timed repetitions after warm-up; a JAX
repetition is one jitted dispatch running the product once per weight copy,
``--copies`` rotating copies so the weight comes from HBM rather than L2 and
the host's dispatch cost is shared; PyTorch runs the same products eagerly,
synchronising once per repetition) and speedups over XLA dense, plus the fraction
of the measured HBM bandwidth each reached (bytes moved: x, the weight as
stored, the output; bandwidth: a large device-to-device copy timed here).

Each result is also checked against a full-precision float32 dense product
(relative Frobenius error), and a kernel that fails prints its error once and shows
``err`` in the table instead of stopping the run.

On CPU it runs the reference path (decompress + ``jnp.dot``) on reduced sizes
and says so.

Usage:
  python benchmarks/matmul.py                      # full table on GPU
  python benchmarks/matmul.py --out benchmarks/results   # also writes .txt/.jsonl
  python benchmarks/matmul.py --m 1 16 --shapes 4096x4096
  python benchmarks/matmul.py --large --out benchmarks/results   # M 4096, 8192 (incl. 8192^3)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparse_jax  # noqa: E402

GPU_M = (1, 8, 16, 64, 256, 1024, 4096, 8192)
GPU_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))
CPU_M = (1, 16, 256)
CPU_SHAPES = ((512, 512), (512, 1792))
# --large: the compute-bound rows, M in {4096, 8192} over GPU_SHAPES (8192x8192 at M=8192 is
# 8192^3); weights are re-read many times per product there, so fewer rotating copies suffice.
GPU_LARGE_M = (4096, 8192)
CPU_LARGE_M = (512, 1024)
LARGE_COPIES = 2
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}


class Log:
    """Prints and remembers every line, for the .txt written with --out."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Columns: ms per matmul (median), 'x' = speedup over XLA dense from "
            "the same run, hbm = fraction of the copy bandwidth measured at start. "
            "Records go to <out>/<device>-<date>.jsonl, one per measurement."
        ),
    )
    parser.add_argument("--m", type=int, nargs="+", help=f"rows of x (GPU default {GPU_M})")
    parser.add_argument(
        "--shapes", nargs="+", help="KxN weight shapes (GPU default 4096x4096 4096x14336 14336x4096 8192x8192)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=["dense_xla", "pallas", "mosaic", "torch_dense", "torch_cusparselt", "cusparselt_ffi"],
        help="what to time (default: all available); reference = decompress + jnp.dot",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions")
    parser.add_argument("--iters", type=int, default=30, help="timed repetitions (median)")
    parser.add_argument("--copies", type=int, help=f"weight copies rotated through per repetition "
                        f"(default 8; {LARGE_COPIES} with --large)")
    parser.add_argument("--large", action="store_true",
                        help=f"M in {GPU_LARGE_M} over the default shapes (CPU: M in {CPU_LARGE_M}); --m/--shapes override")
    parser.add_argument("--search", action="store_true",
                        help="cusparselt_ffi: let cuSPARSELt time its algorithms once per shape (cusparseLtMatmulSearch)")
    parser.add_argument("--out", type=Path, help="directory for <device>-<date>.txt and .jsonl")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def time_ms(repetition, products: int, *, warmup: int, iters: int, sync) -> float:
    """Median ms per product of ``repetition()``, which runs ``products`` of them;
    ``sync`` waits for the device."""
    for _ in range(warmup):
        sync(repetition())
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(repetition())
        samples.append((time.perf_counter() - start) * 1e3 / products)
    return statistics.median(samples)


def copy_bandwidth(log, gib: float = 1.0) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    n = int(gib * 2**30) // 4
    a = jnp.arange(n, dtype=jnp.float32)
    copy = jax.jit(lambda t: t + 1.0)
    ms = time_ms(lambda: copy(a), 1, warmup=2, iters=10, sync=jax.block_until_ready)
    bw = 2 * n * 4 / (ms * 1e-3)
    log(f"measured copy bandwidth: {bw / 1e9:.0f} GB/s ({gib:.1f} GiB read + written, {ms:.3f} ms)")
    return bw


def rel_err(y, ref) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def torch_setup(log):
    try:
        import torch
    except ImportError:
        log("torch: not importable; its columns are skipped")
        return None
    if not torch.cuda.is_available():
        log(f"torch {torch.__version__}: no CUDA; its columns are skipped")
        return None
    try:
        from torch.sparse import SparseSemiStructuredTensor

        SparseSemiStructuredTensor._FORCE_CUTLASS = False  # cuSPARSELt, not CUTLASS
        backend = "cuSPARSELt" if torch.backends.cusparselt.is_available() else "CUTLASS (no cuSPARSELt)"
        log(f"torch {torch.__version__}, semi-structured backend: {backend}")
    except Exception as err:  # noqa: BLE001 - report and carry on
        log(f"torch {torch.__version__}: semi-structured sparsity unavailable ({err})")
    return torch


def cusparselt_setup(log):
    """sparse_jax's cuSPARSELt FFI module, or None (with the reason logged)."""
    from sparse_jax.kernels import _cusparselt

    try:
        _cusparselt.load()
        log(f"cusparselt_ffi: {_cusparselt.library_path()}, cuSPARSELt version {_cusparselt.version()}")
    except Exception as err:  # noqa: BLE001 - optional column
        log(f"cusparselt_ffi: unavailable, column skipped ({str(err).splitlines()[0]})")
        return None
    return _cusparselt


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    log = Log()
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    device_name = getattr(device, "device_kind", device.platform)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    dtype = DTYPES[args.dtype]
    log(f"device: {device_name} ({device.platform}), jax {jax.__version__}, date {date}, dtype {args.dtype}")
    if args.m:
        ms_list = tuple(args.m)
    elif args.large:
        ms_list = GPU_LARGE_M if on_gpu else CPU_LARGE_M
    else:
        ms_list = GPU_M if on_gpu else CPU_M
    if args.copies is None:
        args.copies = LARGE_COPIES if args.large else 8
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.shapes)
    else:
        shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    impls = list(args.impls)
    if not on_gpu:
        log(
            "no GPU: timing XLA dense and sparse_jax's reference path (decompress + "
            "jnp.dot) on reduced sizes; the Pallas kernels are GPU-only here "
            "(interpret mode is for tests, not timing)"
        )
        impls = [i for i in impls if i == "dense_xla"] + ["reference"]
    torch = None
    if on_gpu and any(i.startswith("torch") for i in impls):
        torch = torch_setup(log)
    if torch is None:
        impls = [i for i in impls if not i.startswith("torch")]
    cusparselt = cusparselt_setup(log) if on_gpu and "cusparselt_ffi" in impls else None
    if cusparselt is None:
        impls = [i for i in impls if i != "cusparselt_ffi"]
    bandwidth = copy_bandwidth(log) if on_gpu else None
    log(f"timing: median of {args.iters} repetitions of {args.copies} products (one per rotating "
        f"weight copy; one jitted dispatch for JAX), {args.warmup} warm-up")

    records, failed = [], set()
    stem = f"{device_name.replace(' ', '-')}-{date}"
    jsonl = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        jsonl = open(args.out / f"{stem}.jsonl", "w")
    header = f"{'M':>5} {'K':>6} {'N':>6} | " + " | ".join(f"{i:>24}" for i in impls)
    log(header)
    log("-" * len(header))
    key = jax.random.key(args.seed)
    itemsize = jnp.dtype(dtype).itemsize
    for k, n in shapes:
        weights, compressed = [], []
        for c in range(args.copies):
            w = jax.random.normal(jax.random.fold_in(key, 1000 * k + n + c), (k, n), jnp.float32)
            w = (w * sparse_jax.nm_mask(w, axis=0)).astype(dtype)
            weights.append(w)
            compressed.append(sparse_jax.compress(w))
        torch_dense = torch_sparse = lt_compressed = None
        for m in ms_list:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32).astype(dtype)
            # float32 reference at full precision on the device (the bf16 inputs are exact in it).
            ref = np.asarray(
                jnp.dot(x.astype(jnp.float32), weights[0].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST),
                np.float64,
            )
            dense_bytes = (m * k + k * n + m * n) * itemsize
            sparse_bytes = m * k * itemsize + compressed[0].nbytes + m * n * itemsize
            row, dense_ms = [], None
            for impl in impls:
                cell, ms, err = "err", None, None
                try:
                    if impl.startswith("torch"):
                        if torch_dense is None:
                            torch_dense = [
                                torch.from_numpy(np.asarray(w.astype(jnp.float32)).T.copy())
                                .to(device="cuda", dtype=getattr(torch, {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[args.dtype]))
                                for w in weights
                            ]
                        tx = torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(
                            device="cuda", dtype=torch_dense[0].dtype
                        )
                        if impl == "torch_cusparselt":
                            if torch_sparse is None:
                                torch_sparse = [torch.sparse.to_sparse_semi_structured(w) for w in torch_dense]
                            mats = torch_sparse
                        else:
                            mats = torch_dense
                        lin = torch.nn.functional.linear
                        y = lin(tx, mats[0])
                        err = rel_err(jnp.asarray(y.float().cpu().numpy()), ref)
                        ms = time_ms(lambda: [lin(tx, w) for w in mats], len(mats), warmup=args.warmup,
                                     iters=args.iters, sync=lambda _: torch.cuda.synchronize())
                        nbytes = sparse_bytes if impl == "torch_cusparselt" else dense_bytes
                    elif impl == "cusparselt_ffi":
                        if lt_compressed is None:
                            lt_compressed = [jax.block_until_ready(cusparselt.cusparselt_compress(w)) for w in weights]
                        one = jax.jit(lambda x, wc, n=n: cusparselt.cusparselt_matmul(x, wc, n, search=args.search))
                        err = rel_err(one(x, lt_compressed[0]), ref)
                        every = jax.jit(lambda x, wcs, n=n: [
                            cusparselt.cusparselt_matmul(x, wc, n, search=args.search) for wc in wcs])
                        ms = time_ms(lambda: every(x, lt_compressed), len(lt_compressed), warmup=args.warmup,
                                     iters=args.iters, sync=jax.block_until_ready)
                        nbytes = sparse_bytes
                    else:
                        if impl == "dense_xla":
                            one = lambda x, w: jnp.dot(x, w)  # noqa: E731
                            operands = weights
                            nbytes = dense_bytes
                        else:
                            one = lambda x, s, impl=impl: sparse_jax.matmul(x, s, impl=impl)  # noqa: E731
                            operands = compressed
                            nbytes = sparse_bytes
                        err = rel_err(jax.jit(one)(x, operands[0]), ref)
                        every = jax.jit(lambda x, ws, one=one: [one(x, w) for w in ws])
                        ms = time_ms(lambda: every(x, operands), len(operands), warmup=args.warmup,
                                     iters=args.iters, sync=jax.block_until_ready)
                except Exception as exc:  # noqa: BLE001 - one kernel's failure must not end the table
                    if impl not in failed:
                        failed.add(impl)
                        log(f"  [{impl} failed at M={m} K={k} N={n}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}]")
                        tb = traceback.format_exc().strip().splitlines()
                        log("    " + "\n    ".join(tb[-6:]))
                if ms is not None:
                    if impl == "dense_xla":
                        dense_ms = ms
                    speedup = dense_ms / ms if dense_ms else None
                    hbm = nbytes / (ms * 1e-3) / bandwidth if bandwidth else None
                    tflops = 2 * m * k * n / (ms * 1e-3) / 1e12  # dense-equivalent rate
                    third = f" {tflops:.3g}T" if args.large else (f" {hbm:4.2f}" if hbm else "")
                    cell = f"{ms:8.4f} {speedup or 0:5.2f}x" + third + (
                        f" e{err:.0e}" if err is not None and err > 2e-2 else ""
                    )
                    records.append(record := {
                        "device": device_name, "jax": jax.__version__, "op": "matmul",
                        "m": m, "k": k, "n": n, "dtype": jnp.dtype(dtype).name,
                        "impl": impl if impl in ("dense_xla", "torch_cusparselt", "torch_dense", "cusparselt_ffi")
                        else f"sparse_jax_{impl}",
                        "ms": round(ms, 5), "speedup_vs_dense": round(speedup, 4) if speedup else None,
                        "hbm_fraction": round(hbm, 4) if hbm else None,
                        "tflops": float(f"{tflops:.4g}"),
                        "rel_err": err,
                    })
                    if jsonl is not None:  # written as we go, so a cut-off run keeps its rows
                        jsonl.write(json.dumps(record) + "\n")
                        jsonl.flush()
                row.append(f"{cell:>24}")
            log(f"{m:>5} {k:>6} {n:>6} | " + " | ".join(row))
    log("cells: ms, speedup over dense_xla, " + ("dense-equivalent TFLOP/s (2MKN / time)" if args.large
        else "hbm fraction (GPU)") + "; 'eX' marks a relative error > 2e-2")
    log(f"total time: {time.perf_counter() - started:.1f} s")
    if jsonl is not None:
        jsonl.close()
        (args.out / f"{stem}.txt").write_text("\n".join(log.lines) + "\n")
        print(f"wrote {args.out / stem}.txt and .jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
