"""Kept magnitude of transposable vs plain 2:4 masks on a recipe run's trained dense model.

Reads ``<workdir>/checkpoints/dense/<latest step>/params`` (any recipe's run directory), prunes
it with ``sparse_jax.prune`` (2:4 along each kernel's input axis, the recipes' default rules)
and with ``sparse_jax.prune(transposable=True)`` (2:4 along both axes of every 4x4 block where
both axes divide by 4, the plain mask elsewhere), and prints, over the pruned kernels, the
fraction of the total |w| each mask keeps, overall and for the kernels where the two differ.

Usage: python benchmarks/transposable_kept_magnitude.py RUN_DIR [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sparse_jax  # noqa: E402


def dense_params(workdir: str):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints", "dense")))
    step = manager.latest_step()
    if step is None:
        raise SystemExit(f"{workdir}: no dense checkpoint")
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    manager.close()
    return jax.device_get(restored["params"]), step


def kept(params, masks) -> tuple[float, float]:
    kept_sum = total = 0.0
    for leaf, mask in zip(jax.tree.leaves(params),
                          jax.tree.leaves(masks, is_leaf=lambda x: x is None)):
        if mask is not None:
            magnitude = np.abs(np.asarray(leaf, np.float64))
            kept_sum += float(magnitude[np.asarray(mask)].sum())
            total += float(magnitude.sum())
    return kept_sum, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    params, step = dense_params(args.workdir)
    _, plain = sparse_jax.prune(params)
    _, transposable = sparse_jax.prune(params, transposable=True)
    plain_kept, total = kept(params, plain)
    trans_kept, _ = kept(params, transposable)
    leaves = jax.tree.leaves(params)
    both = [(p, t, x) for p, t, x in zip(jax.tree.leaves(plain, is_leaf=lambda v: v is None),
                                         jax.tree.leaves(transposable, is_leaf=lambda v: v is None),
                                         leaves) if p is not None]
    differ = [(p, t, x) for p, t, x in both if not np.array_equal(np.asarray(p), np.asarray(t))]
    sub_plain = sum(kept(x, p)[0] for p, _, x in differ)
    sub_trans = sum(kept(x, t)[0] for _, t, x in differ)
    sub_total = sum(kept(x, p)[1] for p, _, x in differ)
    result = {"workdir": args.workdir, "dense_step": step, "pruned_kernels": len(both),
              "transposable_kernels": len(differ),
              "kept_fraction_plain_2_4": plain_kept / total,
              "kept_fraction_transposable_2_4": trans_kept / total,
              "kept_fraction_plain_2_4_on_transposable_kernels": sub_plain / sub_total,
              "kept_fraction_transposable_2_4_on_transposable_kernels": sub_trans / sub_total}
    print(f"dense model: {args.workdir}/checkpoints/dense/{step}, {len(both)} pruned kernels, "
          f"{len(differ)} of them with a transposable mask (both axes divide by 4)")
    print(f"kept |w| fraction, all pruned kernels: plain 2:4 {plain_kept / total:.4f}, "
          f"transposable 2:4 {trans_kept / total:.4f}")
    print(f"kept |w| fraction, the transposable kernels only: plain {sub_plain / sub_total:.4f}, "
          f"transposable {sub_trans / sub_total:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
