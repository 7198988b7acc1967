"""Image classification (ResNet-50, ResNeXt-101 32x8d, Xception) as a workflow task:
torchvision's reference training (SGD momentum, step decay, optional warm-up), bf16 compute with
float32 weights, batch-norm statistics of the global batch, held-out top-1 / top-5 per epoch."""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
import sparse_jax
from flax import nnx

from recipes.engine import cli, workflow
from recipes.vision import input_pipeline, models, weights, xception
from recipes.vision.configs import (Config, builtin_config, converged_config, imagenet_config,
                                    smoke_config)


def create_model(config: Config, info: input_pipeline.DatasetInfo):
    """The NNX model ``config.model`` names, for the dataset's classes and channels.

    Xception reads ``num_filters`` as the width of its first convolution (32 when published;
    every width scales with it), ``stem`` "imagenet" as its published stride 2 and
    ``stage_sizes`` ``(k,)`` as ``k`` middle-flow blocks instead of 8.
    """
    common = {"num_classes": info.num_classes, "in_channels": info.image_shape[-1],
              "dtype": jnp.dtype(config.compute_dtype)}
    rngs = models.init_rngs(config.seed)
    if config.model == "xception":
        if config.stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {config.stem!r}")
        if config.stage_sizes is not None and len(config.stage_sizes) != 1:
            raise ValueError("for Xception, stage_sizes is (number of middle-flow blocks,), got "
                             f"{tuple(config.stage_sizes)}")
        middle_blocks = config.stage_sizes[0] if config.stage_sizes else xception.MIDDLE_BLOCKS
        return xception.Xception(
            width_multiplier=config.num_filters / xception.STEM_CHANNELS[0],
            middle_blocks=int(middle_blocks),
            stem_stride=2 if config.stem == "imagenet" else config.small_stem_stride,
            **common, rngs=rngs)
    if config.model not in models.MODELS:
        raise ValueError(f"unknown model {config.model!r}; expected one of {sorted(models.MODELS)}")
    constructor = models.MODELS[config.model]  # functools.partial(ResNet, block, stages, ...)
    block_cls, stage_sizes = constructor.args
    return models.ResNet(block_cls, config.stage_sizes or stage_sizes, **constructor.keywords,
                         num_filters=config.num_filters, stem=config.stem,
                         small_stem_stride=config.small_stem_stride, **common, rngs=rngs)


def learning_rate_schedule(config: Config, total_steps: int) -> optax.Schedule:
    """torchvision's StepLR (x``lr_step_factor`` every ``lr_step_epochs``), optional linear warmup.

    With ``num_train_steps`` the boundaries keep their fractions of the phase (the same shape).
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
                  nesterov=config.nesterov))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_train_step(graphdef, tx, mesh, info: input_pipeline.DatasetInfo, compute_dtype,
                    loss_params=None):
    """A jitted ``(state, batch) -> (state, metrics)`` step (``workflow.jit_train_step``):
    ``batch`` holds uint8 NHWC images and labels. ``loss_params``: what the loss sees instead of
    the params (SR-STE's projection)."""

    def loss_fn(params, state, batch):
        images = input_pipeline.normalize_images(batch["image"], info.mean, info.std, compute_dtype)
        model = nnx.merge(graphdef, params if loss_params is None else loss_params(params),
                          state["batch_stats"])
        logits = model(images, train=True)
        loss = jnp.mean(cross_entropy_loss(logits, batch["label"]))
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
        return loss, ({"accuracy": accuracy},
                      {"batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))})

    return workflow.jit_train_step(loss_fn, tx, mesh, donate=False)


def make_eval_step(graphdef, mesh, info: input_pipeline.DatasetInfo, compute_dtype):
    """A jitted ``(params, batch_stats, batch) -> sums`` of loss, top-1 and top-5 hits, count."""
    replicated, data = workflow.shardings(mesh)

    def eval_step(params, batch_stats, batch):
        images = input_pipeline.normalize_images(batch["image"], info.mean, info.std, compute_dtype)
        logits = nnx.merge(graphdef, params, batch_stats)(images, train=False)
        mask, labels = batch["mask"], batch["label"]
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return {"loss": jnp.sum(cross_entropy_loss(logits, labels) * mask),
                "top1": jnp.sum((jnp.argmax(logits, axis=-1) == labels) * mask),
                "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
                "count": jnp.sum(mask)}

    return jax.jit(eval_step, in_shardings=(replicated, replicated, data), out_shardings=replicated)


class ClassificationTask(workflow.Task):
    """ImageFolder trees (ImageNet) or the built-in MNIST subset; top-1 is the headline."""

    seed_offsets = {"dense": 0, "retrain": 1, "control": 1}
    outputs = ("skipped_images.txt",)
    config_name = "recipes/vision/configs.py"
    set_example = "--set weight_decay=5e-5 --set compute_dtype=float32"
    control_help = "on by default for built-in data, off for ImageNet"
    options = (
        ("--data-dir", "data_dir", None, "ImageNet-style folder with train/<class>/*.JPEG and "
         "val/<class>/*.JPEG; selects the full recipe. Without it: built-in MNIST"),
        ("--init-from", "init_from", None, "dense weights instead of dense training: an orbax "
         "checkpoint (a run directory or checkpoint step) or torchvision weights as "
         ".safetensors with torchvision key names"),
        cli.batch_size_option("256"),
        ("--epochs", "num_epochs", float, "epochs of each phase (dense and retrain; full recipe: "
         "90, lr steps every third of it unless --set lr_step_epochs=)"),
        cli.STEPS,
        ("--lr", "learning_rate_per_256", float, "learning rate per 256 images (default 0.1)"),
        cli.workers_option(),
        ("--skip-bad-images", "skip_bad_images", bool, "skip images that cannot be decoded "
         "(count them and list their paths) instead of stopping at the first one"),
        cli.export_option("the final 2:4 model (eval mode, float32 NHWC input)"),
    )

    @staticmethod
    def configs(args: argparse.Namespace, model: str) -> Config:
        return (imagenet_config if args.data_dir else builtin_config)(model)

    smoke_config = staticmethod(smoke_config)
    converged_config = staticmethod(converged_config)

    @staticmethod
    def dataset_of(args: argparse.Namespace) -> str:
        return "imagenet" if args.data_dir else "mnist_5k"

    def setup(self) -> dict[str, Any]:
        config, mesh = self.config, self.wf.mesh
        self.skipped_log = os.path.join(self.workdir, "skipped_images.txt")
        self.datasets = input_pipeline.create_datasets(
            config, skipped_log=self.skipped_log if config.skip_bad_images else None)
        info = self.info = self.datasets.info
        self.dataset_name = info.name
        self.model = create_model(config, info)
        self.graphdef = nnx.split(self.model, nnx.Param, nnx.BatchStat)[0]
        self.eval_step = make_eval_step(self.graphdef, mesh, info, jnp.dtype(config.compute_dtype))
        self.steps = workflow.phase_steps(config, info.num_train)
        self.steps_per_epoch = max(1, info.num_train // config.batch_size)
        self.schedule = learning_rate_schedule(config, self.steps)
        epochs = self.steps * config.batch_size / info.num_train
        self.wf.print(f"{config.model}: {models.count_params(self.model):,} parameters, "
                      f"{info.name}: {info.num_train:,} train / {info.num_eval:,} held-out images "
                      f"{info.image_shape}, {info.num_classes} classes")
        self.wf.print(f"{mesh.size} {mesh.devices.flat[0].platform} device(s), global batch "
                      f"{config.batch_size}, {self.steps} steps per phase ({epochs:.1f} epochs), "
                      f"lr {config.learning_rate:g}, compute {config.compute_dtype}")
        return self._model_state()

    def _model_state(self) -> dict[str, Any]:
        _, params, batch_stats = nnx.split(self.model, nnx.Param, nnx.BatchStat)
        return {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}

    def optimizer(self, params):
        return create_optimizer(self.config, self.steps)

    def train_step(self, tx):
        step_fn = make_train_step(self.graphdef, tx, self.wf.mesh, self.info,
                                  jnp.dtype(self.config.compute_dtype),
                                  loss_params=self.params_projection)
        return lambda state, batch, step, phase: step_fn(state, batch)

    def train_batches(self, phase: str, seed: int):
        return input_pipeline.train_iterator(self.datasets, batch_size=self.config.batch_size,
                                             seed=seed, num_workers=self.config.num_workers)

    def train_record(self, fetched: list[dict], step: int) -> dict[str, Any]:
        return {**super().train_record(fetched, step), "lr": float(self.schedule(step - 1)),
                "epoch": step / self.steps_per_epoch}

    def eval_steps(self) -> set[int]:
        every = self.config.eval_every_steps if self.config.eval_every_steps > 0 else (
            self.steps_per_epoch)
        return set(range(every, self.steps + 1, every))

    def eval_during(self, state, phase: str, step: int):
        record, final = super().eval_during(state, phase, step)
        return (record and {**record, "epoch": step / self.steps_per_epoch}), final

    def evaluate(self, state: dict[str, Any], phase: str) -> dict[str, Any]:
        """Top-1 / top-5 accuracy and mean loss over the whole eval split."""
        totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
        config = self.config
        for batch in input_pipeline.eval_batches(
                self.datasets, batch_size=config.eval_batch_size, num_workers=config.num_workers,
                max_examples=config.max_eval_examples):
            sums = self.eval_step(state["params"], state["batch_stats"],
                                  workflow.shard_batch(batch, self.wf.mesh))
            totals = {key: totals[key] + float(value)
                      for key, value in jax.device_get(sums).items()}
        count = max(totals["count"], 1.0)
        return {"top1": totals["top1"] / count, "top5": totals["top5"] / count,
                "loss": totals["loss"] / count, "count": int(totals["count"])}

    def eval_record(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"split": "eval", "loss": result["loss"], "metric": result["top1"],
                "top5": result["top5"]}

    def load_dense(self, source: str, state: dict[str, Any]):
        description = weights.init_model_from(self.model, source)
        return self._model_state(), description

    def extra_results(self, evals):
        extra = {"top5": {k: None if v is None else v["top5"] for k, v in evals.items()},
                 "batch_size": self.config.batch_size, "eval_examples": evals["sparse"]["count"]}
        if self.config.skip_bad_images:
            skipped = input_pipeline.read_skipped_log(self.skipped_log)
            extra["skipped_images"] = {"count": len(skipped), "files": skipped}
            self.wf.print(f"[data] skipped {len(skipped)} undecodable image(s) (replaced by the "
                          f"next one of their split), listed in {self.skipped_log}"
                          + "".join(f"\n  {path}: {why}" for path, why in sorted(skipped.items())))
        return extra

    def table_rows(self, results):
        return [("top-5", results["top5"])]

    def table_note(self, results):
        return f"batch {results['batch_size']}; held-out images: {results['eval_examples']}"

    def export_onnx(self, state: dict[str, Any], path: str) -> None:
        """Writes the model to ONNX: eval mode, float32, normalized NHWC input."""
        import sparse_jax.export  # needs the export extra (jax2onnx)

        # Exported in float32: TensorRT picks its own precision (--fp16), onnxruntime runs it as is.
        graphdef, _, _ = nnx.split(create_model(self.config.replace(compute_dtype="float32"),
                                                self.info), nnx.Param, nnx.BatchStat)
        model = nnx.merge(graphdef, jax.device_get(state["params"]),
                          jax.device_get(state["batch_stats"]))
        example = jax.ShapeDtypeStruct((1, *self.info.image_shape), jnp.float32)
        sparse_jax.export.to_onnx(model, [example], path, input_names=["image"])

    # -- the engine's other methods (--method sr-ste, --permute, --recalibrate-bn) --------------
    projects_loss_params = True  # make_train_step applies self.params_projection

    def set_phase_steps(self, steps: int) -> None:
        super().set_phase_steps(steps)
        self.schedule = learning_rate_schedule(self.config, steps)  # the logged lr

    def _images(self, batch, dtype=None):
        return input_pipeline.normalize_images(batch["image"], self.info.mean, self.info.std,
                                               dtype or jnp.dtype(self.config.compute_dtype))

    def forward(self, variables, batch):
        """Eval-mode logits of ``variables`` (params, batch_stats) on a training batch."""
        model = nnx.merge(self.graphdef, variables["params"], variables["batch_stats"])
        return model(self._images(batch), train=False)

    def recalibrate_batch_stats(self, variables, batches):
        """``variables`` with the population statistics of every BatchNorm's inputs over
        ``batches`` (``sparse_jax.recalibrate_batch_norm``, training-mode forward passes)."""
        model = nnx.merge(self.graphdef, jax.device_get(variables["params"]),
                          jax.device_get(variables["batch_stats"]))
        forward = nnx.jit(lambda m, images: m(images, train=True))
        sparse_jax.recalibrate_batch_norm(model, [self._images(b) for b in batches], forward)
        return {**variables, "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}


def main(model: str, description: str, epilog: str, argv: list[str] | None = None) -> dict:
    """The command line of ``recipes/<model>.py`` (``cli.main`` with this task)."""
    return cli.main(ClassificationTask, model, description, epilog, argv)

