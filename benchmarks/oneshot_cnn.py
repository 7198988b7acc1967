"""One-shot 2:4 top-1 of an image recipe's built-in default: magnitude alone, + channel
permutation, + batch-norm recalibration, + both (issue 22).

Trains the dense model exactly as the recipe's dense phase does (``recipes/common/train.py``:
same config, data, schedule and checkpoints under ``--workdir``, so a second run reuses them),
then prunes it four ways and evaluates each on the held-out split:

  * magnitude: ``sparse_jax.prune`` (the recipe's prune step);
  * + permutation: `sparse_jax.channel_groups` on the eval computation,
    `sparse_jax.search_permutations`, `sparse_jax.apply_permutations` (params and batch
    statistics), then the same prune;
  * + BN recalibration: `sparse_jax.recalibrate_batch_norm` of the pruned model over
    ``--calibration-images`` training images (training-mode forward, augmented as in training);
  * both;

and with ``--retrain``, runs the recipe's masked retraining phase from the last one.

This uses the recipe's training internals as they were before the recipes redesign (issue 22
asks for ``--permute`` / ``--recalibrate-bn`` in the recipes' prune step; until then this script
measures the same thing).

Usage: python benchmarks/oneshot_cnn.py [--model resnet50|resnext101_32x8d|xception]
           [--workdir /tmp/oneshot_rn50]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sparse_jax  # noqa: E402
from recipes.common import input_pipeline, metrics, model_configs, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--workdir", default="/tmp/oneshot_cnn")
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--time-limit", type=float, default=1.0, help="search seconds per group")
    parser.add_argument("--patience", type=int, default=8, help="search rounds without a gain")
    parser.add_argument("--retrain", action="store_true",
                        help="then the recipe's masked retraining, from permute + recalibrate_bn")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    config = model_configs.base_config(args.model, imagenet=False)  # the built-in default
    config = dataclasses.replace(config, model=args.model, control=False)
    os.makedirs(args.workdir, exist_ok=True)
    train.prepare_workdir(args.workdir, resume=True, overwrite=False)
    mesh = train.create_mesh(1)
    datasets = input_pipeline.create_datasets(config)
    info = datasets.info
    model = train.create_model(config, info)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
    dtype = jnp.dtype(config.compute_dtype)
    eval_step = train.make_eval_step(graphdef, mesh, info, dtype)
    log = metrics.MetricsLog(os.path.join(args.workdir, "metrics.jsonl"))
    wf = train.Workflow(config, args.workdir, mesh, datasets, graphdef, eval_step, log)
    steps = train.phase_num_steps(config, info.num_train)
    tx = train.create_optimizer(config, steps)
    state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params)}
    dense_state, progress = train.run_phase(wf, "dense", state, tx, steps, config.seed,
                                            resume=True)
    params = jax.device_get(dense_state["params"])
    batch_stats = jax.device_get(dense_state["batch_stats"])

    def top1(p, s):
        return train.evaluate(eval_step, p, s, datasets, config, mesh)["top1"]

    def images(batch):
        return input_pipeline.normalize_images(batch["image"], info.mean, info.std, dtype)

    results = {"model": config.model, "dataset": info.name, "dense": top1(params, batch_stats)}
    print(f"{config.model} on {info.name}, dense held-out top-1 {100 * results['dense']:.2f}%",
          flush=True)

    # Channel permutation of the dense model (params and batch statistics together).
    variables = {"params": params, "batch_stats": batch_stats}

    def forward(v, x):
        return nnx.merge(graphdef, v["params"], v["batch_stats"])(x, train=False)

    example = jax.ShapeDtypeStruct((1, *info.image_shape), jnp.float32)
    started = time.perf_counter()
    coupling = sparse_jax.channel_groups(forward, variables, example)
    search = sparse_jax.search_permutations(variables, coupling, config.sparsity_n,
                                            config.sparsity_m, time_limit=args.time_limit,
                                            patience=args.patience)
    permuted = sparse_jax.apply_permutations(variables, coupling, search)
    permute_seconds = time.perf_counter() - started
    print(f"permutation: {len(coupling.permutable)} of {len(coupling.groups)} groups permutable; "
          f"{search}; {permute_seconds:.1f} s", flush=True)
    np.testing.assert_allclose(  # the permuted dense model computes the same function
        forward(permuted, jnp.zeros((2, *info.image_shape))),
        forward(variables, jnp.zeros((2, *info.image_shape))), rtol=1e-3, atol=1e-3)

    iterator = input_pipeline.train_iterator(datasets, batch_size=config.batch_size,
                                             seed=config.seed + 1, num_workers=0)
    calibration = [images(next(iterator)) for _ in
                   range(max(1, args.calibration_images // config.batch_size))]

    def recalibrated(p, s):
        model = nnx.merge(graphdef, p, s)
        started = time.perf_counter()
        sparse_jax.recalibrate_batch_norm(model, calibration,
                                          forward=nnx.jit(lambda m, x: m(x, train=True)))
        print(f"recalibration: {time.perf_counter() - started:.1f} s", flush=True)
        return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    def prune(p):
        return jax.device_get(sparse_jax.prune(p, config.sparsity_n, config.sparsity_m)[0])

    magnitude = prune(params)
    permuted_pruned = prune(permuted["params"])
    both_stats = recalibrated(permuted_pruned, permuted["batch_stats"])
    results["one_shot"] = {
        "magnitude": top1(magnitude, batch_stats),
        "permute": top1(permuted_pruned, permuted["batch_stats"]),
        "recalibrate_bn": top1(magnitude, recalibrated(magnitude, batch_stats)),
        "permute+recalibrate_bn": top1(permuted_pruned, both_stats),
    }
    results["kept_magnitude"] = {"before": search.kept_before, "after": search.kept_after}
    results["calibration_images"] = len(calibration) * config.batch_size
    for name, value in results["one_shot"].items():
        print(f"one-shot 2:4 top-1, {name}: {100 * value:.2f}%", flush=True)
    if args.retrain:  # the recipe's retraining phase, from the permuted, recalibrated model
        pruned, masks = sparse_jax.prune(permuted["params"], config.sparsity_n, config.sparsity_m)
        sparse_tx = sparse_jax.masked(train.create_optimizer(config, steps), masks)
        state = {"params": pruned, "batch_stats": both_stats,
                 "opt_state": sparse_tx.init(pruned), "masks": masks}
        _, progress = train.run_phase(wf, "retrain", state, sparse_tx, steps, config.seed + 1,
                                      resume=True)
        results["sparse_permute+recalibrate_bn"] = progress["eval"]["top1"]
        print(f"retrained 2:4 top-1, permute+recalibrate_bn: "
              f"{100 * results['sparse_permute+recalibrate_bn']:.2f}%", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
