"""The 2:4 workflow for Mask R-CNN: dense -> prune -> retrain, scored with COCO bbox and segm AP.

``train_and_evaluate(config, workdir)`` runs, as one resumable job:

1. **dense**: torchvision's detection reference schedule (SGD momentum 0.9, lr 0.02 per 16
   images, weight decay 1e-4, linear warm-up over the first 1,000 steps from 1/1000, x0.1 at
   epochs 16 and 22 of 26), or weights loaded with ``init_from`` (torchvision's
   ``maskrcnn_resnet50_fpn`` ``.safetensors``, or a finished run);
2. **prune**: ``sparse_jax.prune``: every conv and linear kernel of the backbone, FPN, RPN head,
   box and mask heads keeps the 2 largest of every 4 weights along its input axis (the
   3-channel stem conv cannot be; biases and frozen-BatchNorm parameters are not kernels). The
   pruned model is evaluated as is (one-shot);
3. **retrain**: the same schedule again from the pruned weights, a fresh optimizer wrapped in
   ``sparse_jax.masked`` (every step keeps the weights exactly 2:4);
4. optionally **control**: the dense model trained as many more steps without a mask.

Evaluation is torchvision's inference (proposals 1000, score > 0.05, NMS 0.5 per class, 100
detections, masks pasted on the original image and thresholded at 0.5) and pycocotools' bbox and
segm AP (``coco_eval``). The run directory gets ``results.json``, ``metrics.jsonl``,
``curves.png``, ``sparsity_report.txt``, ``config.json`` and ``checkpoints/<phase>/<step>/``.
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

PHASES = ("dense", "retrain", "control")
METRIC_NAMES = ("bbox", "segm")


@dataclasses.dataclass(frozen=True)
class MaskRCNNConfig:
    """Everything a run depends on (``--set FIELD=VALUE`` overrides any field)."""

    model: str = "maskrcnn_rn50"
    # Architecture (see maskrcnn.ModelConfig; defaults: torchvision's maskrcnn_resnet50_fpn).
    num_filters: int = 64
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50's bottlenecks per stage
    fpn_channels: int = 256
    representation_size: int = 1024
    mask_channels: int = 256
    trainable_layers: int = 3
    train_norm_affine: bool = False
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    canonical_scale: float = 224.0
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    detections_per_img: int = 100
    compute_dtype: str = "bfloat16"
    fast_compile: bool = False  # CPU: XLA backend optimisation level 0 (compiles in about 2/3 of
    # the time, but the built-in default's step runs about 3x slower: for the smoke run only)
    # Data.
    data_dir: str | None = None  # COCO 2017 layout; None: the built-in digits set
    train_min_sizes: tuple[int, ...] = (800,)  # torchvision v1: 800; multi-scale: 480..800
    test_min_size: int = 800
    max_size: int = 1333
    canvas: tuple[int, ...] = (1344, 1344)  # fixed padded size (static shapes)
    max_boxes: int = 100  # ground-truth objects per image kept
    num_workers: int = 0
    builtin_train_images: int = 2000
    builtin_val_images: int = 500
    max_eval_images: int = -1
    # Schedule (torchvision references/detection: --lr 0.02 for 16 images, 26 epochs, 16 22).
    batch_size: int = 16
    eval_batch_size: int = 16
    learning_rate_per_16: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    num_epochs: float = 26.0
    lr_step_epochs: tuple[int, ...] = (16, 22)
    warmup_steps: int = 1000
    warmup_factor: float = 1e-3
    num_train_steps: int = -1  # per phase; overrides num_epochs when > 0
    control: bool = False
    # Bookkeeping.
    log_every_steps: int = 20
    checkpoint_every_steps: int = 2000
    max_checkpoints_to_keep: int = 2
    seed: int = 0
    devices: int = -1
    init_from: str | None = None
    progress_bar: bool = True
    distributed: bool = False
    interrupt_after_steps: int = 0  # tests: simulate a killed run
    sparsity_n: int = 2
    sparsity_m: int = 4

    def replace(self, **changes) -> "MaskRCNNConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @property
    def learning_rate(self) -> float:
        return self.learning_rate_per_16 * self.batch_size / 16

    def model_config(self, num_classes: int):
        from recipes.detection import maskrcnn

        fields = {f.name for f in dataclasses.fields(maskrcnn.ModelConfig)}
        shared = {name: getattr(self, name) for name in fields if hasattr(self, name)}
        return maskrcnn.ModelConfig(num_classes=num_classes, dtype=self.compute_dtype, **shared)


def coco_config() -> MaskRCNNConfig:
    """Table 2: torchvision's maskrcnn_resnet50_fpn recipe on COCO 2017 (8 GPUs x 2 images)."""
    return MaskRCNNConfig()


def builtin_config() -> MaskRCNNConfig:
    """The default: the digits detection set (96x96 canvases, 1..4 digits of 14..40 pixels)
    with ResNet-50-FPN scaled down (one bottleneck per stage, 1/8 width; FPN 32 channels, box
    head 128, mask head 32), trained from scratch in minutes on 2 CPU cores.

    From scratch there are no pretrained statistics for the frozen BatchNorms: their scale and
    bias are trained instead (the last one of each residual branch starting at 0), every stage
    trains, anchors are 16..64 pixels (the digits' sizes) and the RoI level mapping's canonical
    size is 56 (a quarter of 224, like the images' scale against COCO's). Proposals (300 / 150),
    sampled RoIs (64, so 16 mask RoIs) and detections (20) are scaled down with the images.
    Multi-scale training: short side 80, 88 or 96. The schedule keeps the reference's shape
    (warm-up, x0.1 at 16/26 and 22/26 of each phase) over 600 steps of 8 images, lr 0.08 per 16
    images; the dense control runs too. XLA compiles at its default optimisation level: level 0
    (``fast_compile``) saves about 7 s a compile but made these steps about 3x slower (1.2 s
    against 0.4 s on the shared 2-core machine).
    """
    return MaskRCNNConfig(
        num_filters=8, stage_sizes=(1, 1, 1, 1), fpn_channels=32, representation_size=128,
        mask_channels=32, trainable_layers=5, train_norm_affine=True,
        anchor_sizes=(16, 24, 32, 48, 64), canonical_scale=56.0, rpn_pre_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_train=300, rpn_post_nms_top_n_test=150,
        box_batch_size_per_image=64, detections_per_img=20, compute_dtype="float32",
        fast_compile=False, train_min_sizes=(80, 88, 96), test_min_size=96, max_size=96,
        canvas=(96, 96), max_boxes=8, batch_size=8, eval_batch_size=50,
        learning_rate_per_16=0.08, num_epochs=26.0, lr_step_epochs=(16, 22), warmup_steps=50,
        num_train_steps=600, control=True, log_every_steps=25, checkpoint_every_steps=200,
        max_eval_images=250)


def smoke_config(config: MaskRCNNConfig) -> MaskRCNNConfig:
    """A tiny model and three steps of every phase (checkpoints, COCO evaluation, plot)."""
    return config.replace(
        num_filters=4, stage_sizes=(1, 1, 1, 1), fpn_channels=8, representation_size=16, mask_channels=8,
        trainable_layers=5, train_norm_affine=True, anchor_sizes=(16, 24, 32, 48, 64),
        canonical_scale=56.0, rpn_pre_nms_top_n_train=40, rpn_pre_nms_top_n_test=30,
        rpn_post_nms_top_n_train=40, rpn_post_nms_top_n_test=30, box_batch_size_per_image=32,
        detections_per_img=10, compute_dtype="float32", train_min_sizes=(64,), test_min_size=64,
        max_size=64, canvas=(64, 64), max_boxes=4, batch_size=2, eval_batch_size=8,
        num_train_steps=3, warmup_steps=1, lr_step_epochs=(), log_every_steps=1,
        checkpoint_every_steps=2, max_eval_images=8, builtin_train_images=16,
        builtin_val_images=8, control=True, progress_bar=False, fast_compile=True)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    name: str
    train: Any  # maskrcnn_data.MaskSource
    val: Any
    num_classes: int  # with the background


def prepare_data(config: MaskRCNNConfig, workdir: str, log: Callable = print) -> Data:
    from recipes.detection import digits_detection, maskrcnn_data

    if config.data_dir:
        directory, name = config.data_dir, "coco2017"
    else:
        spec = digits_detection.DigitsSpec(num_train_images=config.builtin_train_images,
                                           num_val_images=config.builtin_val_images)
        # Next to the run directory, one per size, so runs of the same size share it.
        directory = digits_detection.get_coco_directory(
            os.path.join(os.path.dirname(os.path.abspath(workdir)),
                         f"digits_coco_{spec.num_train_images}_{spec.num_val_images}"),
            spec=spec, log=log)
        name = "digits_detection"
    train = maskrcnn_data.MaskSource(directory, "train2017", skip_empty=True)
    val = maskrcnn_data.MaskSource(directory, "val2017")
    # COCO: torchvision's 91 outputs are indexed by category id; elsewhere labels 1..C.
    num_classes = 91 if config.data_dir else train.num_classes
    if config.data_dir:
        for source in (train, val):
            _labels_as_category_ids(source)
    return Data(name, train, val, num_classes)


def _labels_as_category_ids(source) -> None:
    """torchvision's COCO models predict the category id itself (91 outputs, 0 background)."""
    ids = np.asarray([0] + list(source.category_ids), np.int32)
    for record in source.records:
        record["labels"] = ids[record["labels"]]
    source.category_ids = list(range(1, 91))


def _transform_args(config: MaskRCNNConfig, train: bool) -> dict[str, Any]:
    return {"min_sizes": config.train_min_sizes if train else (config.test_min_size,),
            "max_size": config.max_size, "canvas": tuple(config.canvas),
            "max_boxes": config.max_boxes}


# ---------------------------------------------------------------------------------------------
# Optimizer and steps
# ---------------------------------------------------------------------------------------------


def phase_num_steps(config: MaskRCNNConfig, num_train: int) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    return max(1, int(config.num_epochs * num_train // config.batch_size))


def learning_rate_schedule(config: MaskRCNNConfig, total_steps: int):
    """torchvision's detection reference: linear warm-up (``warmup_factor`` -> 1 over
    ``warmup_steps``) times MultiStepLR (x0.1 at ``lr_step_epochs``, as fractions of the
    phase's epochs when ``num_train_steps`` shortens it)."""
    import jax.numpy as jnp
    import optax

    steps_per_epoch = total_steps / config.num_epochs
    boundaries = {int(round(e * steps_per_epoch)): 0.1 for e in config.lr_step_epochs
                  if e < config.num_epochs}
    steps = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
    warmup = max(1, min(config.warmup_steps, total_steps - 1))

    def schedule(step):
        alpha = jnp.minimum(step / warmup, 1.0)
        return steps(step) * (config.warmup_factor * (1 - alpha) + alpha)

    return schedule


def create_optimizer(config: MaskRCNNConfig, total_steps: int, params, model_config):
    """SGD momentum with weight decay (torch's: decay added to the gradient), frozen stages
    untouched (``optax.set_to_zero``)."""
    import jax
    import optax

    from recipes.detection import maskrcnn

    def label(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return "frozen" if maskrcnn.frozen_parameter(name, model_config) else "train"

    labels = jax.tree_util.tree_map_with_path(label, params)
    train = optax.chain(optax.add_decayed_weights(config.weight_decay),
                        optax.sgd(learning_rate_schedule(config, total_steps),
                                  momentum=config.momentum))
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def normalize(images, image_hw, dtype):
    """uint8 canvases -> ImageNet-normalised, zero in the padding (torchvision normalises, then
    pads with 0)."""
    import jax.numpy as jnp

    from recipes.detection import coco_data
    from recipes.vision import input_pipeline

    x = input_pipeline.normalize_images(images, coco_data.IMAGENET_MEAN, coco_data.IMAGENET_STD,
                                        jnp.float32)
    rows = jnp.arange(images.shape[1])[None, :, None] < image_hw[:, 0, None, None]
    cols = jnp.arange(images.shape[2])[None, None, :] < image_hw[:, 1, None, None]
    return (x * (rows & cols)[..., None]).astype(dtype)


def _compiler_options(config: MaskRCNNConfig, mesh) -> dict[str, Any]:
    if config.fast_compile and mesh.devices.flat[0].platform == "cpu":
        return {"compiler_options": {"xla_backend_optimization_level": 0}}
    return {}


def make_train_step(graphdef, tx, mesh, **jit_options) -> Callable:
    """A jitted ``(state, batch, step, seed) -> (state, metrics)``, data parallel over ``mesh``;
    the sampling randomness comes from ``seed`` and ``step`` (a resumed run repeats it)."""
    import jax
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from recipes.detection import maskrcnn

    def train_step(state, batch, step, seed):
        key = jax.random.fold_in(jax.random.key(seed), step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["batch_stats"])
            images = normalize(batch["image"], batch["image_hw"], model.config.dtype)
            parts = maskrcnn.losses(model, key, images, batch["image_hw"], batch["boxes"],
                                    batch["labels"], batch["masks"])
            return sum(parts.values()), parts

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {**state, "params": params, "opt_state": opt_state}, {"loss": loss, **parts}

    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(train_step, in_shardings=(replicated, data, replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0, **jit_options)


def make_inference_fns(graphdef, **jit_options):
    """Jitted ``boxes(params, stats, images, image_hw)`` and ``masks(params, stats, features,
    boxes, labels)`` (`maskrcnn.detect_boxes`, `maskrcnn.detect_masks`)."""
    import jax
    from flax import nnx

    from recipes.detection import maskrcnn

    @functools.partial(jax.jit, **jit_options)
    def boxes_fn(params, batch_stats, images, image_hw):
        model = nnx.merge(graphdef, params, batch_stats)
        return maskrcnn.detect_boxes(model, normalize(images, image_hw, model.config.dtype),
                                     image_hw)

    @functools.partial(jax.jit, **jit_options)
    def masks_fn(params, batch_stats, features, boxes, labels):
        return maskrcnn.detect_masks(nnx.merge(graphdef, params, batch_stats), features, boxes,
                                     labels)

    return boxes_fn, masks_fn


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Binary ``(D, H, W)`` masks as COCO compressed RLEs (``counts`` a string)."""
    from pycocotools import mask as mask_util

    rles = [mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def predict(fns, params, batch_stats, data: Data, config: MaskRCNNConfig, model_config):
    """COCO result records (boxes and RLE masks on the original images) for the val split."""
    import jax

    from recipes.detection import boxes as box_ops
    from recipes.detection import coco_eval, maskrcnn, maskrcnn_data, rcnn_ops

    boxes_fn, masks_fn = fns
    records = []
    num_dets = model_config.detections_per_img
    for batch in maskrcnn_data.eval_batches(data.val, batch_size=config.eval_batch_size,
                                            max_images=config.max_eval_images,
                                            num_workers=config.num_workers,
                                            **_transform_args(config, train=False)):
        features, scores, boxes, valid = boxes_fn(params, batch_stats, batch["image"],
                                                  batch["image_hw"])
        scores, boxes, valid = jax.device_get((scores, boxes, valid))
        n = len(scores)
        det_boxes = np.zeros((n, num_dets, 4), np.float32)
        det_labels = np.zeros((n, num_dets), np.int32)
        found = []
        for i in range(n):
            b, s, lab = maskrcnn.select_detections(model_config, scores[i], boxes[i], valid[i])
            det_boxes[i, :len(b)], det_labels[i, :len(b)] = b, lab
            found.append((b, s, lab))
        probs = np.asarray(masks_fn(params, batch_stats, features, det_boxes, det_labels))
        for i in range(n):
            if not batch["valid"][i]:
                continue
            b, s, lab = found[i]
            height, width = (int(v) for v in batch["size"][i])
            resized_h, resized_w = (int(v) for v in batch["image_hw"][i])
            scale = np.asarray([width / resized_w, height / resized_h] * 2, np.float32)
            b = b * scale
            rles = encode_masks(rcnn_ops.paste_masks(probs[i, :len(b)], b, (height, width)) > 0.5)
            category_ids = [data.val.category_ids[int(label) - 1] for label in lab]
            records += coco_eval.detection_records([int(batch["image_id"][i])] * len(b),
                                                   category_ids, box_ops.xyxy_to_xywh(b), s, rles)
    return records


def evaluate(fns, params, batch_stats, data: Data, config: MaskRCNNConfig,
             model_config) -> dict[str, Any]:
    """bbox and segm COCO summaries (``{"bbox": AP, "segm": AP, "bbox_summary": {...}, ...}``)."""
    from recipes.detection import coco_eval

    records = predict(fns, params, batch_stats, data, config, model_config)
    image_ids = [r["image_id"] for r in data.val.records]
    if config.max_eval_images > 0:
        image_ids = image_ids[:config.max_eval_images]
    result: dict[str, Any] = {"detections": len(records), "images": len(image_ids)}
    for iou_type in METRIC_NAMES:
        summary = coco_eval.evaluate(data.val.annotation_file, records, iou_type,
                                     image_ids=image_ids)
        result[iou_type] = summary["AP"]
        result[f"{iou_type}_summary"] = dict(summary)
    return result


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workflow:
    config: MaskRCNNConfig
    model_config: Any
    workdir: str
    mesh: Any
    data: Data
    graphdef: Any
    fns: Any
    log: Any  # metrics.MetricsLog
    steps_done: int = 0
    train_steps: dict = dataclasses.field(default_factory=dict)  # compiled, by optimizer kind

    def print(self, *args) -> None:
        import jax

        if jax.process_index() == 0:
            print(*args, flush=True)

    def evaluate(self, params, batch_stats) -> dict[str, Any]:
        return evaluate(self.fns, params, batch_stats, self.data, self.config, self.model_config)


def run_phase(wf: Workflow, phase: str, state: dict[str, Any], tx, total_steps: int,
              data_seed: int, resume: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains ``state`` for ``total_steps``; logs, checkpoints; COCO evaluation at the end."""
    import jax

    from recipes.detection import maskrcnn_data
    from recipes.engine import checkpointing
    from recipes.vision import train as image_train

    config = wf.config
    iterator = maskrcnn_data.train_iterator(wf.data.train, batch_size=config.batch_size,
                                            seed=data_seed, num_workers=config.num_workers,
                                            **_transform_args(config, train=True))
    progress = {"phase": phase, "step": 0, "seconds": 0.0, "eval": None}
    ckpt, state, progress, done = checkpointing.open_phase(
        wf, phase, PHASES, state, progress, total_steps, resume, data_iterator=iterator)
    if done:
        return state, progress

    # Dense training and the control share one compiled step (the seed is an argument).
    step_key = ("masks" in state, total_steps)
    if step_key not in wf.train_steps:
        wf.train_steps[step_key] = make_train_step(wf.graphdef, tx, wf.mesh,
                                                   **_compiler_options(config, wf.mesh))
    train_step = wf.train_steps[step_key]
    schedule = learning_rate_schedule(config, total_steps)
    step, started, pending = progress["step"], time.time() - progress["seconds"], []
    bar = image_train._progress_bar(total_steps, step, phase, config.progress_bar)

    def save(step: int) -> None:
        progress.update(step=step, seconds=time.time() - started, data_state=iterator.get_state())
        ckpt.save(step, state, progress)

    while step < total_steps:
        batch = image_train.shard_batch(next(iterator), wf.mesh)
        state, step_metrics = train_step(state, batch, np.int32(step), np.int32(data_seed))
        step += 1
        wf.steps_done += 1
        pending.append(step_metrics)
        bar.update(1)
        if step % config.log_every_steps == 0 or step == total_steps:
            fetched = jax.device_get(pending)
            pending = []
            record = {key: float(np.mean([m[key] for m in fetched])) for key in fetched[0]}
            if not np.isfinite(record["loss"]):
                raise FloatingPointError(f"[{phase}] loss became {record['loss']} at step {step}")
            wf.log.write({"phase": phase, "step": step, "split": "train", "metric": None,
                          "lr": float(schedule(step - 1)), **record})
            bar.set_postfix(loss=f"{record['loss']:.3f}", mask=f"{record['loss_mask']:.3f}")
        if step == total_steps:
            result = wf.evaluate(state["params"], state["batch_stats"])
            wf.log.write({"phase": phase, "step": step, "split": "eval", "loss": None,
                          "metric": result["bbox"], "segm": result["segm"]})
            progress["eval"] = result
            bar.set_postfix(bbox_ap=f"{100 * result['bbox']:.1f}",
                            segm_ap=f"{100 * result['segm']:.1f}")
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
            save(step)
        if 0 < config.interrupt_after_steps <= wf.steps_done and step < total_steps:
            bar.close()
            ckpt.close()
            raise image_train.Interrupted(f"[{phase}] stopped after {wf.steps_done} steps")
    bar.close()
    ckpt.close()
    return state, progress


def load_dense_weights(source: str, model) -> str:
    """Dense weights into ``model``: torchvision ``.safetensors`` or a finished run."""
    from flax import nnx

    from recipes.detection import maskrcnn
    from recipes.engine import checkpointing
    from recipes.vision import weights

    if source.endswith(".safetensors"):
        maskrcnn.import_torchvision_state_dict(model, weights.load_safetensors(source))
        return f"torchvision weights {source}"
    params, batch_stats, where = checkpointing.load_dense_weights(source, model)
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.replace_by_pure_dict(state, weights._deep_merge(params, batch_stats))
    nnx.update(model, state)
    return f"orbax checkpoint {where}"


# ---------------------------------------------------------------------------------------------
# The workflow
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: MaskRCNNConfig, workdir: str, *, resume: bool = False,
                       overwrite: bool = False) -> dict[str, Any]:
    """dense -> prune (one-shot eval) -> masked retrain (-> dense control); returns results.json."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import sparse_jax
    from recipes.detection import maskrcnn
    from recipes.engine import metrics
    from recipes.vision import train as image_train

    started = time.time()
    if config.distributed:
        jax.distributed.initialize()
    image_train.prepare_workdir(workdir, resume, overwrite)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())
    mesh = image_train.create_mesh(config.devices)
    if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
        raise ValueError(f"batch_size {config.batch_size} and eval_batch_size "
                         f"{config.eval_batch_size} must be multiples of the {mesh.size} devices")
    data = prepare_data(config, workdir)
    model_config = config.model_config(data.num_classes)
    model = maskrcnn.create_model(model_config, config.seed)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
    log = metrics.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    wf = Workflow(config, model_config, workdir, mesh, data, graphdef,
                  make_inference_fns(graphdef, **_compiler_options(config, mesh)), log)
    steps = phase_num_steps(config, len(data.train))
    num_params = sum(int(x.size) for x in jax.tree.leaves(params))
    wf.print(f"{config.model}: {num_params:,} parameters, {data.name}: {len(data.train):,} train / "
             f"{min(len(data.val), config.max_eval_images if config.max_eval_images > 0 else len(data.val)):,}"
             f" evaluated images, {data.num_classes - 1} classes, canvas {tuple(config.canvas)}")
    wf.print(f"{mesh.size} {mesh.devices.flat[0].platform} device(s), global batch "
             f"{config.batch_size}, {steps} steps per phase "
             f"({steps * config.batch_size / len(data.train):.1f} epochs), lr "
             f"{config.learning_rate:g}, compute {config.compute_dtype}")

    # 1. Dense.
    if config.init_from:
        where = load_dense_weights(config.init_from, model)
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
        wf.print(f"[dense] loaded {where}")
        dense_state = {"params": params, "batch_stats": batch_stats}
        dense = wf.evaluate(params, batch_stats)
        log.write({"phase": "dense", "step": 0, "split": "eval", "loss": None,
                   "metric": dense["bbox"], "segm": dense["segm"]})
        dense_steps, dense_seconds = 0, 0.0
    else:
        tx = create_optimizer(config, steps, params, model_config)
        state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params)}
        dense_state, progress = run_phase(wf, "dense", state, tx, steps, config.seed, resume)
        dense, dense_steps, dense_seconds = progress["eval"], steps, progress["seconds"]
    wf.print(f"[dense] bbox AP {100 * dense['bbox']:.2f}, mask AP {100 * dense['segm']:.2f}")

    # 2. Prune 2:4 along every kernel's input axis; evaluate as is.
    prune = functools.partial(sparse_jax.prune, n=config.sparsity_n, m=config.sparsity_m,
                              rules=maskrcnn.PRUNING_RULES)
    pruned_params, masks = jax.jit(prune)(dense_state["params"])
    one_shot = wf.evaluate(pruned_params, dense_state["batch_stats"])
    if not any(r["phase"] == "one_shot" for r in log.read()):
        log.write({"phase": "one_shot", "step": 0, "split": "eval", "loss": None,
                   "metric": one_shot["bbox"], "segm": one_shot["segm"]})
    wf.print(f"[prune] {config.sparsity_n}:{config.sparsity_m} one-shot bbox AP "
             f"{100 * one_shot['bbox']:.2f}, mask AP {100 * one_shot['segm']:.2f}")

    # 3. Retrain with the mask fixed: the same schedule, a fresh optimizer.
    sparse_tx = sparse_jax.masked(create_optimizer(config, steps, pruned_params, model_config),
                                  masks)
    # The train step donates its state: every phase gets its own copies.
    state = {"params": pruned_params,
             "batch_stats": jax.tree.map(jnp.copy, dense_state["batch_stats"]),
             "opt_state": sparse_tx.init(pruned_params), "masks": jax.tree.map(jnp.copy, masks)}
    state, progress = run_phase(wf, "retrain", state, sparse_tx, steps, config.seed + 1, resume)
    sparse, retrain_seconds = progress["eval"], progress["seconds"]
    final_params = state["params"]
    exactly_sparse = image_train.exactly_masked(final_params, masks)
    wf.print(f"[retrain] bbox AP {100 * sparse['bbox']:.2f}, mask AP {100 * sparse['segm']:.2f} "
             f"(weights exactly {config.sparsity_n}:{config.sparsity_m}: {exactly_sparse})")

    # 4. Control: the dense model, as many more steps without a mask.
    control, control_seconds = None, 0.0
    if config.control:
        control_tx = create_optimizer(config, steps, dense_state["params"], model_config)
        state = {"params": jax.tree.map(jnp.copy, dense_state["params"]),
                 "batch_stats": jax.tree.map(jnp.copy, dense_state["batch_stats"]),
                 "opt_state": control_tx.init(dense_state["params"])}
        _, progress = run_phase(wf, "control", state, control_tx, steps, config.seed + 2, resume)
        control, control_seconds = progress["eval"], progress["seconds"]
        wf.print(f"[control] bbox AP {100 * control['bbox']:.2f}, mask AP "
                 f"{100 * control['segm']:.2f}")

    report = sparse_jax.sparsity_report(final_params, masks, config.sparsity_n, config.sparsity_m,
                                        rules=maskrcnn.PRUNING_RULES)
    pick = lambda result, key: None if result is None else result[key]  # noqa: E731
    results = {
        "model": config.model,
        "dataset": data.name,
        "metric": "bbox_ap",
        "dense": dense["bbox"], "one_shot": one_shot["bbox"], "sparse": sparse["bbox"],
        "control": pick(control, "bbox"),
        "mask_ap": {"dense": dense["segm"], "one_shot": one_shot["segm"],
                    "sparse": sparse["segm"], "control": pick(control, "segm")},
        "coco_summaries": {phase: {k: v for k, v in result.items() if k.endswith("_summary")}
                           for phase, result in (("dense", dense), ("one_shot", one_shot),
                                                 ("sparse", sparse), ("control", control))
                           if result is not None},
        "steps": {"dense": dense_steps, "retrain": steps, "control": steps if control else None},
        "batch_size": config.batch_size,
        "num_params": num_params,
        "eval_images": sparse["images"],
        "exactly_nm_sparse": exactly_sparse,
        "training_seconds": round(dense_seconds + retrain_seconds + control_seconds, 1),
        **image_train.run_facts(started, mesh),
    }
    image_train.write_run_outputs(workdir, results, report, lambda path: plot_curves(
        log.read(), path, f"{config.model} on {data.name}: dense -> 2:4 prune -> retrain"))
    wf.print("")
    wf.print(image_train.report_summary(report, os.path.join(workdir, "sparsity_report.txt")))
    wf.print("")
    wf.print(results_table(results))
    wf.print(f"\nwrote {workdir}/results.json, metrics.jsonl, curves.png, sparsity_report.txt, "
             f"checkpoints/ (sparse model: checkpoints/retrain/{steps})")
    return results


def results_table(results: dict[str, Any]) -> str:
    """Table-2 style rows: bbox AP and mask AP, dense / one-shot / retrained / control."""
    def cell(value):
        return "-" if value is None else f"{100 * value:.2f}"

    mask = results["mask_ap"]
    lines = ["| model | dataset | AP | dense | 2:4 one-shot | 2:4 retrained | dense control |",
             "|---|---|---|---|---|---|---|"]
    lines.append(f"| {results['model']} | {results['dataset']} | bbox | {cell(results['dense'])} "
                 f"| {cell(results['one_shot'])} | {cell(results['sparse'])} | "
                 f"{cell(results['control'])} |")
    lines.append(f"| {results['model']} | {results['dataset']} | mask | {cell(mask['dense'])} | "
                 f"{cell(mask['one_shot'])} | {cell(mask['sparse'])} | {cell(mask['control'])} |")
    steps = results["steps"]
    control = f", control {steps['control']}" if steps["control"] else ""
    lines.append(f"COCO AP@[.5:.95] on {results['eval_images']} held-out images; steps: dense "
                 f"{steps['dense']}, retrain {steps['retrain']}{control} (batch "
                 f"{results['batch_size']}); {results['seconds']:.0f} s on {results['devices']} "
                 f"{results['platform']} device(s)")
    return "\n".join(lines)


def plot_curves(records: list[dict[str, Any]], path: str, title: str) -> None:
    """Training loss per phase and the bbox / mask AP after each phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dense": "tab:blue", "retrain": "tab:red", "control": "tab:gray"}
    dense_steps = max((r["step"] for r in records if r["phase"] == "dense"), default=0)
    offsets = {"dense": 0, "retrain": dense_steps, "control": dense_steps, "one_shot": dense_steps}
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    for phase, color in colors.items():
        train = [r for r in records if r["phase"] == phase and r["split"] == "train"]
        if train:
            ax_loss.plot([offsets[phase] + r["step"] for r in train], [r["loss"] for r in train],
                         color=color, lw=1, label=phase)
    for phase, marker in (("dense", "o"), ("one_shot", "x"), ("retrain", "o"), ("control", "s")):
        evals = [r for r in records if r["phase"] == phase and r["split"] == "eval"]
        for r in evals[-1:]:
            x = offsets[phase] + r["step"]
            color = colors.get(phase, "black")
            ax_ap.plot([x], [100 * r["metric"]], marker, color=color, label=f"{phase} bbox")
            ax_ap.plot([x], [100 * r["segm"]], marker, color=color, mfc="none",
                       label=f"{phase} mask")
    for ax in (ax_loss, ax_ap):
        if dense_steps:
            ax.axvline(dense_steps, color="black", lw=0.6, ls=":")
        ax.legend(fontsize=8)
    ax_loss.set(xlabel="step", ylabel="total loss", yscale="log", title="training loss")
    ax_ap.set(xlabel="step", ylabel="COCO AP (%)", title="held-out AP (filled: bbox, open: mask)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser(description: str, epilog: str) -> argparse.ArgumentParser:
    from recipes.engine import cli

    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="COCO 2017 directory (train2017/, val2017/, "
                        "annotations/instances_{train,val}2017.json); selects the full recipe. "
                        "Without it: the built-in digits detection set")
    parser.add_argument("--workdir", help="output directory (default runs/<model>_<dataset>)")
    parser.add_argument("--init-from", help="dense weights instead of dense training: torchvision "
                        "maskrcnn_resnet50_fpn weights as .safetensors, or a finished run")
    parser.add_argument("--batch-size", type=int, help="global batch, split over all devices "
                        "(full recipe: 16; the learning rate scales with it)")
    parser.add_argument("--epochs", type=float, help="epochs of each phase (full recipe: 26)")
    parser.add_argument("--steps", type=int, help="steps of each phase (overrides --epochs)")
    parser.add_argument("--lr", type=float, help="learning rate per 16 images (default 0.02)")
    cli.add_device_arguments(parser, control_default="on by default for the built-in set, off "
                             "for COCO", exported=None)
    cli.add_run_arguments(parser, "recipes/detection/maskrcnn_train.py MaskRCNNConfig",
                          "--set train_min_sizes=480,512,544,576,608,640,672,704,736,768,800")
    return parser


def config_from_args(args: argparse.Namespace, model: str) -> MaskRCNNConfig:
    from recipes.engine import cli

    config = coco_config() if args.data_dir else builtin_config()
    config = config.replace(model=model, data_dir=args.data_dir)
    if args.smoke:
        config = smoke_config(config)
    overrides = {"init_from": args.init_from, "batch_size": args.batch_size,
                 "num_epochs": args.epochs, "num_train_steps": args.steps,
                 "learning_rate_per_16": args.lr, "devices": args.devices,
                 "num_workers": args.workers, "control": args.control}
    return cli.apply_command_line(config, overrides, args)


def main(model: str, description: str, epilog: str, argv: list[str] | None = None) -> dict:
    from recipes.engine import cli

    args = build_parser(description, epilog).parse_args(argv)
    return cli.run(train_and_evaluate, config_from_args(args, model), args, model,
                   "coco" if args.data_dir else "digits")
