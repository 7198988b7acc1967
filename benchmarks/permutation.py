"""Channel permutation search (issue 22) on ResNet-50's full-size tree, on the CPU.

Builds the recipes' NNX ResNet-50 (torchvision layout, 1000 classes; or ``--model``
resnext50_32x4d / xception) abstractly with
``nnx.eval_shape``, fills it with random values (kernels ~ N(0, 1); batch-norm statistics
random too, so that the function check is not trivial), then times

  * `sparse_jax.channel_groups` (the jaxpr walk that finds the coupled axes),
  * `sparse_jax.search_permutations` (2:4, ``--time-limit`` seconds per group at most),
  * `sparse_jax.apply_permutations`,

and prints the kept 2:4 magnitude of the consumers before and after, and the largest
difference of the logits of the permuted and the original model on a small batch
(``--check``, needs one forward pass at 224x224).

Usage: python benchmarks/permutation.py [--model resnet50] [--time-limit 1.0] [--check]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sparse_jax  # noqa: E402
from recipes.vision import models, xception  # noqa: E402


def random_state(abstract_state, seed: int):
    leaves, tree = jax.tree.flatten(abstract_state)
    rng = np.random.default_rng(seed)
    filled = []
    for leaf in leaves:
        value = rng.standard_normal(leaf.shape).astype(np.float32)
        if len(leaf.shape) == 1:  # norms: scales, offsets, means near 0 or 1, positive variances
            value = 1.0 + 0.1 * np.abs(value)
        else:  # He-scaled, so that the logits stay finite through 50 layers
            value *= np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        filled.append(jnp.asarray(value, leaf.dtype))
    return jax.tree.unflatten(tree, filled)


MODELS = {
    "resnet50": lambda: models.ResNet50(num_classes=1000, rngs=nnx.Rngs(0)),
    "resnext50_32x4d": lambda: models.ResNeXt50_32x4d(num_classes=1000, rngs=nnx.Rngs(0)),
    "xception": lambda: xception.Xception(num_classes=1000, rngs=nnx.Rngs(0)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=1.0, help="seconds per group at most")
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--check", action="store_true", help="compare the logits (one forward)")
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    args = parser.parse_args()

    abstract = nnx.eval_shape(MODELS[args.model])
    graphdef, abstract_state = nnx.split(abstract)
    state = random_state(abstract_state, 0)
    leaves = jax.tree.leaves(state)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"tree: {args.model} (recipes/vision), 1000 classes, {len(leaves)} leaves, "
          f"{sum(x.size for x in leaves):,} values (params and batch statistics)")

    def forward(s, x):
        return nnx.merge(graphdef, s)(x, train=False)

    size = 299 if args.model == "xception" else 224
    example = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    start = time.perf_counter()
    coupling = sparse_jax.channel_groups(forward, state, example)
    coupling_s = time.perf_counter() - start
    fixed = [g for g in coupling.groups if not g.permutable]
    windows = sum(g.size < 4 for g in fixed)
    print(f"channel_groups: {coupling_s:.2f} s, {len(coupling.groups)} groups, "
          f"{len(coupling.permutable)} permutable, {len(fixed)} left alone "
          f"({windows} of them under 4 channels: kernel windows, image channels)")
    for g in fixed:
        if g.size >= 4:  # smaller ones are kernel window axes (3x3, 7x7) and image channels
            print(f"  left alone: {g.size} channels ({', '.join(p for p, _ in g.members)}): "
                  f"{g.reason}")

    rules = sparse_jax.rules_from_computation(forward, state, example)
    start = time.perf_counter()
    result = sparse_jax.search_permutations(state, coupling, 2, 4, rules,
                                            time_limit=args.time_limit, patience=args.patience)
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    permuted = sparse_jax.apply_permutations(state, coupling, result)
    jax.block_until_ready(permuted)
    apply_s = time.perf_counter() - start
    print(f"search_permutations: {search_s:.2f} s ({result})")
    print(f"apply_permutations: {apply_s:.2f} s")
    print(f"total (coupling + search + apply): {coupling_s + search_s + apply_s:.2f} s")
    print("per group: channels, consumers, rounds, seconds, kept gain")
    for g in result.groups:
        print(f"  {g.size:5d}  {len(g.consumers):2d}  {g.rounds:4d}  {g.seconds:5.2f}  "
              f"{g.kept_after / g.kept_before - 1:+.2%}  {g.consumers[0]}")
    if args.check:
        x = jnp.asarray(np.random.default_rng(1).standard_normal((2, size, size, 3)), jnp.float32)
        a, b = forward(state, x), forward(permuted, x)
        print(f"max |logits(permuted) - logits(original)|: {float(jnp.max(jnp.abs(a - b))):.3g} "
              f"(max |logits| {float(jnp.max(jnp.abs(a))):.3g})")


if __name__ == "__main__":
    main()
