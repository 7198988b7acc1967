"""Checks the sparse wgmma layout emulation against the hardware (Hopper GPU, seconds).

Builds (``--build``, nvcc for sm_90a) and runs ``sparse_jax/kernels/wgmma_sp_probe/
wgmma_sp_probe.cu``: one ``wgmma.mma_async.sp ... m64n16k32.f32.bf16.bf16`` on a random
2:4 tile laid out by sparse_jax's shuffles (`a_registers_from_values`,
`wgmma_sp_meta_relayout`), for both sparsity selectors and A from registers, from shared
memory K-major, and from shared memory M-major (imm-trans-a = 1: Sparse24's own layout). Each result is compared with float64 ``decompress(s).T @ b``; on a mismatch it
says which alternative reading of the ISA (metadata halves swapped, index order in the
nibble, thread pair, selector pair, A register halves) the hardware matches instead.

Usage (on the GPU machine):
  python benchmarks/wgmma_sp_probe.py --build     # exit status 0 = every rule confirmed
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
from pathlib import Path

# The operands are prepared on the host; keep JAX off the GPU the probe uses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sparse_jax  # noqa: E402
from sparse_jax.kernels import _wgmma_sp_layout as wl  # noqa: E402

SOURCE = ROOT / "sparse_jax" / "kernels" / "wgmma_sp_probe" / "wgmma_sp_probe.cu"
LIBRARY = ROOT / "build" / "wgmma_sp_probe" / "libwgmma_sp_probe.so"
N = 16
A_MODES = {0: "registers", 1: "smem K-major", 2: "smem M-major"}
WRONG_BUT_VALID = 0xEEEEEEEE  # every nibble: positions 2, 3 (valid, and wrong for most chunks)


def build(nvcc: str = "nvcc") -> None:
    LIBRARY.parent.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
           str(SOURCE), "-o", str(LIBRARY)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def bf16_bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jnp.asarray(a, jnp.bfloat16)).view(np.uint16))


def pack_pairs(a_values) -> np.ndarray:
    """(128, 8) bf16 values -> (128, 4) uint32, a_{2r} in the low half."""
    bits = bf16_bits(a_values).astype(np.uint32)
    return bits[:, 0::2] | (bits[:, 1::2] << 16)


def problem(seed: int):
    """A random (K=32, N=64) 2:4 weight (A = its transpose) and a (32, 16) B."""
    key = jax.random.key(seed)
    w = jax.random.normal(key, (32, 64), jnp.float32)
    w = (w * sparse_jax.nm_mask(w, axis=0)).astype(jnp.bfloat16)
    s = sparse_jax.compress(w)
    b = jax.random.normal(jax.random.fold_in(key, 1), (32, N), jnp.float32).astype(jnp.bfloat16)
    return s, b


def operands(s, selector: int):
    values_tile = s.values[:16, :64]
    kept = np.asarray(values_tile.T.astype(jnp.float32))
    a_values = np.asarray(wl.a_registers_from_values(values_tile).astype(jnp.float32))
    meta = wl.meta_registers_from_relayout(np.asarray(wl.wgmma_sp_meta_relayout(s.meta))[0, :64])
    for t in range(128):  # the pair the selector does not pick carries wrong (valid) metadata
        if (t % 4) // 2 != selector:
            meta[t] = WRONG_BUT_VALID
    return kept, a_values, meta


def _swap_index_order(regs):
    regs = regs.astype(np.uint64)
    low = regs & 0x33333333
    high = (regs >> 2) & 0x33333333
    return ((low << 2) | high).astype(np.uint32)


HYPOTHESES = {
    # name: (transform of the metadata registers, transform of the A register values)
    "as emulated": (lambda m: m, lambda a: a),
    "metadata halves swapped (rows r / r + 8)": (lambda m: ((m >> 16) | (m << 16)).astype(np.uint32), lambda a: a),
    "index order in each nibble swapped": (_swap_index_order, lambda a: a),
    "metadata thread pair swapped (T0 <-> T1)": (lambda m: m[np.arange(128) ^ 1], lambda a: a),
    "selector picks the other pair": (lambda m: m[np.arange(128) ^ 2], lambda a: a),
    "A register halves swapped": (lambda m: m, lambda a: a.reshape(128, 4, 2)[:, :, ::-1].reshape(128, 8)),
}


def explain(d_gpu, kept, a_values, meta, b, selector, a_from_smem) -> list[str]:
    matches = []
    for name, (meta_fn, a_fn) in HYPOTHESES.items():
        a = kept if a_from_smem else a_fn(a_values)
        try:
            d = wl.emulate_wgmma_sp(a, meta_fn(meta), b, selector=selector,
                                    a_source="smem" if a_from_smem else "registers")
        except ValueError:
            continue
        if np.allclose(d, d_gpu, rtol=1e-3, atol=1e-3):
            matches.append(name)
    return matches


def run(library, seed: int = 0) -> bool:
    s, b_bf16 = problem(seed)
    b = np.asarray(b_bf16.astype(jnp.float32), np.float64)
    ref = np.asarray(sparse_jax.decompress(s).astype(jnp.float32), np.float64).T @ b  # (64, 16)
    all_ok = True
    for a_mode in A_MODES:
        a_from_smem = a_mode != 0
        for selector in (0, 1):
            kept, a_values, meta = operands(s, selector)
            d = np.zeros((128, 8), np.float32)
            err = ctypes.create_string_buffer(256)
            status = library.wgmma_sp_probe(
                pack_pairs(a_values).ctypes.data_as(ctypes.c_void_p),
                bf16_bits(kept).ctypes.data_as(ctypes.c_void_p),
                np.ascontiguousarray(meta, np.uint32).ctypes.data_as(ctypes.c_void_p),
                bf16_bits(b_bf16).ctypes.data_as(ctypes.c_void_p),
                d.ctypes.data_as(ctypes.c_void_p), selector, a_mode, err, len(err))
            label = f"A from {A_MODES[a_mode]}, selector {selector}"
            if status:
                print(f"{label}: CUDA error {err.value.decode()}")
                all_ok = False
                continue
            got = wl.gather_d(d).astype(np.float64)
            rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            ok = rel < 1e-5
            all_ok &= ok
            print(f"{label}: rel. error vs float64 decompress {rel:.2e} -> {'OK' if ok else 'MISMATCH'}")
            if not ok:
                matches = explain(d, kept, a_values, meta, b, selector, a_from_smem)
                print(f"  hardware matches: {matches or 'none of the alternatives (check D layout, descriptors)'}")
                bad = np.argwhere(~np.isclose(got, ref, rtol=1e-3, atol=1e-3))
                print(f"  wrong D entries: {len(bad)} of {got.size}; rows {sorted(set(bad[:, 0]))[:16]}, "
                      f"cols {sorted(set(bad[:, 1]))}")
    return all_ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="compile the probe with nvcc first")
    parser.add_argument("--nvcc", default="nvcc")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.build or not LIBRARY.is_file():
        build(args.nvcc)
    library = ctypes.CDLL(str(LIBRARY))
    library.wgmma_sp_probe.restype = ctypes.c_int
    library.wgmma_sp_probe.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                                               ctypes.c_int]
    ok = run(library, args.seed)
    print("all rules confirmed" if ok else "MISMATCH: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
