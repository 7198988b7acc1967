"""Flax NNX ResNets laid out exactly like torchvision's.

The module tree mirrors torchvision's attribute names (``conv1``, ``bn1``, ``layer1[0].conv2``,
``layer2[0].downsample.conv``, ``fc``) so that torchvision weights map one to one (see
``weights.py``), and every convolution and pooling uses torchvision's explicit symmetric padding
instead of ``'SAME'``: with stride 2, ``'SAME'`` pads asymmetrically and imported weights would give
different logits.

ResNet-50 here is torchvision's v1.5: the stride of a downsampling bottleneck sits in its 3x3
convolution. Built with ``num_classes=1000`` it has 25,557,032 parameters, like torchvision's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recipes.vision import grouped_conv

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_linear_init(fan_in: int):
    """torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    """torch's ``MaxPool2d(3, stride, padding=1)`` on NHWC: the padding counts as -inf.

    Explicit pad + "VALID" pooling (not ``padding=((1, 1), (1, 1))``) so that the jax2onnx
    exporter can translate it.
    """
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nnx.max_pool(x, window_shape=(3, 3), strides=(stride, stride), padding="VALID")


class Downsample(nnx.Module):
    """The projection shortcut: torchvision's ``downsample = Sequential(conv1x1, bn)``."""

    def __init__(self, in_features: int, out_features: int, stride: int, *, conv, norm, rngs):
        self.conv = conv(in_features, out_features, kernel_size=(1, 1), strides=stride,
                         padding=((0, 0), (0, 0)), rngs=rngs)
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
        self.conv1 = conv(in_features, width, kernel_size=(1, 1), padding=((0, 0), (0, 0)), rngs=rngs)
        self.bn1 = norm(width, rngs=rngs)
        self.conv2 = conv(width, width, kernel_size=(3, 3), strides=stride,
                          padding=((1, 1), (1, 1)), feature_group_count=groups, rngs=rngs)
        self.bn2 = norm(width, rngs=rngs)
        self.conv3 = conv(width, out_features, kernel_size=(1, 1), padding=((0, 0), (0, 0)), rngs=rngs)
        self.bn3 = norm(out_features, rngs=rngs)
        if stride != 1 or in_features != out_features:
            self.downsample = Downsample(in_features, out_features, stride, conv=conv, norm=norm,
                                         rngs=rngs)
        else:
            self.downsample = None

    def __call__(self, x, train: bool):
        identity = x if self.downsample is None else self.downsample(x, train)
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        y = nnx.relu(self.bn2(self.conv2(y), use_running_average=not train))
        y = self.bn3(self.conv3(y), use_running_average=not train)
        return nnx.relu(y + identity)


class BasicBlock(nnx.Module):
    """torchvision's BasicBlock (ResNet-18/34): two 3x3 convolutions."""

    expansion = 1

    def __init__(self, in_features: int, planes: int, stride: int = 1, *, groups: int = 1,
                 width_per_group: int = 64, conv, norm, rngs: nnx.Rngs):
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64, "
                             f"got groups={groups}, width_per_group={width_per_group}")
        self.conv1 = conv(in_features, planes, kernel_size=(3, 3), strides=stride,
                          padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn1 = norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, kernel_size=(3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn2 = norm(planes, rngs=rngs)
        if stride != 1 or in_features != planes:
            self.downsample = Downsample(in_features, planes, stride, conv=conv, norm=norm, rngs=rngs)
        else:
            self.downsample = None

    def __call__(self, x, train: bool):
        identity = x if self.downsample is None else self.downsample(x, train)
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        y = self.bn2(self.conv2(y), use_running_average=not train)
        return nnx.relu(y + identity)


class ResNet(nnx.Module):
    """A torchvision-layout ResNet in NNX, computing in ``dtype`` with float32 parameters.

    Args:
        block_cls: ``Bottleneck`` or ``BasicBlock``.
        stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: size of the classifier output.
        num_filters: planes of the first stage (64 in torchvision); stage ``i`` has
            ``num_filters * 2**i`` planes. Smaller values give the same topology at a reduced width.
        in_channels: channels of the input images (NHWC).
        stem: ``"imagenet"`` for torchvision's 7x7/2 convolution + 3x3/2 max-pool, or ``"small"``
            for a 3x3/1 convolution without pooling, for low-resolution images such as MNIST.
        groups, width_per_group: ResNeXt-style grouped 3x3 convolutions (torchvision's names).
        dtype: computation dtype (bfloat16 for mixed precision); parameters stay float32.
        rngs: parameter initialisation randomness.
    """

    def __init__(self, block_cls, stage_sizes: Sequence[int], *, num_classes: int = 1000,
                 num_filters: int = 64, in_channels: int = 3, stem: str = "imagenet",
                 small_stem_stride: int = 1, groups: int = 1, width_per_group: int = 64,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        # grouped_conv: the same convolutions, without XLA:CPU's slow grouped kernel gradient.
        conv = functools.partial(nnx.Conv, use_bias=False, kernel_init=_conv_init, dtype=dtype,
                                 param_dtype=jnp.float32,
                                 conv_general_dilated=grouped_conv.conv_general_dilated)
        # torch BatchNorm2d(momentum=0.1, eps=1e-5); flax's momentum is the running average's decay.
        norm = functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, dtype=dtype,
                                 param_dtype=jnp.float32)
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = conv(in_channels, num_filters, kernel_size=(7, 7), strides=2,
                              padding=((3, 3), (3, 3)), rngs=rngs)
        else:
            self.conv1 = conv(in_channels, num_filters, kernel_size=(3, 3),
                              strides=small_stem_stride, padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn1 = norm(num_filters, rngs=rngs)
        in_features = num_filters
        stages = []
        for stage_index, num_blocks in enumerate(stage_sizes):
            planes = num_filters * 2**stage_index
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(block_cls(in_features, planes, stride, groups=groups,
                                        width_per_group=width_per_group, conv=conv, norm=norm,
                                        rngs=rngs))
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


ResNet18 = functools.partial(ResNet, BasicBlock, (2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, BasicBlock, (3, 4, 6, 3))
ResNet50 = functools.partial(ResNet, Bottleneck, (3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, Bottleneck, (3, 4, 23, 3))
ResNet152 = functools.partial(ResNet, Bottleneck, (3, 8, 36, 3))
ResNeXt50_32x4d = functools.partial(ResNet, Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4)
ResNeXt101_32x8d = functools.partial(ResNet, Bottleneck, (3, 4, 23, 3), groups=32,
                                     width_per_group=8)

MODELS = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "resnext50_32x4d": ResNeXt50_32x4d,
    "resnext101_32x8d": ResNeXt101_32x8d,
}


def init_rngs(seed: int) -> nnx.Rngs:
    """Initialisation randomness from an RBG key: on CPU, threefry's initialisers take
    seconds per layer shape to compile, RBG's a fraction of that; weights are as random."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (BatchNorm running statistics excluded, as in torch)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
