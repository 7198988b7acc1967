"""Time of the one-shot layer solves (`sparse_jax.sparsegpt`, `sparse_jax.wanda`).

For the four GPT-2-small layer shapes of one transformer block (Dense kernels
``(in, out)``: attn c_attn 768x2304, attn c_proj 768x768, mlp c_fc 768x3072,
mlp c_proj 3072x768) it prints, on the current default device:
  * the compile time of each solve (lower + compile, measured separately),
  * the steady-state time per call (median of ``--repeats``),
and sums them to seconds per transformer block and for all 12 blocks.

These solves use random ``X^T X`` Hessians of the right size. The second part
runs the whole model-level `sparse_jax.nn.oneshot_prune_model` on a
GPT-2-small-shaped NNX model (embed 768, 12 heads, MLP 3072, vocab 50257,
tied head; ``--layers`` blocks, random weights) with ``--sequences`` random
token sequences of ``--seq`` tokens, and prints the wall time, the part of it
spent in the solves (the rest is running the calibration batches and
accumulating the statistics, sequentially: each block's inputs come from the
blocks already pruned) and the per-layer report. ``--layers 0`` skips it.

Usage: python benchmarks/oneshot.py [--repeats 3] [--block-size 128] [--jsonl PATH]
       [--layers 2] [--seq 64] [--sequences 32] [--batch-size 8] [--method sparsegpt]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

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


class Block(nnx.Module):
    """A GPT-2 block: pre-LayerNorm causal attention (fused c_attn) and a GELU MLP."""

    def __init__(self, embed: int, heads: int, rngs: nnx.Rngs):
        self.heads = heads
        self.ln_1 = nnx.LayerNorm(embed, rngs=rngs)
        self.c_attn = nnx.Linear(embed, 3 * embed, rngs=rngs)
        self.attn_proj = nnx.Linear(embed, embed, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(embed, rngs=rngs)
        self.c_fc = nnx.Linear(embed, 4 * embed, rngs=rngs)
        self.mlp_proj = nnx.Linear(4 * embed, embed, rngs=rngs)

    def __call__(self, x):
        batch, seq, embed = x.shape
        q, k, v = jnp.split(self.c_attn(self.ln_1(x)), 3, axis=-1)
        q, k, v = (t.reshape(batch, seq, self.heads, embed // self.heads) for t in (q, k, v))
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(attended.reshape(batch, seq, embed))
        return x + self.mlp_proj(jax.nn.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nnx.Module):
    def __init__(self, layers: int, *, vocab=50257, seq=1024, embed=768, heads=12, rngs):
        self.wte = nnx.Embed(vocab, embed, rngs=rngs)
        self.wpe = nnx.Embed(seq, embed, rngs=rngs)
        self.blocks = nnx.List([Block(embed, heads, rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(embed, rngs=rngs)

    def __call__(self, tokens):
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.wte.attend(self.ln_f(x))  # tied head


def collect_and_prune(args, device_name: str) -> list[dict]:
    """Model-level one-shot pruning of a GPT-2-small-shaped model; prints what it saw."""
    model = GPT2(args.layers, seq=max(args.seq, 1024), rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(1), args.sequences // args.batch_size)
    batches = [jax.random.randint(k, (args.batch_size, args.seq), 0, 50257) for k in keys]
    start = time.perf_counter()
    result = sparse_jax.nn.oneshot_prune_model(
        model, batches, method=args.method, block_size=args.block_size)
    jax.block_until_ready(result.params)
    total = time.perf_counter() - start
    solves = sum(row.seconds for row in result.report)
    print(f"\nmodel-level oneshot_prune ({args.method}, sequential): {args.layers} GPT-2-small "
          f"blocks, {len(batches)} batches of {args.batch_size}x{args.seq} tokens "
          f"({len(batches) * args.batch_size} sequences)")
    print(result.summary())
    print(f"total {total:.2f} s: solves {solves:.2f} s, running the calibration batches and "
          f"collecting statistics (compiles included) {total - solves:.2f} s")
    return [{
        "device": device_name, "jax": jax.__version__, "op": f"oneshot_model_{args.method}",
        "layers": args.layers, "seq": args.seq, "sequences": len(batches) * args.batch_size,
        "total_s": total, "solve_s": solves, "collect_s": total - solves,
        "errors": {row.path: row.error for row in result.report},
    }]


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
    parser.add_argument("--layers", type=int, default=2,
                        help="GPT-2-small blocks for the model-level run (0: skip it)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per calibration sequence")
    parser.add_argument("--sequences", type=int, default=32, help="calibration sequences")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    parser.add_argument("--method", default="sparsegpt", choices=("sparsegpt", "wanda", "magnitude"))
    args = parser.parse_args()

    device = jax.devices()[0]
    device_name = getattr(device, "device_kind", str(device))
    print(f"device: {device_name} ({jax.default_backend()}), jax {jax.__version__}, "
          f"block_size={args.block_size}, repeats={args.repeats}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
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
    if args.layers > 0:
        records += collect_and_prune(args, device_name)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.jsonl:
        with open(args.jsonl, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
