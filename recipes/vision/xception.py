"""Flax NNX Xception (Chollet 2017), laid out like timm's ``legacy_xception`` (the Keras model).

Entry flow: a 3x3/2 convolution (32, no padding), a 3x3 convolution (64, no padding), then three
blocks (128, 256, 728 channels) of two separable convolutions and a 3x3/2 max-pool with a strided
1x1 projection shortcut. Middle flow: eight blocks of three separable convolutions at 728 channels
with identity shortcuts. Exit flow: a block 728 -> 1024 (grows in its last convolution), two more
separable convolutions (1536, 2048), global average pooling and the classifier.

A separable convolution is a depthwise 3x3 convolution (``feature_group_count`` = channels, Flax
kernel ``(3, 3, 1, C)``) followed by a pointwise 1x1 convolution. Neither has a bias; every
separable convolution is followed by batch norm. Padding is explicit and symmetric, as in timm,
so that imported timm weights give timm's logits.

With 1000 classes the model has 22,855,952 trainable parameters (convolution kernels, batch-norm
scales and offsets, the classifier), which is how Keras counts Xception; the batch-norm running
statistics (54,528 numbers) are not parameters.

The attribute names are descriptive (``entry_conv1``, ``blocks[i].separable[j].depthwise``);
``weights_timm.py`` maps them to timm's state-dict keys.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recipes.vision import grouped_conv, models

# timm initialises every convolution with kaiming_normal_(mode="fan_out", nonlinearity="relu").
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# Channels of the full-size model: entry convolutions, entry blocks, middle flow, exit flow.
STEM_CHANNELS = (32, 64)
ENTRY_BLOCK_CHANNELS = (128, 256, 728)
MIDDLE_CHANNELS = 728
EXIT_BLOCK_CHANNELS = 1024
EXIT_SEPARABLE_CHANNELS = (1536, 2048)
MIDDLE_BLOCKS = 8


def scaled_channels(channels: int, width_multiplier: float, divisor: int = 8) -> int:
    """``channels * width_multiplier`` rounded to a multiple of ``divisor`` (at least ``divisor``).

    Multiples of 8 keep every pointwise convolution's input a multiple of 4, so that a
    reduced-width model is prunable 2:4 exactly like the full one. The full model
    (multiplier 1) keeps its own channel counts, which are all multiples of 8.
    """
    scaled = channels * width_multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never lose more than 10% of the width to rounding
        rounded += divisor
    return rounded


class SeparableConv(nnx.Module):
    """Depthwise 3x3 convolution (one filter per input channel), then a pointwise 1x1 one."""

    def __init__(self, in_features: int, out_features: int, *, conv, rngs: nnx.Rngs):
        self.depthwise = conv(in_features, in_features, kernel_size=(3, 3),
                              padding=((1, 1), (1, 1)), feature_group_count=in_features, rngs=rngs)
        self.pointwise = conv(in_features, out_features, kernel_size=(1, 1),
                              padding=((0, 0), (0, 0)), rngs=rngs)

    def __call__(self, x):
        return self.pointwise(self.depthwise(x))


class XceptionBlock(nnx.Module):
    """``reps`` x (ReLU, separable conv, batch norm), optional 3x3/2 max-pool, plus a shortcut.

    Args:
        in_features, out_features: block input and output channels.
        reps: separable convolutions in the block.
        stride: 2 ends the block with a 3x3/2 max-pool and gives it a strided 1x1 projection
            shortcut; 1 keeps the resolution.
        start_with_relu: ``False`` only for the first block, whose input has just been through a
            ReLU already.
        grow_first: the first separable convolution changes the channel count (entry and middle
            flow); otherwise the last one does (the exit-flow block).
    """

    def __init__(self, in_features: int, out_features: int, reps: int, stride: int = 1, *,
                 start_with_relu: bool = True, grow_first: bool = True, conv, norm,
                 rngs: nnx.Rngs):
        self.stride = stride
        self.start_with_relu = start_with_relu
        if out_features != in_features or stride != 1:
            self.skip = conv(in_features, out_features, kernel_size=(1, 1), strides=stride,
                             padding=((0, 0), (0, 0)), rngs=rngs)
            self.skip_bn = norm(out_features, rngs=rngs)
        else:
            self.skip = None
            self.skip_bn = None
        separable, norms = [], []
        for index in range(reps):
            if grow_first:
                conv_in = in_features if index == 0 else out_features
                conv_out = out_features
            else:
                conv_in = in_features
                conv_out = in_features if index < reps - 1 else out_features
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

    Args:
        num_classes: size of the classifier output.
        in_channels: channels of the input images (NHWC).
        width_multiplier: scales every channel count (rounded to multiples of 8); 1.0 is the
            published model.
        middle_blocks: blocks in the middle flow (8 in the published model).
        stem_stride: stride of the first convolution: 2 in the published model (299x299 input);
            1 suits low-resolution images such as MNIST.
        dtype: computation dtype (bfloat16 for mixed precision); parameters stay float32.
        rngs: parameter initialisation randomness.
    """

    def __init__(self, *, num_classes: int = 1000, in_channels: int = 3,
                 width_multiplier: float = 1.0, middle_blocks: int = MIDDLE_BLOCKS,
                 stem_stride: int = 2, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        # grouped_conv computes depthwise convolutions without XLA:CPU's slow generic path.
        conv = functools.partial(nnx.Conv, use_bias=False, kernel_init=_conv_init, dtype=dtype,
                                 param_dtype=jnp.float32,
                                 conv_general_dilated=grouped_conv.conv_general_dilated)
        # torch BatchNorm2d(momentum=0.1, eps=1e-5); flax's momentum is the running average's decay.
        norm = functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, dtype=dtype,
                                 param_dtype=jnp.float32)
        width = functools.partial(scaled_channels, width_multiplier=width_multiplier)
        stem1, stem2 = (width(c) for c in STEM_CHANNELS)
        self.entry_conv1 = conv(in_channels, stem1, kernel_size=(3, 3), strides=stem_stride,
                                padding=((0, 0), (0, 0)), rngs=rngs)
        self.entry_bn1 = norm(stem1, rngs=rngs)
        self.entry_conv2 = conv(stem1, stem2, kernel_size=(3, 3), padding=((0, 0), (0, 0)),
                                rngs=rngs)
        self.entry_bn2 = norm(stem2, rngs=rngs)
        block = functools.partial(XceptionBlock, conv=conv, norm=norm, rngs=rngs)
        blocks = []
        in_features = stem2
        for index, channels in enumerate(ENTRY_BLOCK_CHANNELS):
            blocks.append(block(in_features, width(channels), 2, 2, start_with_relu=index > 0))
            in_features = width(channels)
        for _ in range(middle_blocks):
            blocks.append(block(in_features, width(MIDDLE_CHANNELS), 3, 1))
            in_features = width(MIDDLE_CHANNELS)
        blocks.append(block(in_features, width(EXIT_BLOCK_CHANNELS), 2, 2, grow_first=False))
        self.blocks = nnx.List(blocks)
        exit1, exit2 = (width(c) for c in EXIT_SEPARABLE_CHANNELS)
        self.exit_separable1 = SeparableConv(width(EXIT_BLOCK_CHANNELS), exit1, conv=conv,
                                             rngs=rngs)
        self.exit_bn1 = norm(exit1, rngs=rngs)
        self.exit_separable2 = SeparableConv(exit1, exit2, conv=conv, rngs=rngs)
        self.exit_bn2 = norm(exit2, rngs=rngs)
        self.fc = nnx.Linear(exit2, num_classes, kernel_init=models.torch_linear_init(exit2),
                             bias_init=models.torch_linear_init(exit2), dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)

    @property
    def num_middle_blocks(self) -> int:
        return len(self.blocks) - len(ENTRY_BLOCK_CHANNELS) - 1

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


def count_trainable_params(model: nnx.Module) -> int:
    """Trainable parameters as Keras counts them (batch-norm running statistics excluded).

    Works on an abstract model from ``nnx.eval_shape`` too (nothing is allocated).
    """
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def create_model(config, info, seed: int | None = None) -> Xception:
    """The recipe's Xception for ``config`` (a ``configs.Config``) and a dataset's ``info``.

    Uses ``config.num_filters`` as the width of the first convolution (32 in the published
    model; every other width scales with it), ``config.stem`` (``"imagenet"``: the 3x3/2 first
    convolution; ``"small"``: stride ``config.small_stem_stride``) and ``config.stage_sizes``
    (``None``, or ``(k,)`` for ``k`` middle-flow blocks instead of 8).
    """
    if config.stem not in ("imagenet", "small"):
        raise ValueError(f"stem must be 'imagenet' or 'small', got {config.stem!r}")
    middle_blocks = MIDDLE_BLOCKS
    if config.stage_sizes is not None:
        if len(config.stage_sizes) != 1:
            raise ValueError("for Xception, stage_sizes is (number of middle-flow blocks,), got "
                             f"{tuple(config.stage_sizes)}")
        middle_blocks = int(config.stage_sizes[0])
    return Xception(num_classes=info.num_classes, in_channels=info.image_shape[-1],
                    width_multiplier=config.num_filters / STEM_CHANNELS[0],
                    middle_blocks=middle_blocks,
                    stem_stride=2 if config.stem == "imagenet" else config.small_stem_stride,
                    dtype=jnp.dtype(config.compute_dtype),
                    rngs=models.init_rngs(config.seed if seed is None else seed))


def layer_shapes(model: nnx.Module) -> Sequence[tuple[str, tuple[int, ...]]]:
    """``(path, shape)`` of every convolution and linear kernel, in tree order (for reports)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return [("/".join(map(str, path)), tuple(value.shape)) for path, value in flat
            if path[-1] == "kernel"]
