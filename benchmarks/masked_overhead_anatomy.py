"""Where the cost of `sparse_jax.masked(adamw)` comes from, one mask placement at a time.

Each variant is an AdamW step over the ResNet-50 tree of `masked_overhead.py`, written out by
hand (``tx.update`` + ``params + updates`` in one jitted function, state donated, 5 steps in
flight per sample, medians of interleaved samples), differing only in where a mask is applied
and what it is read from:

  * ``bare``: no mask; ``bare again``: a second copy (the noise floor);
  * ``sparse_jax.masked``: the library's step;
  * ``bits grad``, ``bits final``, ``bits both``: the packed bits of the state (1 bit a weight)
    unpacked and applied to the gradient before AdamW (the zeroed gradient that keeps the moments
    of pruned weights 0), to the final update only (``where(mask, u, -p)``), or to both (what
    ``masked`` does);
  * ``bool both``, ``bool final``: the same with an unpacked bool mask (1 byte a weight);
  * ``iota both``: a 2:4 pattern computed from the position (no mask in memory at all);
  * ``p != 0 final``: the mask read from the params' own zeros, in the final update only (the
    one fusion that reads the params anyway). Not a usable design (a kept weight that reaches
    exactly 0 would be pruned for good); it shows what a mask that costs no memory stream would
    cost there.

The ratios tell whether the overhead follows the bytes a mask adds or the extra operand a
fusion reads. Usage: python benchmarks/masked_overhead_anatomy.py [--samples 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import sparse_jax
from sparse_jax import _packing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from masked_overhead import random_tree, resnet50_shapes  # noqa: E402

# variant -> (where the mask comes from, where it is applied); None: the library's own step.
VARIANTS = {
    "bare": ("none", ()), "sparse_jax.masked": None,
    "bits grad": ("bits", ("grad",)), "bits final": ("bits", ("final",)),
    "bits both": ("bits", ("grad", "final")), "bool both": ("bool", ("grad", "final")),
    "bool final": ("bool", ("final",)), "iota both": ("iota", ("grad", "final")),
    "p != 0 final": ("params", ("final",)), "bare again": ("none", ()),
}


def inner() -> optax.GradientTransformation:
    return optax.adamw(1e-3, weight_decay=1e-4)


def _split(shape, axis):  # the packed axis as (bytes, 8 bits)
    return shape[:axis] + (shape[axis] // 8, 8) + shape[axis + 1:]


def shift_unpack(bits, shape):
    """`_packing.unpack_bits` by a shift instead of a bit test (packed along an axis only)."""
    axis = _packing.packed_axis(shape)
    split = _split(shape, axis)
    spread = jnp.broadcast_to(jnp.expand_dims(bits, axis + 1), split)
    shift = jax.lax.broadcasted_iota(jnp.uint8, split, axis + 1)
    return (jax.lax.shift_right_logical(spread, shift) & 1).astype(bool).reshape(shape)


def sign_bit_unpack(bits, shape):
    """`_packing.unpack_bits` with each bit moved to the sign of a 32-bit lane."""
    axis = _packing.packed_axis(shape)
    split = _split(shape, axis)
    spread = jnp.broadcast_to(jnp.expand_dims(bits, axis + 1), split).astype(jnp.int32)
    shift = 31 - jax.lax.broadcasted_iota(jnp.int32, split, axis + 1)
    return ((spread << shift) < 0).reshape(shape)


# Mask sources that unpack the packed bits (one operand per pruned leaf, 1 bit a weight).
UNPACKINGS = {"bits": _packing.unpack_bits, "shift": shift_unpack, "sign bit": sign_bit_unpack}


def hand_written_step(source: str, where: tuple[str, ...], shapes: list[tuple[int, ...]],
                      name: str = "step"):
    """``(params, state, grads, mask operands) -> (params, state)``: the mask from ``source``
    applied at ``where`` ("grad" and/or "final"); ``name`` names XLA's module."""
    tx = inner()

    def masks_of(operands, params):
        if source in UNPACKINGS:
            return [None if b is None else UNPACKINGS[source](b, s)
                    for b, s in zip(operands, shapes)]
        if source == "iota":  # keeps entries 0, 1 of every 4 along the input axis
            return [None if b is None else
                    jax.lax.broadcasted_iota(jnp.int32, s, len(s) - 2 if len(s) > 1 else 0) % 4 < 2
                    for b, s in zip(operands, shapes)]
        if source == "params":
            return [None if b is None else p != 0 for b, p in zip(operands, params)]
        return operands  # bool

    def step(params, state, grads, operands):
        masks = masks_of(operands, params) if where else [None] * len(params)
        if "grad" in where:
            grads = [g if m is None else jnp.where(m, g, 0.0) for g, m in zip(grads, masks)]
        updates, state = tx.update(grads, state, params)
        if "final" in where:
            updates = [u if m is None else jnp.where(m, u, -p)
                       for u, p, m in zip(updates, params, masks)]
        return [p + u for p, u in zip(params, updates)], state

    step.__name__ = name
    return jax.jit(step, donate_argnums=(0, 1)), tx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="timed samples per variant")
    args = parser.parse_args()

    shapes_by_path = resnet50_shapes()
    params = random_tree(shapes_by_path, 0)
    grads = jax.tree.leaves(random_tree(shapes_by_path, 1))
    pruned, mask_tree = sparse_jax.prune(params)
    leaves = jax.tree.leaves(pruned)
    masks = jax.tree.leaves(mask_tree, is_leaf=lambda x: x is None)
    shapes = [tuple(x.shape) for x in leaves]
    bits = [None if m is None else _packing.pack_bits(m) for m in masks]
    bools = [None if m is None else jnp.asarray(m) for m in masks]

    steps, carries, operands = {}, {}, {}
    for variant in VARIANTS:
        if VARIANTS[variant] is None:
            tx = sparse_jax.masked(inner(), mask_tree)

            def library_step(p, s, g, _, tx=tx):
                updates, s = tx.update(g, s, p)
                return optax.apply_updates(p, updates), s

            steps[variant] = jax.jit(library_step, donate_argnums=(0, 1))
            carries[variant] = (jax.tree.map(jnp.copy, pruned), tx.init(pruned))
            operands[variant] = None
            continue
        steps[variant], tx = hand_written_step(*VARIANTS[variant], shapes)
        copied = [jnp.copy(x) for x in leaves]
        carries[variant] = (copied, tx.init(copied))
        operands[variant] = bools if VARIANTS[variant][0] == "bool" else bits
    step_grads = {v: jax.tree.unflatten(jax.tree.structure(pruned), grads)
                  if VARIANTS[v] is None else grads for v in VARIANTS}

    order = list(VARIANTS)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for sample in range(args.samples + 2):  # interleaved, order reversed every other sample
        for v in order if sample % 2 else order[::-1]:
            start = time.perf_counter()
            for _ in range(5):
                carries[v] = steps[v](*carries[v], step_grads[v], operands[v])
            carries[v] = jax.block_until_ready(carries[v])
            if sample >= 2:
                times[v].append((time.perf_counter() - start) / 5)
    median = {v: statistics.median(t) for v, t in times.items()}
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}; ResNet-50 tree, {len(leaves)} leaves, "
          f"{sum(x.size for x in leaves):,} parameters, AdamW")
    print(f"step time, median of {args.samples} samples of 5 steps in flight")
    print(f"{'variant':<20}{'ms':>8}{'ratio':>8}")
    for v in VARIANTS:
        print(f"{v:<20}{median[v] * 1e3:>8.2f}{median[v] / median['bare']:>8.3f}")


if __name__ == "__main__":
    main()
