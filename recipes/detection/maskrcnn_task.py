"""Mask R-CNN (ResNet-50-FPN; COCO 2017 or the built-in digits) as a task: torchvision's
detection reference, every conv and linear kernel pruned 2:4 along its input axis (not the
3-channel stem), scored by pycocotools' bbox AP (the headline) and segm AP of torchvision's
inference (masks pasted on the original image at 0.5).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recipes.detection import (boxes as box_ops, coco_data, coco_eval, digits_detection, maskrcnn,
                               rcnn_ops)
from recipes.engine import checkpointing, cli, workflow
from recipes.engine.workflow import WorkflowConfig
from recipes.vision import input_pipeline, weights


@dataclasses.dataclass(frozen=True)
class MaskRCNNConfig(WorkflowConfig):
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
    # Bookkeeping.
    log_every_steps: int = 20
    checkpoint_every_steps: int = 2000

    @property
    def learning_rate(self) -> float:
        return self.learning_rate_per_16 * self.batch_size / 16

    def model_config(self, num_classes: int):
        fields = {f.name for f in dataclasses.fields(maskrcnn.ModelConfig)}
        shared = {name: getattr(self, name) for name in fields if hasattr(self, name)}
        return maskrcnn.ModelConfig(num_classes=num_classes, dtype=self.compute_dtype, **shared)


def coco_config() -> MaskRCNNConfig:
    """Table 2: torchvision's maskrcnn_resnet50_fpn recipe on COCO 2017 (8 GPUs x 2 images)."""
    return MaskRCNNConfig()


def builtin_config() -> MaskRCNNConfig:
    """The default: the digits set with ResNet-50-FPN scaled down (one bottleneck a stage, 1/8
    width), from scratch on 2 CPU cores (recipes/README.md): no pretrained statistics, so the
    frozen BatchNorms' scale and bias train (each residual branch's last from 0)."""
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


def converged_config(config: MaskRCNNConfig) -> MaskRCNNConfig:
    """``--preset converged``: twice the built-in steps with the lr steps at epochs 13 and 17 of
    26 (the default's 16 and 22 put the second step inside the last quarter: box AP rose 2.7
    there), so that the last quarter runs at the final lr; three box/mask AP evaluations over
    each phase's second half (AP is slow on the CPU)."""
    return config.replace(num_train_steps=2 * config.num_train_steps, lr_step_epochs=(13, 17),
                          control=True, plateau_evals=2)


def smoke_config(config: MaskRCNNConfig) -> MaskRCNNConfig:
    """A tiny model and three steps of every phase (checkpoints, COCO evaluation, plot)."""
    return config.replace(
        num_filters=4, stage_sizes=(1, 1, 1, 1), fpn_channels=8, representation_size=16,
        mask_channels=8, trainable_layers=5, train_norm_affine=True,
        anchor_sizes=(16, 24, 32, 48, 64), canonical_scale=56.0, rpn_pre_nms_top_n_train=40,
        rpn_pre_nms_top_n_test=30, rpn_post_nms_top_n_train=40, rpn_post_nms_top_n_test=30,
        box_batch_size_per_image=32,
        detections_per_img=10, compute_dtype="float32", train_min_sizes=(64,), test_min_size=64,
        max_size=64, canvas=(64, 64), max_boxes=4, batch_size=2, eval_batch_size=8,
        num_train_steps=3, warmup_steps=1, lr_step_epochs=(), log_every_steps=1,
        checkpoint_every_steps=2, max_eval_images=8, builtin_train_images=16,
        builtin_val_images=8, control=True, progress_bar=False, fast_compile=True)


@dataclasses.dataclass
class Data:
    name: str
    train: Any  # coco_data.CocoDetectionSource with masks
    val: Any
    num_classes: int  # with the background


def prepare_data(config: MaskRCNNConfig, workdir: str, log: Callable = print) -> Data:
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
    train = coco_data.CocoDetectionSource(directory, "train2017", skip_empty=True, masks=True)
    val = coco_data.CocoDetectionSource(directory, "val2017", masks=True)
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


def learning_rate_schedule(config: MaskRCNNConfig, total_steps: int):
    """torchvision's detection reference: linear warm-up (``warmup_factor`` -> 1) times x0.1 at
    ``lr_step_epochs`` (at the same fractions of the phase under ``num_train_steps``)."""
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

    def label(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return "frozen" if maskrcnn.frozen_parameter(name, model_config) else "train"

    labels = jax.tree_util.tree_map_with_path(label, params)
    train = optax.chain(optax.add_decayed_weights(config.weight_decay),
                        optax.sgd(learning_rate_schedule(config, total_steps),
                                  momentum=config.momentum))
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def normalize(images, image_hw, dtype):
    """uint8 canvases -> ImageNet-normalised, zero in the padding (as torchvision)."""
    x = input_pipeline.normalize_images(images, coco_data.IMAGENET_MEAN, coco_data.IMAGENET_STD,
                                        jnp.float32)
    rows = jnp.arange(images.shape[1])[None, :, None] < image_hw[:, 0, None, None]
    cols = jnp.arange(images.shape[2])[None, None, :] < image_hw[:, 1, None, None]
    return (x * (rows & cols)[..., None]).astype(dtype)


def make_train_step(graphdef, tx, mesh, **jit_options) -> Callable:
    """A jitted ``(state, batch, step, seed) -> (state, metrics)`` (``workflow.jit_train_step``);
    the sampling randomness comes from ``seed`` and ``step`` (a resumed run repeats it)."""

    def loss_fn(params, state, batch, step, seed):
        key = jax.random.fold_in(jax.random.key(seed), step)
        model = nnx.merge(graphdef, params, state["batch_stats"])
        images = normalize(batch["image"], batch["image_hw"], model.config.dtype)
        parts = maskrcnn.losses(model, key, images, batch["image_hw"], batch["boxes"],
                                batch["labels"], batch["masks"])
        return sum(parts.values()), (parts, {})

    return workflow.jit_train_step(loss_fn, tx, mesh, num_args=2, **jit_options)


def make_inference_fns(graphdef, **jit_options):
    """Jitted ``boxes(params, stats, images, image_hw)`` and ``masks(params, stats, features,
    boxes, labels)`` (`maskrcnn.detect_boxes`, `maskrcnn.detect_masks`)."""

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


def predict(fns, params, batch_stats, data: Data, config: MaskRCNNConfig, model_config):
    """COCO result records (boxes and RLE masks on the original images) for the val split."""
    boxes_fn, masks_fn = fns
    records = []
    num_dets = model_config.detections_per_img
    transform = functools.partial(coco_data.maskrcnn_transform, rng=None,
                                  **_transform_args(config, train=False))
    for batch, count in coco_data.eval_batches(data.val, transform,
                                               batch_size=config.eval_batch_size,
                                               max_images=config.max_eval_images,
                                               num_workers=config.num_workers):
        batch["image_hw"][count:] = batch["image_hw"][0]  # the padding: any valid size
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
        for i in range(count):
            b, s, lab = found[i]
            height, width = (int(v) for v in batch["size"][i])
            resized_h, resized_w = (int(v) for v in batch["image_hw"][i])
            scale = np.asarray([width / resized_w, height / resized_h] * 2, np.float32)
            b = b * scale
            pasted = rcnn_ops.paste_masks(probs[i, :len(b)], b, (height, width)) > 0.5
            rles = [digits_detection.encode_mask(mask) for mask in pasted]
            category_ids = [data.val.category_ids[int(label) - 1] for label in lab]
            records += coco_eval.detection_records([int(batch["image_id"][i])] * len(b),
                                                   category_ids, box_ops.xyxy_to_xywh(b), s, rles)
    return records


class MaskRCNNTask(workflow.Task):
    """COCO 2017 directories (instance masks) or the built-in digits set; bbox AP is the
    headline, mask AP beside it."""

    metric, headline, label = "bbox_ap", "bbox", "bbox"
    config_name = "recipes/detection/maskrcnn_task.py MaskRCNNConfig"
    set_example = "--set train_min_sizes=480,512,544,576,608,640,672,704,736,768,800"
    control_help = "on by default for the built-in set, off for COCO"
    options = (
        cli.COCO_DATA_DIR,
        ("--init-from", "init_from", None, "dense weights instead of dense training: torchvision "
         "maskrcnn_resnet50_fpn weights as .safetensors, or a finished run"),
        cli.batch_size_option("16"), cli.epochs_option("26"), cli.STEPS,
        ("--lr", "learning_rate_per_16", float, "learning rate per 16 images (default 0.02)"),
        cli.workers_option(),
    )

    @staticmethod
    def configs(args: argparse.Namespace, model: str) -> MaskRCNNConfig:
        return coco_data.config_of(args, coco_config, builtin_config)

    smoke_config = staticmethod(smoke_config)
    converged_config = staticmethod(converged_config)
    dataset_of = staticmethod(coco_data.dataset_of)

    def setup(self) -> dict[str, Any]:
        config, mesh, wf = self.config, self.wf.mesh, self.wf
        data = self.data = prepare_data(config, self.workdir)
        self.dataset_name = data.name
        self.model_config = config.model_config(data.num_classes)
        self.model = maskrcnn.create_model(self.model_config, config.seed)
        self.graphdef, params, batch_stats = nnx.split(self.model, nnx.Param, nnx.BatchStat)
        fast = config.fast_compile and mesh.devices.flat[0].platform == "cpu"
        self.jit_options = ({"compiler_options": {"xla_backend_optimization_level": 0}} if fast
                            else {})
        self.fns = make_inference_fns(self.graphdef, **self.jit_options)
        self.steps = workflow.phase_steps(config, len(data.train))
        self.schedule = learning_rate_schedule(config, self.steps)
        num_params = sum(int(x.size) for x in jax.tree.leaves(params))
        self.image_ids = coco_data.evaluated_image_ids(data.val, config.max_eval_images)
        wf.print(f"{config.model}: {num_params:,} parameters, {data.name}: {len(data.train):,} "
                 f"train / {len(self.image_ids):,} evaluated images, {data.num_classes - 1} "
                 f"classes, canvas {tuple(config.canvas)}")
        wf.print(f"{mesh.size} {mesh.devices.flat[0].platform} device(s), global batch "
                 f"{config.batch_size}, {self.steps} steps per phase "
                 f"({self.steps * config.batch_size / len(data.train):.1f} epochs), lr "
                 f"{config.learning_rate:g}, compute {config.compute_dtype}")
        return {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}

    def optimizer(self, params):
        return create_optimizer(self.config, self.steps, params, self.model_config)

    def train_step(self, tx):
        step_fn = make_train_step(self.graphdef, tx, self.wf.mesh, **self.jit_options)

        def train_step(state, batch, step, phase):
            seed = self.config.seed + self.seed_offsets[phase]  # the sampling's seed: the data's
            return step_fn(state, batch, np.int32(step), np.int32(seed))

        return train_step

    def train_batches(self, phase: str, seed: int):
        transform = functools.partial(coco_data.maskrcnn_transform,
                                      **_transform_args(self.config, train=True))
        return coco_data.train_iterator(self.data.train, transform,
                                        batch_size=self.config.batch_size, seed=seed,
                                        num_workers=self.config.num_workers)

    def train_record(self, fetched: list[dict], step: int) -> dict[str, Any]:
        return {"metric": None, "lr": float(self.schedule(step - 1)),
                **{key: float(np.mean([m[key] for m in fetched])) for key in fetched[0]}}

    def evaluate(self, state: dict[str, Any], phase: str) -> dict[str, Any]:
        """bbox and segm APs and COCO summaries (``"bbox"``, ``"bbox_summary"``, ...)."""
        data, config = self.data, self.config
        records = predict(self.fns, state["params"], state["batch_stats"], data, config,
                          self.model_config)
        result: dict[str, Any] = {"detections": len(records), "images": len(self.image_ids)}
        for iou_type in coco_eval.IOU_TYPES:
            summary = coco_eval.evaluate(data.val.annotation_file, records, iou_type,
                                         image_ids=self.image_ids)
            result[iou_type] = summary["AP"]
            result[f"{iou_type}_summary"] = dict(summary)
        return result

    def eval_record(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"split": "eval", "loss": None, "metric": result["bbox"], "segm": result["segm"]}

    def describe(self, result: dict[str, Any]) -> str:
        return f"bbox AP {100 * result['bbox']:.2f}, mask AP {100 * result['segm']:.2f}"

    def load_dense(self, source: str, state: dict[str, Any]):
        """Dense weights: torchvision ``.safetensors`` or a finished run."""
        if source.endswith(".safetensors"):
            maskrcnn.import_torchvision_state_dict(self.model, weights.load_safetensors(source))
            where = f"torchvision weights {source}"
        else:
            params, batch_stats, run = checkpointing.load_dense_weights(source, self.model)
            loaded = nnx.state(self.model, nnx.Any(nnx.Param, nnx.BatchStat))
            nnx.replace_by_pure_dict(loaded, weights._deep_merge(params, batch_stats))
            nnx.update(self.model, loaded)
            where = f"orbax checkpoint {run}"
        _, params, batch_stats = nnx.split(self.model, nnx.Param, nnx.BatchStat)
        return {"params": nnx.to_pure_dict(params),
                "batch_stats": nnx.to_pure_dict(batch_stats)}, where

    def extra_results(self, evals):
        return {"mask_ap": {k: None if v is None else v["segm"] for k, v in evals.items()},
                "coco_summaries": {phase: {k: v for k, v in result.items()
                                           if k.endswith("_summary")}
                                   for phase, result in evals.items() if result is not None},
                "batch_size": self.config.batch_size, "eval_images": evals["sparse"]["images"]}

    def table_rows(self, results):
        return [("mask", results["mask_ap"])]

    def table_note(self, results):
        return (f"COCO AP@[.5:.95] on {results['eval_images']} held-out images, batch "
                f"{results['batch_size']}")


def train_and_evaluate(config: MaskRCNNConfig, workdir: str, **kwargs) -> dict[str, Any]:
    """The workflow with this task (``workflow.train_and_evaluate``)."""
    return workflow.train_and_evaluate(MaskRCNNTask, config, workdir, **kwargs)


def main(model: str, description: str, epilog: str, argv: list[str] | None = None) -> dict:
    return cli.main(MaskRCNNTask, model, description, epilog, argv)
