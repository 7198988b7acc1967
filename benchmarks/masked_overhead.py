"""Cost of `sparse_jax.masked` on a ResNet-50-sized parameter tree (CPU or GPU).

Prints, measured in one run on the current default device:
  * the jitted optimizer-step time of ``masked(inner)`` over bare ``inner``
    (step = ``tx.update`` + ``optax.apply_updates``; goal <= 1.02x),
  * the time to compute the 2:4 masks of the whole tree with `sparse_jax.prune`
    (first call, compile included, and steady state),
  * the bytes of mask state per pruned weight (goal <= 1 bit).

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


def make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

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
        variants = {"bare": make_inner(), "masked": sparse_jax.masked(make_inner(), masks)}
        steps = {k: make_step(tx) for k, tx in variants.items()}
        carries = {
            k: (jax.tree.map(jnp.copy, pruned), tx.init(pruned)) for k, tx in variants.items()
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(args.repeats + 3):  # interleaved, so drift hits both alike
            for k in variants:
                start = time.perf_counter()
                carries[k] = jax.block_until_ready(steps[k](*carries[k], grads))
                if i >= 3:
                    times[k].append(time.perf_counter() - start)
        bare, ours = statistics.median(times["bare"]), statistics.median(times["masked"])
        best_ratio = min(times["masked"]) / min(times["bare"])
        state_bytes = sum(
            p.nbytes for p in carries["masked"][1].packed_masks if p is not None
        )
        rows.append((name, bare * 1e3, ours * 1e3, ours / bare, best_ratio, state_bytes))

    print()
    print(f"step time, median of {args.repeats} interleaved steps (and ratio of the fastest steps)")
    print(f"{'inner':<14}{'bare ms':>10}{'masked ms':>11}{'ratio':>8}{'min ratio':>11}  (goal <= 1.02)")
    for name, bare, ours, ratio, best_ratio, _ in rows:
        print(f"{name:<14}{bare:>10.1f}{ours:>11.1f}{ratio:>8.3f}{best_ratio:>11.3f}")
    state_bytes = rows[0][-1]
    print()
    print(f"mask computation (prune, whole tree): first call {first:.2f} s (compile included), "
          f"then {steady * 1e3:.0f} ms")
    print(f"mask state: {state_bytes:,} bytes for {pruned_count:,} pruned weights = "
          f"{state_bytes * 8 / pruned_count:.3f} bits per pruned weight (goal <= 1; bool masks "
          f"would be {pruned_count:,} bytes)")


if __name__ == "__main__":
    main()
