"""Flax NNX Xception (Chollet 2017), laid out like timm's ``legacy_xception`` (the Keras model).

Entry flow: 3x3/2 and 3x3 convolutions (32, 64, no padding), three blocks (128, 256, 728) of two
separable convolutions, a 3x3/2 max-pool and a strided 1x1 projection shortcut. Middle flow:
eight blocks of three separable convolutions at 728 channels. Exit flow: a block 728 -> 1024, two
separable convolutions (1536, 2048), global average pooling, the classifier. A separable
convolution is a depthwise 3x3 (kernel ``(3, 3, 1, C)``) then a pointwise 1x1 convolution, then
batch norm. Padding is explicit and symmetric, as in timm, so that timm's weights give timm's
logits. 22,855,952 trainable parameters with 1000 classes, as Keras counts them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import nnx

from recipes.vision import models

# Channels of the full-size model: entry convolutions, entry blocks, middle flow, exit flow.
STEM_CHANNELS = (32, 64)
ENTRY_BLOCK_CHANNELS = (128, 256, 728)
MIDDLE_CHANNELS = 728
EXIT_BLOCK_CHANNELS = 1024
EXIT_SEPARABLE_CHANNELS = (1536, 2048)
MIDDLE_BLOCKS = 8


def scaled_channels(channels: int, width_multiplier: float, divisor: int = 8) -> int:
    """``channels * width_multiplier`` rounded to a multiple of ``divisor`` (at least ``divisor``):
    with 8, every pointwise input is a multiple of 4, prunable 2:4 like the full model's."""
    scaled = channels * width_multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never lose more than 10% of the width to rounding
        rounded += divisor
    return rounded


class SeparableConv(nnx.Module):
    """Depthwise 3x3 convolution (one filter per input channel), then a pointwise 1x1 one."""

    def __init__(self, in_features: int, out_features: int, *, conv, rngs: nnx.Rngs):
        self.depthwise = conv(in_features, in_features, kernel_size=(3, 3),
                              padding=models.PAD_1, feature_group_count=in_features, rngs=rngs)
        self.pointwise = conv(in_features, out_features, kernel_size=(1, 1), padding=models.NO_PAD,
                              rngs=rngs)

    def __call__(self, x):
        return self.pointwise(self.depthwise(x))


class XceptionBlock(nnx.Module):
    """``reps`` x (ReLU, separable conv, batch norm), optional 3x3/2 max-pool, plus a shortcut.

    ``stride`` 2 adds the max-pool and a strided 1x1 projection shortcut. ``start_with_relu`` is
    False only in the first block (its input has just been through one). ``grow_first``: the
    first separable convolution changes the channel count, else the last one (exit flow).
    """

    def __init__(self, in_features: int, out_features: int, reps: int, stride: int = 1, *,
                 start_with_relu: bool = True, grow_first: bool = True, conv, norm,
                 rngs: nnx.Rngs):
        self.stride = stride
        self.start_with_relu = start_with_relu
        if out_features != in_features or stride != 1:
            self.skip = conv(in_features, out_features, kernel_size=(1, 1), strides=stride,
                             padding=models.NO_PAD, rngs=rngs)
            self.skip_bn = norm(out_features, rngs=rngs)
        else:
            self.skip = self.skip_bn = None
        # Channels before and after each separable convolution.
        if grow_first:
            channels = [in_features] + [out_features] * reps
        else:
            channels = [in_features] * reps + [out_features]
        separable, norms = [], []
        for conv_in, conv_out in zip(channels, channels[1:]):
            separable.append(SeparableConv(conv_in, conv_out, conv=conv, rngs=rngs))
            norms.append(norm(conv_out, rngs=rngs))
        self.separable = nnx.List(separable)
        self.bn = nnx.List(norms)

    def __call__(self, x, train: bool):
        y = x
        for index, (separable, norm) in enumerate(zip(self.separable, self.bn)):
            if index > 0 or self.start_with_relu:
                y = nnx.relu(y)
            y = norm(separable(y), use_running_average=not train)
        if self.stride != 1:
            y = models.max_pool_3x3(y, self.stride)
        shortcut = x if self.skip is None else self.skip_bn(self.skip(x),
                                                             use_running_average=not train)
        return y + shortcut


class Xception(nnx.Module):
    """Xception in NNX, computing in ``dtype`` with float32 parameters.

    ``width_multiplier`` scales every channel count (rounded to multiples of 8); the published
    model has 1.0, 8 ``middle_blocks`` and ``stem_stride`` 2 (299x299 input).
    """

    def __init__(self, *, num_classes: int = 1000, in_channels: int = 3,
                 width_multiplier: float = 1.0, middle_blocks: int = MIDDLE_BLOCKS,
                 stem_stride: int = 2, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        conv, norm = models.conv_and_norm(dtype)
        width = functools.partial(scaled_channels, width_multiplier=width_multiplier)
        stem1, stem2 = (width(c) for c in STEM_CHANNELS)
        self.entry_conv1 = conv(in_channels, stem1, kernel_size=(3, 3), strides=stem_stride,
                                padding=models.NO_PAD, rngs=rngs)
        self.entry_bn1 = norm(stem1, rngs=rngs)
        self.entry_conv2 = conv(stem1, stem2, kernel_size=(3, 3), padding=models.NO_PAD, rngs=rngs)
        self.entry_bn2 = norm(stem2, rngs=rngs)
        block = functools.partial(XceptionBlock, conv=conv, norm=norm, rngs=rngs)
        # (output channels, separable convolutions, stride, options) of each block.
        specs = [(c, 2, 2, {"start_with_relu": i > 0}) for i, c in enumerate(ENTRY_BLOCK_CHANNELS)]
        specs += [(MIDDLE_CHANNELS, 3, 1, {})] * middle_blocks
        specs += [(EXIT_BLOCK_CHANNELS, 2, 2, {"grow_first": False})]
        blocks, in_features = [], stem2
        for channels, reps, stride, options in specs:
            blocks.append(block(in_features, width(channels), reps, stride, **options))
            in_features = width(channels)
        self.blocks = nnx.List(blocks)
        exit1, exit2 = (width(c) for c in EXIT_SEPARABLE_CHANNELS)
        self.exit_separable1 = SeparableConv(in_features, exit1, conv=conv, rngs=rngs)
        self.exit_bn1 = norm(exit1, rngs=rngs)
        self.exit_separable2 = SeparableConv(exit1, exit2, conv=conv, rngs=rngs)
        self.exit_bn2 = norm(exit2, rngs=rngs)
        self.fc = nnx.Linear(exit2, num_classes, kernel_init=models.torch_linear_init(exit2),
                             bias_init=models.torch_linear_init(exit2), dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x, train: bool = False):
        """Maps NHWC images to float32 logits; ``train`` uses and updates batch statistics."""
        x = nnx.relu(self.entry_bn1(self.entry_conv1(x), use_running_average=not train))
        x = nnx.relu(self.entry_bn2(self.entry_conv2(x), use_running_average=not train))
        for block in self.blocks:
            x = block(x, train)
        x = nnx.relu(self.exit_bn1(self.exit_separable1(x), use_running_average=not train))
        x = nnx.relu(self.exit_bn2(self.exit_separable2(x), use_running_average=not train))
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x).astype(jnp.float32)
