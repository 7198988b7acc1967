"""Flax NNX ResNets laid out exactly like torchvision's.

The module tree keeps torchvision's attribute names (``conv1``, ``layer2[0].downsample.conv``,
``fc``) so that torchvision weights map one to one (``weights.py``), and torchvision's explicit
symmetric padding: with stride 2, ``'SAME'`` pads asymmetrically and imported weights would give
different logits. ResNet-50 is torchvision's v1.5 (the stride of a downsampling bottleneck is in
its 3x3 convolution): 25,557,032 parameters with 1000 classes, like torchvision's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recipes.vision import grouped_conv

# torch's explicit symmetric padding of 1x1 and 3x3 convolutions.
NO_PAD, PAD_1 = ((0, 0), (0, 0)), ((1, 1), (1, 1))


def conv_and_norm(dtype) -> tuple[Any, Any]:
    """torchvision's (and timm's) convolution and batch norm, computing in ``dtype``."""
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"), no bias; grouped_conv: the same
    # convolutions without XLA:CPU's slow grouped-kernel gradient and depthwise paths.
    kaiming = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
    conv = functools.partial(nnx.Conv, use_bias=False, kernel_init=kaiming, dtype=dtype,
                             param_dtype=jnp.float32,
                             conv_general_dilated=grouped_conv.conv_general_dilated)
    # torch BatchNorm2d(momentum=0.1, eps=1e-5); flax's momentum is the running average's decay.
    norm = functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, dtype=dtype,
                             param_dtype=jnp.float32)
    return conv, norm


def torch_linear_init(fan_in: int):
    """torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / fan_in**0.5
    return functools.partial(jax.random.uniform, minval=-bound, maxval=bound)


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    """torch's ``MaxPool2d(3, stride, padding=1)`` on NHWC: the padding counts as -inf."""
    # Explicit pad + "VALID" pooling (not padding=((1, 1), (1, 1))): jax2onnx can translate it.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nnx.max_pool(x, window_shape=(3, 3), strides=(stride, stride), padding="VALID")


class Downsample(nnx.Module):
    """The projection shortcut: torchvision's ``downsample = Sequential(conv1x1, bn)``."""

    def __init__(self, in_features: int, out_features: int, stride: int, *, conv, norm, rngs):
        self.conv = conv(in_features, out_features, kernel_size=(1, 1), strides=stride,
                         padding=NO_PAD, rngs=rngs)
        self.bn = norm(out_features, rngs=rngs)

    def __call__(self, x, train: bool):
        return self.bn(self.conv(x), use_running_average=not train)


class Bottleneck(nnx.Module):
    """torchvision's Bottleneck (v1.5): 1x1 -> 3x3 (carries the stride and groups) -> 1x1, x4."""

    expansion = 4

    def __init__(self, in_features: int, planes: int, stride: int = 1, *, groups: int = 1,
                 width_per_group: int = 64, conv, norm, rngs: nnx.Rngs):
        width = int(planes * (width_per_group / 64.0)) * groups
        out_features = planes * self.expansion
        self.conv1 = conv(in_features, width, kernel_size=(1, 1), padding=NO_PAD, rngs=rngs)
        self.bn1 = norm(width, rngs=rngs)
        self.conv2 = conv(width, width, kernel_size=(3, 3), strides=stride, padding=PAD_1,
                          feature_group_count=groups, rngs=rngs)
        self.bn2 = norm(width, rngs=rngs)
        self.conv3 = conv(width, out_features, kernel_size=(1, 1), padding=NO_PAD, rngs=rngs)
        self.bn3 = norm(out_features, rngs=rngs)
        self.downsample = None if stride == 1 and in_features == out_features else Downsample(
            in_features, out_features, stride, conv=conv, norm=norm, rngs=rngs)

    def __call__(self, x, train: bool):
        identity = x if self.downsample is None else self.downsample(x, train)
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        y = nnx.relu(self.bn2(self.conv2(y), use_running_average=not train))
        y = self.bn3(self.conv3(y), use_running_average=not train)
        return nnx.relu(y + identity)


class ResNet(nnx.Module):
    """A torchvision-layout ResNet in NNX, computing in ``dtype`` with float32 parameters.

    ``block_cls`` is ``Bottleneck``, ``stage_sizes`` its blocks per stage (``(3, 4, 6, 3)``:
    ResNet-50), ``num_filters`` the planes of the first stage (64 in torchvision; fewer: the same
    topology at a reduced width), doubled at each stage. ``stem`` "imagenet" is torchvision's
    7x7/2 convolution + 3x3/2 max-pool, "small" a 3x3 convolution (stride ``small_stem_stride``)
    without pooling, for low-resolution images. ``groups``, ``width_per_group``: ResNeXt.
    """

    def __init__(self, block_cls, stage_sizes: Sequence[int], *, num_classes: int = 1000,
                 num_filters: int = 64, in_channels: int = 3, stem: str = "imagenet",
                 small_stem_stride: int = 1, groups: int = 1, width_per_group: int = 64,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        conv, norm = conv_and_norm(dtype)
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = conv(in_channels, num_filters, kernel_size=(7, 7), strides=2,
                              padding=((3, 3), (3, 3)), rngs=rngs)
        else:
            self.conv1 = conv(in_channels, num_filters, kernel_size=(3, 3),
                              strides=small_stem_stride, padding=PAD_1, rngs=rngs)
        self.bn1 = norm(num_filters, rngs=rngs)
        block = functools.partial(block_cls, groups=groups, width_per_group=width_per_group,
                                  conv=conv, norm=norm, rngs=rngs)
        in_features = num_filters
        stages = []
        for stage_index, num_blocks in enumerate(stage_sizes):
            planes = num_filters * 2**stage_index
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(block(in_features, planes, stride))
                in_features = planes * block_cls.expansion
            stages.append(nnx.List(blocks))
        # torchvision's attribute names, so that weight keys map one to one.
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nnx.Linear(in_features, num_classes, kernel_init=torch_linear_init(in_features),
                             bias_init=torch_linear_init(in_features), dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)

    def features(self, x, train: bool = False, num_stages: int = 4):
        """The stem and the first ``num_stages`` stages: an NHWC feature map (detection
        backbones, such as SSD's, stop after ``layer3``)."""
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        if self.stem == "imagenet":
            x = max_pool_3x3(x, stride=2)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4)[:num_stages]:
            for block in stage:
                x = block(x, train)
        return x

    def __call__(self, x, train: bool = False):
        """Maps NHWC images to float32 logits; ``train`` uses and updates batch statistics."""
        x = jnp.mean(self.features(x, train), axis=(1, 2))
        return self.fc(x).astype(jnp.float32)


MODELS = {  # torchvision's constructors
    "resnet50": functools.partial(ResNet, Bottleneck, (3, 4, 6, 3)),
    "resnet101": functools.partial(ResNet, Bottleneck, (3, 4, 23, 3)),
    "resnet152": functools.partial(ResNet, Bottleneck, (3, 8, 36, 3)),
    "resnext50_32x4d": functools.partial(ResNet, Bottleneck, (3, 4, 6, 3), groups=32,
                                         width_per_group=4),
    "resnext101_32x8d": functools.partial(ResNet, Bottleneck, (3, 4, 23, 3), groups=32,
                                          width_per_group=8),
}
ResNet50 = MODELS["resnet50"]
ResNeXt50_32x4d = MODELS["resnext50_32x4d"]
ResNeXt101_32x8d = MODELS["resnext101_32x8d"]


def init_rngs(seed: int) -> nnx.Rngs:
    """Initialisation randomness from an RBG key: on CPU, threefry's initialisers take
    seconds per layer shape to compile, RBG's a fraction of that; weights are as random."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (not batch-norm statistics), also of an ``nnx.eval_shape`` model."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
