"""The machine code that `sparse_jax.masked(adamw)` adds to AdamW's update loop (CPU).

Compiles jitted AdamW steps for one 2:4-pruned ``(3, 3, 256, 256)`` convolution kernel: bare
AdamW; ``masked(adamw)`` with ``optax.apply_updates`` (as ``masked_overhead.py`` times it) and
with `sparse_jax.apply_updates` (which selects after the add); and three hand-written steps that
unpack the same bits other ways. XLA dumps the object code of each fusion; from ``objdump -d``
the script prints the instructions per vector of weights in the inner loop of the fusion that
computes the new params (the one with the square root, where the packed mask is read) and what
each library step adds to bare AdamW's: the mask's work, free of timing noise.

Usage: python benchmarks/masked_update_loop.py [--show]   (needs objdump; runs on the CPU)
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

if __name__ == "__main__":  # before jax is imported; importing this module (tests) dumps nothing
    DUMP = tempfile.mkdtemp(prefix="masked_update_loop_")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"  # the CPU's code, also on a machine with a GPU

import jax  # noqa: E402  (after XLA_FLAGS)
import optax  # noqa: E402

import sparse_jax  # noqa: E402
from sparse_jax import _packing  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import masked_overhead_anatomy as anatomy  # noqa: E402

LANES = {"xmm": 4, "ymm": 8, "zmm": 16}  # float32 entries per vector register
_LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")


STEPS = {  # name: (masked?, apply), the library's steps
    "bare": (False, None),
    "masked": (True, None),
    "masked_sparse_apply": (True, sparse_jax.apply_updates),
}


# Other ways to write the same ``where(mask, u, -p)`` by hand: the anatomy benchmark's steps on
# the library's packed bits, unpacked two other ways, and the mask read from the params' zeros
# (no mask in memory; not a usable design). name: mask source there.
HAND_WRITTEN = {"hand_shift": "shift", "hand_sign_bit": "sign bit", "hand_params_nonzero": "params"}


def compile_steps(shape=(3, 3, 256, 256)) -> None:
    params = {"kernel": jax.random.normal(jax.random.key(0), shape)}
    grads = {"kernel": jax.random.normal(jax.random.key(1), shape)}
    pruned, masks = sparse_jax.prune(params)
    for name, (is_masked, apply) in STEPS.items():
        tx = sparse_jax.masked(anatomy.inner(), masks) if is_masked else anatomy.inner()

        def step(p, s, g, tx=tx, apply=apply):
            updates, s = tx.update(g, s, p)
            if apply is None:
                return optax.apply_updates(p, updates), s
            return apply(p, updates, s), s

        step.__name__ = f"{name}_step"  # names the dumped module
        jax.jit(step, donate_argnums=(0, 1)).lower(pruned, tx.init(pruned), grads).compile()
    leaves = [pruned["kernel"]]
    bits = [_packing.pack_bits(masks["kernel"])]
    for name, source in HAND_WRITTEN.items():
        step, tx = anatomy.hand_written_step(source, ("final",), [shape], name=f"{name}_step")
        step.lower(leaves, tx.init(leaves), [grads["kernel"]], bits).compile()


def innermost_loop(listing: str) -> list[tuple[int, str, str]] | None:
    """In ``objdump -d --no-show-raw-insn`` text, the instructions (address, mnemonic, operands)
    of the tightest loop (a backward jump) around the first ``vsqrtps``; None if there is none."""
    code = [(int(m[1], 16), m[2], m[3]) for m in map(_LINE.match, listing.splitlines()) if m]
    roots = [addr for addr, op, _ in code if op.startswith("vsqrtps")]
    if not roots:
        return None
    best = None
    for addr, op, operands in code:
        target = re.match(r"([0-9a-f]+)\b", operands)
        if op.startswith("j") and target and addr > roots[0] >= int(target[1], 16):
            if best is None or addr - int(target[1], 16) < best[1] - best[0]:
                best = (int(target[1], 16), addr)
    return None if best is None else [ins for ins in code if best[0] <= ins[0] <= best[1]]


def per_vector(loop: list[tuple[int, str, str]]) -> tuple[int, collections.Counter]:
    """(float32 lanes per vector, instructions per vector by mnemonic): one square root per
    vector of weights, so the loop's counts divided by its square roots."""
    roots = [operands for _, op, operands in loop if op.startswith("vsqrtps")]
    lanes = LANES[re.search(r"%([xyz]mm)", roots[0])[1]]
    counts = collections.Counter(op for _, op, _ in loop)
    return lanes, collections.Counter({op: n / len(roots) for op, n in counts.items()})


def update_loop(name: str) -> list[tuple[int, str, str]] | None:
    """The new-params loop of the dumped ``{name}_step`` module."""
    for path in sorted(glob.glob(os.path.join(DUMP, f"*jit_{name}_step*obj-file*.o"))):
        listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path],
                                 capture_output=True, text=True, check=True).stdout
        loop = innermost_loop(listing)
        if loop:
            return loop
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show", action="store_true", help="print the loops")
    args = parser.parse_args()
    if shutil.which("objdump") is None:
        sys.exit("needs objdump (binutils)")
    compile_steps()
    loops = {name: update_loop(name) for name in [*STEPS, *HAND_WRITTEN]}
    if None in loops.values():
        sys.exit(f"no update loop found in the XLA dump ({DUMP}); this jaxlib names its files "
                 "differently")
    print(f"jax {jax.__version__}; AdamW step, one (3, 3, 256, 256) kernel, the new-params loop")
    counts = {}
    for name, loop in loops.items():
        lanes, counts[name] = per_vector(loop)
    bare = sum(counts["bare"].values())
    print(f"{'step':<22}{'instructions per ' + str(lanes) + ' weights':>30}{'ratio':>8}")
    for name, count in counts.items():
        print(f"{name:<22}{sum(count.values()):>30.2f}{sum(count.values()) / bare:>8.3f}")
    for name in list(STEPS)[1:]:  # what the library's masked steps add
        change = {op: counts[name][op] - counts["bare"][op]
                  for op in set(counts["bare"]) | set(counts[name])}
        print(f"{name}, per vector: added", ", ".join(
            f"{op} {n:g}" for op, n in sorted(change.items()) if n > 0) + "; removed " + ", ".join(
            f"{op} {-n:g}" for op, n in sorted(change.items()) if n < 0))
    if args.show:
        for name, loop in loops.items():
            print(f"\n{name}:")
            for addr, op, operands in loop:
                print(f"  {addr:6x}  {op:<12}{operands}")
    shutil.rmtree(DUMP, ignore_errors=True)


if __name__ == "__main__":
    main()
