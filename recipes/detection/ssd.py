"""NVIDIA's SSD300 v1.1 with a ResNet-50 backbone, in Flax NNX (DeepLearningExamples,
PyTorch/Detection/SSD, ``ssd/model.py``; figures quoted, code written here).

torchvision's ResNet-50 (torchvision names: its weights import one to one) up to ``layer3`` with
that stage's stride removed (38x38x1024 at 300x300); five extra blocks (38 -> 19 -> 10 -> 5 -> 3
-> 1); per map 3x3 heads for offsets and class scores, Xavier-uniform (NVIDIA's
``_init_weights``). NHWC heads order default boxes row, column, box. ``width`` scales every
channel count and ``extra_strides`` picks the extra layers (the built-in default's small model).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recipes.vision import models, weights

# NVIDIA's extra layers at full width: output and middle channels of each block.
EXTRA_OUT_CHANNELS = (512, 512, 256, 256, 256)
EXTRA_MID_CHANNELS = (256, 256, 128, 128, 128)
BACKBONE_STAGES = (3, 4, 6)  # ResNet-50's layer1..layer3
BACKBONE_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")
_xavier = nnx.initializers.xavier_uniform()


def resnet_backbone(*, num_filters: int = 64, stage_sizes=BACKBONE_STAGES, stem: str = "imagenet",
                    in_channels: int = 3, dtype: Any = jnp.float32,
                    rngs: nnx.Rngs) -> models.ResNet:
    """torchvision's ResNet-50 without ``layer4`` and ``fc``, ``layer3`` at stride 1 (call
    ``backbone.features(x, train, num_stages=3)``)."""
    backbone = models.ResNet(models.Bottleneck, (*stage_sizes, 1), num_classes=1,
                             num_filters=num_filters, in_channels=in_channels, stem=stem,
                             dtype=dtype, rngs=rngs)
    backbone.layer4 = None  # conv5 and the classifier are not used by SSD
    backbone.fc = None
    first = backbone.layer3[0]
    first.conv2.strides = 1
    if first.downsample is not None:
        first.downsample.conv.strides = 1
    return backbone


class ExtraBlock(nnx.Module):
    """1x1 conv -> BN -> ReLU -> 3x3 conv (stride 2 + padding 1, or stride 1 unpadded) -> BN -> ReLU."""

    def __init__(self, in_features: int, mid_features: int, out_features: int, stride: int, *,
                 conv, norm, rngs: nnx.Rngs):
        if stride not in (1, 2):
            raise ValueError(f"extra layer stride must be 1 (3x3 valid) or 2 (padded), got {stride}")
        pad = 1 if stride == 2 else 0
        self.conv1 = conv(in_features, mid_features, kernel_size=(1, 1), padding=((0, 0), (0, 0)),
                          rngs=rngs)
        self.bn1 = norm(mid_features, rngs=rngs)
        self.conv2 = conv(mid_features, out_features, kernel_size=(3, 3), strides=stride,
                          padding=((pad, pad), (pad, pad)), rngs=rngs)
        self.bn2 = norm(out_features, rngs=rngs)

    def __call__(self, x, train: bool):
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        return nnx.relu(self.bn2(self.conv2(x), use_running_average=not train))


class SSD(nnx.Module):
    """SSD300 (NVIDIA v1.1): ``num_classes`` with the background, ``boxes_per_location`` per
    feature map (``1 + len(extra_strides)``), ``width`` a channel multiplier, ``extra_strides``
    2 (padded) or 1 (valid) per extra layer; float32 parameters."""

    def __init__(self, num_classes: int = 81, *,
                 boxes_per_location: tuple[int, ...] = (4, 6, 6, 6, 4, 4),
                 width: float = 1.0, extra_strides: tuple[int, ...] = (2, 2, 2, 1, 1),
                 backbone_stages: tuple[int, ...] = BACKBONE_STAGES, stem: str = "imagenet",
                 in_channels: int = 3, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if len(extra_strides) > len(EXTRA_OUT_CHANNELS):
            raise ValueError(f"at most {len(EXTRA_OUT_CHANNELS)} extra layers, got "
                             f"{len(extra_strides)}")
        if len(boxes_per_location) != 1 + len(extra_strides):
            raise ValueError(f"boxes_per_location has {len(boxes_per_location)} entries for "
                             f"{1 + len(extra_strides)} feature maps")
        self.num_classes = num_classes
        self.boxes_per_location = tuple(boxes_per_location)

        def scaled(channels: int) -> int:
            return max(4, int(round(channels * width)))

        num_filters = scaled(64)
        self.backbone = resnet_backbone(num_filters=num_filters, stage_sizes=backbone_stages,
                                        stem=stem, in_channels=in_channels, dtype=dtype, rngs=rngs)
        conv = functools.partial(nnx.Conv, use_bias=False, kernel_init=_xavier, dtype=dtype,
                                 param_dtype=jnp.float32)
        norm = functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, dtype=dtype,
                                 param_dtype=jnp.float32)
        channels = [num_filters * 16]  # layer3's output: 1024 at full width
        extras = []
        for index, stride in enumerate(extra_strides):
            out = scaled(EXTRA_OUT_CHANNELS[index])
            extras.append(ExtraBlock(channels[-1], scaled(EXTRA_MID_CHANNELS[index]), out, stride,
                                     conv=conv, norm=norm, rngs=rngs))
            channels.append(out)
        self.extras = nnx.List(extras)
        self.feature_channels = tuple(channels)

        def head(in_features: int, out_features: int) -> nnx.Conv:
            return nnx.Conv(in_features, out_features, kernel_size=(3, 3),
                            padding=((1, 1), (1, 1)), kernel_init=_xavier,
                            bias_init=models.torch_linear_init(9 * in_features), dtype=dtype,
                            param_dtype=jnp.float32, rngs=rngs)

        self.loc = nnx.List([head(c, b * 4) for c, b in zip(channels, boxes_per_location)])
        self.conf = nnx.List([head(c, b * num_classes)
                              for c, b in zip(channels, boxes_per_location)])

    def feature_maps(self, x, train: bool = False) -> list[jax.Array]:
        features = [self.backbone.features(x, train, num_stages=3)]
        for block in self.extras:
            features.append(block(features[-1], train))
        return features

    def __call__(self, x, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """NHWC images -> float32 box offsets ``(N, D, 4)`` and class logits ``(N, D, classes)``."""
        offsets, logits = [], []
        for feature, loc, conf in zip(self.feature_maps(x, train), self.loc, self.conf):
            offsets.append(loc(feature).reshape(feature.shape[0], -1, 4))
            logits.append(conf(feature).reshape(feature.shape[0], -1, self.num_classes))
        return (jnp.concatenate(offsets, 1).astype(jnp.float32),
                jnp.concatenate(logits, 1).astype(jnp.float32))


def feature_sizes(model: SSD, image_size: int, in_channels: int = 3) -> tuple[int, ...]:
    """Side of each feature map for square ``image_size`` inputs (shape inference, no compute)."""
    graphdef, state = nnx.split(model)  # works for abstract models (nnx.eval_shape) too
    shapes = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).feature_maps(x), state,
                            jax.ShapeDtypeStruct((1, image_size, image_size, in_channels),
                                                 jnp.float32))
    for shape in shapes:
        if shape.shape[1] != shape.shape[2] or shape.shape[1] < 1:
            raise ValueError(f"a {image_size}x{image_size} input gives a feature map of shape "
                             f"{shape.shape}: too small for the extra layers (expected square "
                             "maps of at least 1x1; use a larger input or fewer extra layers)")
    return tuple(int(s.shape[1]) for s in shapes)


def import_torchvision_backbone(model: SSD, state_dict: dict) -> int:
    """A torchvision ResNet-50 state dict's ``conv1``, ``bn1``, ``layer1..3`` into the backbone;
    returns how many tensors were loaded."""
    backbone = {k: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIXES)}
    if not backbone:
        raise ValueError(f"no torchvision ResNet backbone keys ({', '.join(BACKBONE_PREFIXES)}"
                         f"...) in the state dict; got e.g. {sorted(state_dict)[:5]}")
    weights.import_torchvision_state_dict(model.backbone, backbone)
    return len([k for k in backbone if not k.endswith("num_batches_tracked")])
