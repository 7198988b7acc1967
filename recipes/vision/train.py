"""The 2:4 workflow shared by every recipe: dense -> prune -> retrain -> evaluate.

``train_and_evaluate(config, workdir)`` runs, as one resumable job:

1. **dense**: train the model with the reference schedule, or load it (``config.init_from``);
2. **prune**: ``sparse_jax.prune`` keeps the 2 largest of every 4 weights along each kernel's
   reduction axis; the pruned model is evaluated as is ("one-shot");
3. **retrain**: the same schedule again, from the pruned weights and a fresh optimizer wrapped in
   ``sparse_jax.masked`` so that every step keeps the weights exactly 2:4;
4. optionally **control**: the dense model trained for the same extra steps without a mask, so
   that "sparse vs dense" compares models that saw the same number of steps.

Training is data parallel over a 1-D ``jax.sharding.Mesh`` of all (or ``config.devices``)
devices: parameters are replicated, each global batch is split along its first axis and
``jit`` inserts the gradient all-reduce. Parameters and optimizer state are float32; the model
computes in ``config.compute_dtype`` (bfloat16 by default).

The run directory gets ``results.json``, ``metrics.jsonl``, ``curves.png``,
``sparsity_report.txt``, ``config.json`` and ``checkpoints/<phase>/<step>/``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sparse_jax
from recipes.engine import checkpointing, metrics
from recipes.vision import input_pipeline, models, weights
from recipes.vision.configs import Config

PHASES = ("dense", "retrain", "control")


class Interrupted(RuntimeError):
    """Raised when ``config.interrupt_after_steps`` simulates a killed run (tests)."""


# ---------------------------------------------------------------------------------------------
# Model, mesh, optimizer
# ---------------------------------------------------------------------------------------------


def create_model(config: Config, info: input_pipeline.DatasetInfo, seed: int | None = None) -> nnx.Module:
    """The NNX model ``config.model`` names, for the dataset's classes and channels."""
    if config.model == "xception":
        from recipes.vision import xception

        return xception.create_model(config, info, seed)
    if config.model not in models.MODELS:
        raise ValueError(f"unknown model {config.model!r}; expected one of {sorted(models.MODELS)}")
    constructor = models.MODELS[config.model]  # functools.partial(ResNet, block, stages, ...)
    block_cls, stage_sizes = constructor.args
    if config.stage_sizes is not None:
        stage_sizes = tuple(config.stage_sizes)
    return models.ResNet(block_cls, stage_sizes, **constructor.keywords,
                         num_classes=info.num_classes, num_filters=config.num_filters,
                         in_channels=info.image_shape[-1], stem=config.stem,
                         small_stem_stride=config.small_stem_stride,
                         dtype=jnp.dtype(config.compute_dtype),
                         rngs=models.init_rngs(config.seed if seed is None else seed))


def create_mesh(num_devices: int = -1) -> Mesh:
    """A 1-D ``("data",)`` mesh over all devices, or the first ``num_devices`` local ones."""
    if num_devices is None or num_devices < 0:
        devices = jax.devices()
    else:
        if jax.process_count() > 1:
            raise ValueError("--devices selects local devices and cannot be used with several "
                             "processes; every process uses all of its devices")
        if num_devices > jax.local_device_count():
            raise ValueError(f"--devices {num_devices}: only {jax.local_device_count()} local "
                             f"devices are visible ({jax.local_devices()[0].platform})")
        devices = jax.local_devices()[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def phase_num_steps(config: Config, num_train_examples: int) -> int:
    """Steps of one training phase: ``num_train_steps`` or ``num_epochs`` of the train split."""
    if config.num_train_steps > 0:
        return config.num_train_steps
    return max(1, int(config.num_epochs * num_train_examples // config.batch_size))


def learning_rate_schedule(config: Config, total_steps: int) -> optax.Schedule:
    """torchvision's StepLR (x``lr_step_factor`` every ``lr_step_epochs``), optional linear warmup.

    The ImageNet recipe has no warmup (as torchvision's reference for batch 256); the built-in
    default ramps up over its first epoch, which a from-scratch bf16 ResNet-50 at lr 0.1 needs.

    Epoch boundaries are placed at the same fractions of the phase when ``num_train_steps``
    overrides the epoch count, so a shortened run keeps the schedule's shape.
    """
    steps_per_epoch = total_steps / config.num_epochs
    boundaries = {}
    epoch = config.lr_step_epochs
    while epoch < config.num_epochs and config.lr_step_epochs > 0:
        boundaries[int(round(epoch * steps_per_epoch))] = config.lr_step_factor
        epoch += config.lr_step_epochs
    schedule = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup_steps <= 0:
        return schedule

    def warmed_up(step):
        # A linear ramp multiplies the step schedule, so the decay epochs do not move.
        return schedule(step) * jnp.minimum(1.0, (step + 1) / warmup_steps)

    return warmed_up


def create_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    """torch.optim.SGD(momentum, weight_decay): decay is added to the gradient before momentum."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate_schedule(config, total_steps), momentum=config.momentum,
                  nesterov=config.nesterov),
    )


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mesh: Mesh,
                    info: input_pipeline.DatasetInfo, compute_dtype: Any) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)`` step, data parallel over ``mesh``.

    ``state`` is ``{"params", "batch_stats", "opt_state"}`` (pure dicts and optax state),
    replicated; ``batch`` is ``{"image": uint8 NHWC, "label": int32}`` split along ``"data"``.
    Batch-norm statistics are those of the whole global batch (the reductions span the mesh),
    so the step computes the same update whatever the number of devices.
    """
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))

    def train_step(state, batch):
        images = input_pipeline.normalize_images(batch["image"], info.mean, info.std, compute_dtype)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["batch_stats"])
            logits = model(images, train=True)
            loss = jnp.mean(cross_entropy_loss(logits, batch["label"]))
            new_batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
            return loss, (logits, new_batch_stats)

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
        new_state = {**state, "params": params, "batch_stats": batch_stats, "opt_state": opt_state}
        return new_state, {"loss": loss, "accuracy": accuracy}

    return jax.jit(train_step, in_shardings=(replicated, data),
                   out_shardings=(replicated, replicated))


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, info: input_pipeline.DatasetInfo,
                   compute_dtype: Any) -> Callable:
    """A jitted ``(params, batch_stats, batch) -> sums`` of loss, top-1 and top-5 hits, count."""
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))

    def eval_step(params, batch_stats, batch):
        images = input_pipeline.normalize_images(batch["image"], info.mean, info.std, compute_dtype)
        logits = nnx.merge(graphdef, params, batch_stats)(images, train=False)
        mask = batch["mask"]
        labels = batch["label"]
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        in_top5 = jnp.any(top5 == labels[:, None], axis=-1)
        return {
            "loss": jnp.sum(cross_entropy_loss(logits, labels) * mask),
            "top1": jnp.sum((jnp.argmax(logits, axis=-1) == labels) * mask),
            "top5": jnp.sum(in_top5 * mask),
            "count": jnp.sum(mask),
        }

    return jax.jit(eval_step, in_shardings=(replicated, replicated, data), out_shardings=replicated)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's part of a global batch -> global arrays split along ``"data"``."""
    sharding = NamedSharding(mesh, P("data"))
    return {key: jax.make_array_from_process_local_data(sharding, value)
            for key, value in batch.items()}


def evaluate(eval_step: Callable, params, batch_stats, datasets: input_pipeline.Datasets,
             config: Config, mesh: Mesh) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean loss over the whole eval split."""
    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    for batch in input_pipeline.eval_batches(datasets, batch_size=config.eval_batch_size,
                                             num_workers=config.num_workers,
                                             max_examples=config.max_eval_examples):
        sums = eval_step(params, batch_stats, shard_batch(batch, mesh))
        for key, value in jax.device_get(sums).items():
            totals[key] += float(value)
    count = max(totals["count"], 1.0)
    return {"top1": totals["top1"] / count, "top5": totals["top5"] / count,
            "loss": totals["loss"] / count, "count": int(totals["count"])}


# ---------------------------------------------------------------------------------------------
# One training phase
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workflow:
    """What every phase shares."""

    config: Config
    workdir: str
    mesh: Mesh
    datasets: input_pipeline.Datasets
    graphdef: nnx.GraphDef
    eval_step: Callable
    log: metrics.MetricsLog
    steps_done: int = 0  # optimizer steps run by this process (for interrupt_after_steps)
    train_steps: dict = dataclasses.field(default_factory=dict)

    def print(self, *args) -> None:
        if jax.process_index() == 0:
            print(*args, flush=True)


def _replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _progress_bar(total: int, initial: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True,
                disable=not enabled or jax.process_index() != 0, file=sys.stdout, leave=True)


def mean_loss_and_accuracy(step_metrics: list[dict], phase: str, step: int) -> tuple[float, float]:
    """Mean train loss and accuracy of the steps since the last log (one device-to-host copy);
    a non-finite loss stops the run, naming the phase and step."""
    fetched = jax.device_get(step_metrics)
    loss = float(np.mean([m["loss"] for m in fetched]))
    accuracy = float(np.mean([m["accuracy"] for m in fetched]))
    if not np.isfinite(loss):
        raise FloatingPointError(f"[{phase}] loss became {loss} at step {step}")
    return loss, accuracy


def run_phase(wf: Workflow, phase: str, state: dict[str, Any], tx: optax.GradientTransformation,
              total_steps: int, data_seed: int, extra_progress: dict[str, Any] | None = None,
              resume: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains ``state`` for ``total_steps`` with ``tx``; checkpoints, logs, evaluates.

    With ``resume``, continues from the phase's latest checkpoint (state, data position and
    step); a phase that already finished is restored without running a step.

    Returns the final state and the final progress dict (which holds ``"eval"``).
    """
    config = wf.config
    iterator = input_pipeline.train_iterator(wf.datasets, batch_size=config.batch_size,
                                             seed=data_seed, num_workers=config.num_workers)
    progress = {"phase": phase, "step": 0, "total_steps": total_steps, "seconds": 0.0,
                "eval": None, **(extra_progress or {})}
    ckpt, state, progress, done = checkpointing.open_phase(
        wf, phase, PHASES, state, progress, total_steps, resume, data_iterator=iterator)
    if done:
        return state, progress
    step = progress["step"]

    # Phases with the same kind of optimizer (dense training and the dense control) share
    # one compiled step.
    step_key = (type(state["opt_state"]).__name__, "masks" in state, total_steps)
    if step_key not in wf.train_steps:
        wf.train_steps[step_key] = make_train_step(wf.graphdef, tx, wf.mesh, wf.datasets.info,
                                                   jnp.dtype(config.compute_dtype))
    train_step = wf.train_steps[step_key]
    steps_per_epoch = max(1, wf.datasets.info.num_train // config.batch_size)
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    started = time.time() - progress["seconds"]
    pending: list[dict[str, jax.Array]] = []
    bar = _progress_bar(total_steps, step, phase, config.progress_bar)
    last_eval, last_train = None, {}

    def save(step: int) -> None:
        progress.update(step=step, seconds=time.time() - started, data_state=iterator.get_state())
        ckpt.save(step, state, progress)

    while step < total_steps:
        batch = shard_batch(next(iterator), wf.mesh)
        state, step_metrics = train_step(state, batch)
        step += 1
        wf.steps_done += 1
        pending.append(step_metrics)
        bar.update(1)
        if step % config.log_every_steps == 0 or step == total_steps:
            loss, accuracy = mean_loss_and_accuracy(pending, phase, step)
            pending = []
            lr = float(learning_rate_schedule(config, total_steps)(step - 1))
            wf.log.write({"phase": phase, "step": step, "split": "train", "loss": loss,
                          "metric": accuracy, "lr": lr, "epoch": step / steps_per_epoch})
            last_train = {"loss": f"{loss:.3f}", "acc": f"{100 * accuracy:.1f}%"}
            bar.set_postfix(**last_train, **({"eval": f"{100 * last_eval:.2f}%"}
                                              if last_eval is not None else {}))
        if step % eval_every == 0 or step == total_steps:
            result = evaluate(wf.eval_step, state["params"], state["batch_stats"], wf.datasets,
                              config, wf.mesh)
            last_eval = result["top1"]
            bar.set_postfix(**last_train, eval=f"{100 * last_eval:.2f}%")
            wf.log.write({"phase": phase, "step": step, "split": "eval", "loss": result["loss"],
                          "metric": result["top1"], "top5": result["top5"],
                          "epoch": step / steps_per_epoch})
            if step == total_steps:
                progress["eval"] = result
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
            save(step)
        if 0 < config.interrupt_after_steps <= wf.steps_done and step < total_steps:
            bar.close()
            ckpt.close()
            raise Interrupted(f"[{phase}] stopped after {wf.steps_done} steps "
                              "(interrupt_after_steps)")
    bar.close()
    ckpt.close()
    return state, progress


# ---------------------------------------------------------------------------------------------
# The workflow
# ---------------------------------------------------------------------------------------------


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "results.json", "curves.png", "sparsity_report.txt")


def prepare_workdir(workdir: str, resume: bool, overwrite: bool,
                    outputs: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """Creates ``workdir``; a finished run's ``outputs`` are removed (or an unfinished run's, with
    ``overwrite``) unless resuming. An unfinished run is never lost silently."""
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and not resume:
        finished = os.path.exists(os.path.join(workdir, "results.json"))
        if not (finished or overwrite):
            raise FileExistsError(
                f"{workdir} holds an unfinished run; pass --resume to continue it, or "
                "--overwrite to start again")
        if jax.process_index() == 0:
            for name in outputs:
                path = os.path.join(workdir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
    os.makedirs(workdir, exist_ok=True)


def exactly_masked(params, masks) -> bool:
    """Whether ``params`` already equal ``sparse_jax.apply_masks(params, masks)``, bit for bit
    (every pruned weight is exactly zero after retraining)."""
    remasked = jax.jit(sparse_jax.apply_masks)(params, masks)
    return all(np.array_equal(p, a) for p, a in zip(
        jax.device_get(jax.tree.leaves(params)), jax.device_get(jax.tree.leaves(remasked))))


def run_facts(started: float, mesh: Mesh) -> dict[str, Any]:
    """The ``results.json`` fields every recipe shares: seconds since ``started``, where it ran."""
    return {"seconds": round(time.time() - started, 1), "devices": mesh.size,
            "platform": mesh.devices.flat[0].platform, "jax": jax.__version__}


def write_run_outputs(workdir: str, results: dict[str, Any], report: sparse_jax.SparsityReport,
                      plot: Callable[[str], None]) -> None:
    """``sparsity_report.txt``, ``curves.png`` (drawn by ``plot(path)``) and ``results.json``,
    written by the main process only."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "sparsity_report.txt"), "w") as f:
        f.write(str(report) + "\n")
    plot(os.path.join(workdir, "curves.png"))
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


def _pretty(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.2f}"


def train_and_evaluate(config: Config, workdir: str, *, resume: bool = False,
                       overwrite: bool = False) -> dict[str, Any]:
    """Runs dense -> prune (one-shot eval) -> masked retrain (-> dense control) -> evaluate.

    Args:
        config: the run's configuration.
        workdir: output directory (results.json, metrics.jsonl, curves.png, checkpoints/).
        resume: continue from the checkpoints in ``workdir``; gives the same result as an
            uninterrupted run.
        overwrite: start again even if ``workdir`` holds an unfinished run.

    Returns:
        The dict written to ``results.json``.
    """
    started = time.time()
    if config.distributed:
        jax.distributed.initialize()
    prepare_workdir(workdir, resume, overwrite)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())
    mesh = create_mesh(config.devices)
    if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
        raise ValueError(f"batch_size {config.batch_size} and eval_batch_size "
                         f"{config.eval_batch_size} must be multiples of the {mesh.size} devices")
    datasets = input_pipeline.create_datasets(config)
    info = datasets.info
    model = create_model(config, info)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
    eval_step = make_eval_step(graphdef, mesh, info, jnp.dtype(config.compute_dtype))
    log = metrics.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    wf = Workflow(config, workdir, mesh, datasets, graphdef, eval_step, log)
    steps = phase_num_steps(config, info.num_train)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    wf.print(f"{config.model}: {num_params:,} parameters, {info.name}: {info.num_train:,} train / "
             f"{info.num_eval:,} held-out images {info.image_shape}, {info.num_classes} classes")
    wf.print(f"{mesh.size} {mesh.devices.flat[0].platform} device(s), global batch "
             f"{config.batch_size}, {steps} steps per phase "
             f"({steps * config.batch_size / info.num_train:.1f} epochs), lr {config.learning_rate:g}, "
             f"compute {config.compute_dtype}")

    # 1. Dense.
    if config.init_from:
        description = weights.init_model_from(model, config.init_from)
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
        wf.print(f"[dense] loaded {description}")
        dense_steps = 0
        dense_state = _replicate({"params": params, "batch_stats": batch_stats}, mesh)
        dense_eval = evaluate(eval_step, dense_state["params"], dense_state["batch_stats"],
                              datasets, config, mesh)
        log.write({"phase": "dense", "step": 0, "split": "eval", "loss": dense_eval["loss"],
                   "metric": dense_eval["top1"], "top5": dense_eval["top5"]})
        dense_seconds = 0.0
    else:
        tx = create_optimizer(config, steps)
        state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params)}
        dense_state, progress = run_phase(wf, "dense", state, tx, steps, config.seed, resume=resume)
        dense_eval, dense_steps, dense_seconds = progress["eval"], steps, progress["seconds"]
    wf.print(f"[dense] held-out top-1 {100 * dense_eval['top1']:.2f}%")

    # 2. Prune 2:4 and evaluate as is.
    pruned_params, masks = jax.jit(functools.partial(
        sparse_jax.prune, n=config.sparsity_n, m=config.sparsity_m))(dense_state["params"])
    one_shot = evaluate(eval_step, pruned_params, dense_state["batch_stats"], datasets, config, mesh)
    if not any(r["phase"] == "one_shot" for r in log.read()):  # a resumed run logged it already
        log.write({"phase": "one_shot", "step": 0, "split": "eval", "loss": one_shot["loss"],
                   "metric": one_shot["top1"], "top5": one_shot["top5"]})
    wf.print(f"[prune] {config.sparsity_n}:{config.sparsity_m} one-shot held-out top-1 "
             f"{100 * one_shot['top1']:.2f}%")

    # 3. Retrain with the mask fixed, same schedule, fresh optimizer.
    sparse_tx = sparse_jax.masked(create_optimizer(config, steps), masks)
    sparse_state = {"params": pruned_params, "batch_stats": dense_state["batch_stats"],
                    "opt_state": sparse_tx.init(pruned_params), "masks": masks}
    sparse_state, progress = run_phase(wf, "retrain", sparse_state, sparse_tx, steps,
                                       config.seed + 1, resume=resume)
    sparse_eval, retrain_seconds = progress["eval"], progress["seconds"]
    final_params = sparse_state["params"]
    exactly_sparse = exactly_masked(final_params, masks)
    wf.print(f"[retrain] held-out top-1 {100 * sparse_eval['top1']:.2f}% "
             f"(weights exactly {config.sparsity_n}:{config.sparsity_m}: {exactly_sparse})")

    # 4. Dense control: the same extra steps without a mask.
    control_eval, control_seconds = None, 0.0
    if config.control:
        control_tx = create_optimizer(config, steps)
        control_state = {"params": dense_state["params"], "batch_stats": dense_state["batch_stats"],
                         "opt_state": control_tx.init(dense_state["params"])}
        _, progress = run_phase(wf, "control", control_state, control_tx, steps, config.seed + 1,
                                resume=resume)
        control_eval, control_seconds = progress["eval"], progress["seconds"]
        wf.print(f"[control] held-out top-1 {100 * control_eval['top1']:.2f}%")

    report = sparse_jax.sparsity_report(final_params, masks, config.sparsity_n, config.sparsity_m)
    results = {
        "model": config.model,
        "dataset": info.name,
        "metric": "top1",
        "dense": dense_eval["top1"],
        "one_shot": one_shot["top1"],
        "sparse": sparse_eval["top1"],
        "control": None if control_eval is None else control_eval["top1"],
        "top5": {"dense": dense_eval["top5"], "one_shot": one_shot["top5"],
                 "sparse": sparse_eval["top5"],
                 "control": None if control_eval is None else control_eval["top5"]},
        "steps": {"dense": dense_steps, "retrain": steps, "control": steps if config.control else None},
        "batch_size": config.batch_size,
        "num_params": int(num_params),
        "eval_examples": sparse_eval["count"],
        "exactly_nm_sparse": exactly_sparse,
        "training_seconds": round(dense_seconds + retrain_seconds + control_seconds, 1),
        **run_facts(started, mesh),
    }
    write_run_outputs(workdir, results, report, lambda path: metrics.plot_curves(
        log.read(), path, f"{config.model} on {info.name}: dense -> 2:4 prune -> retrain"))
    if config.export_onnx and jax.process_index() == 0:
        export_onnx(config, info, final_params, sparse_state["batch_stats"], config.export_onnx)
        wf.print(f"[export] final {config.sparsity_n}:{config.sparsity_m} model -> "
                 f"{config.export_onnx} (check: sparse-jax-inspect {config.export_onnx})")
    wf.print("")
    wf.print(report_summary(report, os.path.join(workdir, "sparsity_report.txt")))
    wf.print("")
    wf.print(results_table(results))
    wf.print(f"\nwrote {workdir}/results.json, metrics.jsonl, curves.png, sparsity_report.txt, "
             f"checkpoints/ (sparse model: checkpoints/retrain/{steps})")
    return results


def export_onnx(config: Config, info: input_pipeline.DatasetInfo, params, batch_stats,
                path: str) -> None:
    """Writes the model with ``params`` to ONNX: eval mode, float32, normalized NHWC input."""
    import sparse_jax.export  # needs the export extra (jax2onnx)

    # Exported in float32: TensorRT picks its own precision (--fp16), onnxruntime runs it as is.
    graphdef, _, _ = nnx.split(create_model(config.replace(compute_dtype="float32"), info),
                               nnx.Param, nnx.BatchStat)
    model = nnx.merge(graphdef, jax.device_get(params), jax.device_get(batch_stats))
    example = jax.ShapeDtypeStruct((1, *info.image_shape), jnp.float32)
    sparse_jax.export.to_onnx(model, [example], path, input_names=["image"])


def report_summary(report: sparse_jax.SparsityReport, table_path: str) -> str:
    """The sparsity report in a few lines: what was pruned, which kernels stayed dense and why."""
    pruned = [r for r in report.rows if r.pruned]
    dense_kernels = [r for r in report.rows if not r.pruned and len(r.shape) >= 2]
    small = [r for r in report.rows if not r.pruned and len(r.shape) < 2]
    lines = [f"sparsity report: {len(pruned)} kernels pruned to {report.n}:{report.m}, "
             f"{len(dense_kernels)} kernel(s) kept dense, {len(small)} biases/norm parameters dense"]
    lines += [f"  kept dense: {r.path} {'x'.join(map(str, r.shape))}: {r.reason}"
              for r in dense_kernels]
    lines.append("  " + str(report).splitlines()[-1])  # the report's own totals line
    lines.append(f"  per-leaf table: {table_path}")
    return "\n".join(lines)


def results_table(results: dict[str, Any]) -> str:
    """A Table-2 style row: dense / one-shot 2:4 / retrained 2:4 (/ dense control) top-1."""
    header = ("| model | dataset | dense top-1 | 2:4 one-shot | 2:4 retrained | dense control |\n"
              "|---|---|---|---|---|---|")
    row = (f"| {results['model']} | {results['dataset']} | {_pretty(results['dense'])} | "
           f"{_pretty(results['one_shot'])} | {_pretty(results['sparse'])} | "
           f"{_pretty(results['control'])} |")
    steps = results["steps"]
    note = (f"steps: dense {steps['dense']}, retrain {steps['retrain']}"
            + (f", control {steps['control']}" if steps["control"] else "")
            + f" (batch {results['batch_size']}); held-out images: {results['eval_examples']}; "
              f"{results['seconds']:.0f} s on {results['devices']} {results['platform']} device(s)")
    return "\n".join([header, row, note])
