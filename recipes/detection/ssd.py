"""NVIDIA's SSD300 v1.1 with a ResNet-50 backbone in Flax NNX, and its boxes: default boxes,
encoding, matching, the loss and post-processing (DeepLearningExamples, PyTorch/Detection/SSD,
after Liu et al. 2016; figures quoted from there, code written here).

torchvision's ResNet-50 (torchvision names: its weights import one to one) up to ``layer3`` with
that stage's stride removed (38x38x1024 at 300x300); five extra blocks (38 -> 19 -> 10 -> 5 -> 3
-> 1); per map 3x3 heads for offsets and class scores, Xavier-uniform (NVIDIA's
``_init_weights``). ``width`` scales every channel count and ``extra_strides`` picks the extra
layers (the built-in default's small model). Default boxes are clipped ``(cx, cy, w, h)`` in
[0, 1], ordered map, row, column, box (an NHWC head's output reshaped to ``(N, H * W * boxes,
4)``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recipes.detection import boxes as box_ops
from recipes.vision import models, weights

# NVIDIA's extra layers at full width: output and middle channels of each block.
EXTRA_OUT_CHANNELS = (512, 512, 256, 256, 256)
EXTRA_MID_CHANNELS = (256, 256, 128, 128, 128)
BACKBONE_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")
_xavier = nnx.initializers.xavier_uniform()


class ExtraBlock(nnx.Module):
    """1x1 conv, BN, ReLU, 3x3 conv (stride 2 and padding 1, or stride 1 unpadded), BN, ReLU."""

    def __init__(self, in_features: int, mid_features: int, out_features: int, stride: int, *,
                 conv, norm, rngs: nnx.Rngs):
        if stride not in (1, 2):
            raise ValueError(f"extra layer stride must be 1 (3x3 valid) or 2 (padded), got "
                             f"{stride}")
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
                 backbone_stages: tuple[int, ...] = (3, 4, 6), dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if len(extra_strides) > len(EXTRA_OUT_CHANNELS):
            raise ValueError(f"at most {len(EXTRA_OUT_CHANNELS)} extra layers, got "
                             f"{len(extra_strides)}")
        if len(boxes_per_location) != 1 + len(extra_strides):
            raise ValueError(f"boxes_per_location has {len(boxes_per_location)} entries for "
                             f"{1 + len(extra_strides)} feature maps")
        self.num_classes = num_classes

        def scaled(channels: int) -> int:
            return max(4, int(round(channels * width)))

        num_filters = scaled(64)
        # torchvision's ResNet-50 without layer4 and fc (not used by SSD), layer3 at stride 1.
        self.backbone = backbone = models.ResNet(
            models.Bottleneck, (*backbone_stages, 1), num_classes=1, num_filters=num_filters,
            in_channels=3, stem="imagenet", dtype=dtype, rngs=rngs)
        backbone.layer4 = backbone.fc = None
        first = backbone.layer3[0]
        first.conv2.strides = 1
        if first.downsample is not None:
            first.downsample.conv.strides = 1
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


def feature_sizes(model: SSD, image_size: int) -> tuple[int, ...]:
    """Side of each feature map for square ``image_size`` inputs (shape inference, no compute)."""
    graphdef, state = nnx.split(model)  # works for abstract models (nnx.eval_shape) too
    shapes = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).feature_maps(x), state,
                            jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
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


VARIANCES = (0.1, 0.2)  # center, size: NVIDIA's scale_xy = 1 / 0.1, scale_wh = 1 / 0.2


@dataclasses.dataclass(frozen=True)
class DefaultBoxSpec:
    """Where the default boxes go; the defaults are SSD300's (NVIDIA's ``dboxes300_coco``).

    Map ``k`` (``f x f`` cells, step ``s`` pixels) centres boxes on ``((j + 0.5) s / S, (i + 0.5)
    s / S)`` with sizes ``sk``, ``sqrt(sk sk+1)`` and ``sk sqrt(a)`` by ``sk / sqrt(a)`` (both
    ways) per aspect ratio ``a``, ``sk = scales[k] / S``: 8732 boxes for SSD300.
    """

    image_size: int = 300
    feature_sizes: tuple[int, ...] = (38, 19, 10, 5, 3, 1)
    steps: tuple[float, ...] = (8, 16, 32, 64, 100, 300)
    scales: tuple[float, ...] = (21, 45, 99, 153, 207, 261, 315)  # pixels; one more than maps
    aspect_ratios: tuple[tuple[float, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))

    def __post_init__(self):
        maps = len(self.feature_sizes)
        if not (len(self.steps) == len(self.aspect_ratios) == maps == len(self.scales) - 1):
            raise ValueError(f"default boxes: {maps} feature maps need as many steps "
                             f"({len(self.steps)}) and aspect-ratio sets "
                             f"({len(self.aspect_ratios)}) and one more scale "
                             f"({len(self.scales)})")

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        return tuple(2 + 2 * len(ratios) for ratios in self.aspect_ratios)

    @property
    def num_boxes(self) -> int:
        return sum(f * f * b for f, b in zip(self.feature_sizes, self.boxes_per_location))


def default_boxes(spec: DefaultBoxSpec = DefaultBoxSpec()) -> np.ndarray:
    """The default boxes ``(num_boxes, 4)`` as clipped ``(cx, cy, w, h)`` in [0, 1], float32."""
    out = []
    for k, (size, step) in enumerate(zip(spec.feature_sizes, spec.steps)):
        cells_per_image = spec.image_size / step
        small = spec.scales[k] / spec.image_size
        large = spec.scales[k + 1] / spec.image_size
        shapes = [(small, small), (math.sqrt(small * large),) * 2]
        for ratio in spec.aspect_ratios[k]:
            w, h = small * math.sqrt(ratio), small / math.sqrt(ratio)
            shapes += [(w, h), (h, w)]
        shapes = np.asarray(shapes)  # (boxes, 2)
        centres = (np.arange(size) + 0.5) / cells_per_image
        cy, cx = np.meshgrid(centres, centres, indexing="ij")  # rows i (y), columns j (x)
        grid = np.stack([cx, cy], -1)[:, :, None, :]  # (size, size, 1, 2)
        per_map = np.concatenate([np.broadcast_to(grid, (size, size, len(shapes), 2)),
                                  np.broadcast_to(shapes, (size, size, len(shapes), 2))], -1)
        out.append(per_map.reshape(-1, 4))
    return np.clip(np.concatenate(out), 0.0, 1.0).astype(np.float32)


def encode(boxes_cxcywh, defaults_cxcywh, variances: Sequence[float] = VARIANCES):
    """Offsets ``((cx - dcx) / (0.1 dw), .., log(w / dw) / 0.2, ..)`` of centre-size boxes."""
    xp = box_ops.array_namespace(boxes_cxcywh, defaults_cxcywh)
    centre = (boxes_cxcywh[..., :2] - defaults_cxcywh[..., :2]) / (
        variances[0] * defaults_cxcywh[..., 2:])
    size = xp.log(boxes_cxcywh[..., 2:] / defaults_cxcywh[..., 2:]) / variances[1]
    return xp.concatenate([centre, size], axis=-1)


def decode(offsets, defaults_cxcywh, variances: Sequence[float] = VARIANCES):
    """The inverse of `encode`: centre-size boxes from offsets and their default boxes."""
    xp = box_ops.array_namespace(offsets, defaults_cxcywh)
    centre = offsets[..., :2] * variances[0] * defaults_cxcywh[..., 2:] + defaults_cxcywh[..., :2]
    size = xp.exp(offsets[..., 2:] * variances[1]) * defaults_cxcywh[..., 2:]
    return xp.concatenate([centre, size], axis=-1)


def match(gt_boxes: jax.Array, gt_labels: jax.Array, defaults_cxcywh: jax.Array,
          threshold: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Per default box ``(D, 4)``: its ground truth's corner box (its own if background) and
    label (0: background) among ``(G, 4)`` corners, ``(G,)`` labels (0: padding). A default box
    takes the ground truth it overlaps most (a positive above ``threshold``); each ground truth
    also claims its best default box (the later wins a tie)."""
    num_defaults = defaults_cxcywh.shape[0]
    defaults_xyxy = box_ops.cxcywh_to_xyxy(defaults_cxcywh)
    valid = gt_labels > 0
    iou = jnp.where(valid[:, None], box_ops.pairwise_iou(gt_boxes, defaults_xyxy), -1.0)
    best_gt = jnp.argmax(iou, axis=0)  # (D,)
    best_gt_iou = jnp.max(iou, axis=0)
    best_default = jnp.argmax(iou, axis=1)  # (G,)
    claims = jnp.where(valid, best_default, num_defaults)  # padding claims nothing (dropped)
    claimant = jnp.full((num_defaults,), -1, jnp.int32).at[claims].max(
        jnp.arange(gt_labels.shape[0], dtype=jnp.int32), mode="drop")
    best_gt = jnp.where(claimant >= 0, claimant, best_gt)
    best_gt_iou = jnp.where(claimant >= 0, 2.0, best_gt_iou)
    positive = best_gt_iou > threshold
    labels = jnp.where(positive, gt_labels[best_gt], 0)
    boxes = jnp.where(positive[:, None], gt_boxes[best_gt], defaults_xyxy)
    return boxes, labels.astype(jnp.int32)


def encode_targets(gt_boxes, gt_labels, defaults_cxcywh, threshold: float = 0.5):
    """`match` then `encode`, batched: ``(B, G, 4), (B, G) -> (B, D, 4) offsets, (B, D) labels``."""
    boxes, labels = jax.vmap(match, in_axes=(0, 0, None, None))(
        gt_boxes, gt_labels, defaults_cxcywh, threshold)
    return encode(box_ops.xyxy_to_cxcywh(boxes), defaults_cxcywh[None]), labels


def hard_negatives(confidence_loss: jax.Array, positive: jax.Array, ratio: int = 3) -> jax.Array:
    """The ``ratio x positives`` background boxes of highest loss, per image (``(B, D)`` bool);
    positives rank as if their loss were 0 (NVIDIA's), ties keep the lower index."""
    background_loss = jnp.where(positive, 0.0, confidence_loss)
    order = jnp.argsort(-background_loss, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1, stable=True)
    num_negatives = jnp.minimum(ratio * jnp.sum(positive, axis=1, keepdims=True),
                                positive.shape[1])
    return (rank < num_negatives) & ~positive


def ssd_loss(pred_offsets: jax.Array, logits: jax.Array, target_offsets: jax.Array,
             target_labels: jax.Array, negative_ratio: int = 3) -> dict[str, jax.Array]:
    """NVIDIA's SSD loss, float32: per image Smooth L1 on the positives plus cross-entropy on
    them and the hard negatives, over the positives; averaged over the batch (an image without
    positives counts 0). Offsets ``(B, D, 4)``, logits ``(B, D, classes)``, labels ``(B, D)``."""
    pred_offsets = pred_offsets.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    positive = target_labels > 0
    num_positive = jnp.sum(positive, axis=1).astype(jnp.float32)
    box = jnp.sum(jnp.sum(box_ops.smooth_l1(pred_offsets - target_offsets), -1) * positive, axis=1)
    confidence = optax.softmax_cross_entropy_with_integer_labels(logits, target_labels)
    selected = positive | hard_negatives(jax.lax.stop_gradient(confidence), positive,
                                         negative_ratio)
    classification = jnp.sum(confidence * selected, axis=1)
    weight = jnp.where(num_positive > 0, 1.0 / jnp.maximum(num_positive, 1e-6), 0.0)
    return {"loss": jnp.mean((box + classification) * weight),
            "box_loss": jnp.mean(box * weight), "class_loss": jnp.mean(classification * weight),
            "positives": jnp.mean(num_positive)}


def decode_batch(pred_offsets: jax.Array, logits: jax.Array, defaults_cxcywh: jax.Array):
    """Corner boxes in [0, 1] (not clipped) and softmax scores: ``(B, D, 4), (B, D, classes)``."""
    boxes = box_ops.cxcywh_to_xyxy(decode(pred_offsets.astype(jnp.float32), defaults_cxcywh[None]))
    return boxes, jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def postprocess(boxes_xyxy: np.ndarray, scores: np.ndarray, *, score_threshold: float = 0.05,
                iou_threshold: float = 0.45, max_per_class: int = 200,
                max_detections: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's ``(boxes (K, 4), scores (K,), labels (K,))`` from boxes ``(D, 4)`` and scores
    ``(D, classes)``, best first: per class above ``score_threshold``, its ``max_per_class``
    best, NMS; the ``max_detections`` best overall."""
    boxes_xyxy, scores = np.asarray(boxes_xyxy), np.asarray(scores)
    if (boxes_xyxy.ndim != 2 or boxes_xyxy.shape[1] != 4 or scores.ndim != 2
            or boxes_xyxy.shape[0] != scores.shape[0]):
        raise ValueError(f"expected boxes (D, 4) and scores (D, classes), got {boxes_xyxy.shape} "
                         f"and {scores.shape}")
    candidates = []
    for label in range(1, scores.shape[1]):
        index = np.flatnonzero(scores[:, label] > score_threshold)
        if index.size > max_per_class:
            index = index[np.argsort(-scores[index, label], kind="stable")[:max_per_class]]
        candidates.append((index, np.full(index.size, label)))
    if not candidates:  # no class besides the background
        return (np.zeros((0, 4), boxes_xyxy.dtype), np.zeros((0,), scores.dtype),
                np.zeros((0,), np.int64))
    index = np.concatenate([c[0] for c in candidates]).astype(np.int64)
    labels = np.concatenate([c[1] for c in candidates]).astype(np.int64)
    candidate_scores = scores[index, labels]
    keep = box_ops.batched_nms(boxes_xyxy[index], candidate_scores, labels, iou_threshold,
                               max_detections)
    return boxes_xyxy[index[keep]], candidate_scores[keep], labels[keep]
