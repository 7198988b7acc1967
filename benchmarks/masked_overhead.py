"""Cost of `sparse_jax.masked` on a ResNet-50-sized parameter tree (CPU or GPU).

Prints, measured in one run on the current default device:
  * the jitted optimizer-step time of ``masked(inner)`` over bare ``inner``
    (step = ``tx.update`` + ``optax.apply_updates``; goal <= 1.02x), and of
    the same step applied with `sparse_jax.apply_updates` (which also zeroes
    non-finite pruned weights); each step blocked on (latency, Python dispatch
    included) and, as a training loop runs, 10 steps dispatched back to back
    (throughput); a second copy of bare ``inner`` gives the noise floor,
  * the time to compute the 2:4 masks of the whole tree with `sparse_jax.prune`
    (first call, compile included, and steady state),
  * the bits of mask state per pruned weight (goal <= 1 bit), for ResNet-50
    and for a BERT-base tree with Flax ``MultiHeadAttention`` kernels
    (q/k/v ``(768, 12, 64)``, out ``(12, 64, 768)``: 12 heads, not a multiple
    of 8).

Usage: python benchmarks/masked_overhead.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparse_jax


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-50 in Flax layout (HWIO kernels)."""
    shapes = {"stem/conv/kernel": (7, 7, 3, 64), "stem/bn/scale": (64,), "stem/bn/bias": (64,)}
    in_ch = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for block in range(blocks):
            name = f"stage{stage}/block{block}"
            out_ch = width * 4
            convs = [(1, in_ch, width), (3, width, width), (1, width, out_ch)]
            for i, (k, cin, cout) in enumerate(convs):
                shapes[f"{name}/conv{i}/kernel"] = (k, k, cin, cout)
                shapes[f"{name}/bn{i}/scale"] = (cout,)
                shapes[f"{name}/bn{i}/bias"] = (cout,)
            if block == 0:
                shapes[f"{name}/downsample/kernel"] = (1, 1, in_ch, out_ch)
                shapes[f"{name}/downsample_bn/scale"] = (out_ch,)
                shapes[f"{name}/downsample_bn/bias"] = (out_ch,)
            in_ch = out_ch
    shapes["fc/kernel"] = (2048, 1000)
    shapes["fc/bias"] = (1000,)
    return shapes


def bert_base_shapes() -> dict[str, tuple[int, ...]]:
    """BERT-base (12 layers, 768 wide, 12 heads of 64) with DenseGeneral attention kernels."""
    shapes = {
        "embeddings/word": (30522, 768), "embeddings/position": (512, 768),
        "embeddings/token_type": (2, 768), "embeddings/norm/scale": (768,),
        "embeddings/norm/bias": (768,),
    }
    for layer in range(12):
        name = f"layers/{layer}"
        for proj in ("query", "key", "value"):
            shapes[f"{name}/attention/{proj}/kernel"] = (768, 12, 64)
            shapes[f"{name}/attention/{proj}/bias"] = (12, 64)
        shapes[f"{name}/attention/out/kernel"] = (12, 64, 768)
        shapes[f"{name}/attention/out/bias"] = (768,)
        shapes[f"{name}/intermediate/kernel"] = (768, 3072)
        shapes[f"{name}/intermediate/bias"] = (3072,)
        shapes[f"{name}/output/kernel"] = (3072, 768)
        shapes[f"{name}/output/bias"] = (768,)
        for norm in ("attention_norm", "output_norm"):
            shapes[f"{name}/{norm}/scale"] = (768,)
            shapes[f"{name}/{norm}/bias"] = (768,)
    shapes["pooler/kernel"] = (768, 768)
    shapes["pooler/bias"] = (768,)
    return shapes


# q/k/v reduce over the 768 inputs (axis 0), out over each head's 64 (axis 1).
BERT_RULES = [
    (r"embeddings", "skip"),
    (r"attention/(query|key|value)/kernel", 0),
    (r"attention/out/kernel", 1),
]


def mask_state_bits(masks, params) -> tuple[int, int]:
    """(bytes of packed mask state, pruned weights) of ``masked`` initialised on ``params``."""
    state = jax.eval_shape(lambda p, k: sparse_jax.masked(optax.identity(), k).init(p), params, masks)
    packed = [
        leaf.bits for leaf in jax.tree.leaves(
            state.packed_masks, is_leaf=lambda x: isinstance(x, sparse_jax.PackedMask))
    ]
    pruned = sum(int(np.prod(k.shape)) for k in jax.tree.leaves(masks))
    return sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in packed), pruned


def nest(flat: dict[str, jax.Array]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def random_tree(shapes, seed):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return nest({p: jax.random.normal(k, s) for k, (p, s) in zip(keys, shapes.items())})


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def make_step(tx, apply=None):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        if apply is None:
            return optax.apply_updates(params, updates), state
        return apply(params, updates, state), state

    return jax.jit(step, donate_argnums=(0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant (median)")
    args = parser.parse_args()

    shapes = resnet50_shapes()
    params = random_tree(shapes, 0)
    grads = random_tree(shapes, 1)
    total = sum(int(np.prod(s)) for s in shapes.values())
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"tree: ResNet-50 shapes, {len(shapes)} leaves, {total:,} parameters")

    first = timed(lambda p: sparse_jax.prune(p)[1], params)
    steady = statistics.median(timed(lambda p: sparse_jax.prune(p)[1], params) for _ in range(5))
    pruned, masks = sparse_jax.prune(params)
    pruned_count = sum(int(k.size) for k in jax.tree.leaves(masks))

    rows = []
    for name, make_inner in (
        ("sgd+momentum", lambda: optax.sgd(0.1, momentum=0.9)),
        ("adamw", lambda: optax.adamw(1e-3, weight_decay=1e-4)),
    ):
        variants = {
            "bare": make_inner(),
            "bare_again": make_inner(),
            "masked": sparse_jax.masked(make_inner(), masks),
            "masked_apply": sparse_jax.masked(make_inner(), masks),
        }
        steps = {
            k: make_step(tx, sparse_jax.apply_updates if k == "masked_apply" else None)
            for k, tx in variants.items()
        }
        carries = {
            k: (jax.tree.map(jnp.copy, pruned), tx.init(pruned)) for k, tx in variants.items()
        }
        wall: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        for i in range(args.repeats + 3):  # interleaved, so drift hits all alike; the order
            for k in order if i % 2 else order[::-1]:  # reversed every other round (position)
                start, start_cpu = time.perf_counter(), time.process_time()
                carries[k] = jax.block_until_ready(steps[k](*carries[k], grads))
                if i >= 3:
                    wall[k].append(time.perf_counter() - start)
                    cpu[k].append(time.process_time() - start_cpu)
        piped: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(max(args.repeats // 3, 3)):  # 10 steps in flight, as in training
            for k in order if i % 2 else order[::-1]:
                start = time.perf_counter()
                for _ in range(10):
                    carries[k] = steps[k](*carries[k], grads)
                carries[k] = jax.block_until_ready(carries[k])
                piped[k].append((time.perf_counter() - start) / 10)
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        med_piped = {k: statistics.median(v) for k, v in piped.items()}
        rows.append((name, med["bare"] * 1e3, med["masked"] * 1e3, med["masked"] / med["bare"],
                     med_cpu["bare"] * 1e3, med_cpu["masked"] * 1e3,
                     med_cpu["masked"] / med_cpu["bare"],
                     med_cpu["masked_apply"] / med_cpu["bare"],
                     med_piped["masked"] / med_piped["bare"],
                     med_piped["bare_again"] / med_piped["bare"],
                     min(wall["masked"]) / min(wall["bare"]),
                     min(wall["bare_again"]) / min(wall["bare"])))

    print()
    print(f"step time, median of {args.repeats} interleaved steps: wall clock, and CPU time of this "
          "process (all its threads; steadier on a shared machine)")
    print(f"{'inner':<14}{'bare ms':>9}{'masked ms':>11}{'ratio':>7}{'bare cpu ms':>13}"
          f"{'masked cpu ms':>15}{'cpu ratio':>11}{'cpu ratio, sparse_jax.apply_updates':>37}"
          f"{'throughput ratio':>18}{'bare again':>12}{'min ratio':>11}{'bare again':>12}")
    for (name, bare, ours, ratio, bare_cpu, ours_cpu, ratio_cpu, apply_cpu, piped, floor,
         fastest, fastest_floor) in rows:
        print(f"{name:<14}{bare:>9.1f}{ours:>11.1f}{ratio:>7.3f}{bare_cpu:>13.1f}{ours_cpu:>15.1f}"
              f"{ratio_cpu:>11.3f}{apply_cpu:>37.3f}{piped:>18.3f}{floor:>12.3f}{fastest:>11.3f}"
              f"{fastest_floor:>12.3f}")
    print("(goal: masked <= 1.02x bare; throughput: 10 steps dispatched back to back, as a "
          "training loop runs; bare again: a second copy of bare inner, the noise floor; min "
          "ratio: the fastest masked step over the fastest bare one, steadier on a shared machine)")
    print()
    print(f"mask computation (prune, whole tree): first call {first:.2f} s (compile included), "
          f"then {steady * 1e3:.0f} ms")
    state_bytes, _ = mask_state_bits(masks, pruned)
    print(f"mask state, ResNet-50: {state_bytes:,} bytes for {pruned_count:,} pruned weights = "
          f"{state_bytes * 8 / pruned_count:.3f} bits per pruned weight (goal <= 1; bool masks "
          f"would be {pruned_count:,} bytes)")
    bert = nest({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in bert_base_shapes().items()})
    bert_masks = jax.eval_shape(lambda p: sparse_jax.prune(p, rules=BERT_RULES)[1], bert)
    bert_bytes, bert_pruned = mask_state_bits(bert_masks, bert)
    print(f"mask state, BERT-base (12-head q/k/v (768, 12, 64), out (12, 64, 768)): "
          f"{bert_bytes:,} bytes for {bert_pruned:,} pruned weights = "
          f"{bert_bytes * 8 / bert_pruned:.3f} bits per pruned weight")


if __name__ == "__main__":
    main()
