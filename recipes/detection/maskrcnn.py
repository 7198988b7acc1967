"""Mask R-CNN as torchvision's ``maskrcnn_resnet50_fpn`` (v1), in Flax NNX with static shapes.

The module tree keeps torchvision's names (``backbone/body`` ResNet-50 with frozen BatchNorm,
``backbone/fpn``, ``rpn/head``, ``roi_heads/{box_head,box_predictor,mask_head,mask_predictor}``),
so its state dict maps one to one (`torch_key`; older names are accepted on import). Every count
(proposals, sampled RoIs, detections) is static, padded with validity masks, so training and
inference ``jit``; the computation is in functions of the model and its `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recipes.detection import boxes as box_ops
from recipes.detection import rcnn_ops
from recipes.vision import models, weights


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and the RPN / RoI-head settings (torchvision's defaults)."""

    num_classes: int = 91  # COCO's 90 category ids + background, as torchvision
    num_filters: int = 64  # ResNet width (64: ResNet-50)
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    fpn_channels: int = 256
    representation_size: int = 1024  # box head fc6 / fc7
    mask_channels: int = 256
    trainable_layers: int = 3  # ResNet stages trained, from layer4 down (torchvision default 3)
    train_norm_affine: bool = False  # frozen BN's scale and bias trained (from-scratch default)
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per level P2..P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    canonical_scale: float = 224.0  # MultiScaleRoIAlign's level mapping
    sampling_ratio: int = 2
    box_pool: int = 7
    mask_pool: int = 14
    # RPN.
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    # RoI heads.
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    mask_size: int = 28  # mask_pool * 2 (the deconv doubles it)
    dtype: str = "float32"

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


class FrozenBatchNorm(nnx.Module):
    """torchvision's ``FrozenBatchNorm2d`` (fixed statistics); ``trainable_affine`` makes scale and
    bias ``nnx.Param`` (the from-scratch default, ``zero_scale`` starting a residual branch at
    0, SkipInit-style)."""

    def __init__(self, features: int, *, trainable_affine: bool = False, zero_scale: bool = False,
                 eps: float = 1e-5, dtype: Any = jnp.float32):
        kind = nnx.Param if trainable_affine else nnx.BatchStat
        self.scale = kind(jnp.zeros((features,)) if zero_scale else jnp.ones((features,)))
        self.bias = kind(jnp.zeros((features,)))
        self.mean = nnx.BatchStat(jnp.zeros((features,)))
        self.var = nnx.BatchStat(jnp.ones((features,)))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x, use_running_average: bool = True):  # the flag is ignored: frozen
        scale = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
        shift = self.bias[...] - self.mean[...] * scale
        return x * scale.astype(self.dtype) + shift.astype(self.dtype)


def _resnet_body(config: ModelConfig, dtype, rngs: nnx.Rngs) -> models.ResNet:
    """``models.ResNet`` with `FrozenBatchNorm` everywhere and no classifier."""
    body = models.ResNet(models.Bottleneck, config.stage_sizes, num_classes=1,
                         num_filters=config.num_filters, in_channels=3, stem="imagenet",
                         dtype=dtype, rngs=rngs)
    frozen = functools.partial(FrozenBatchNorm, trainable_affine=config.train_norm_affine,
                               dtype=dtype)
    body.bn1 = frozen(body.bn1.scale.shape[0])
    for stage in (body.layer1, body.layer2, body.layer3, body.layer4):
        for block in stage:
            for name in ("bn1", "bn2", "bn3"):
                last = name == "bn3" and config.train_norm_affine
                setattr(block, name, frozen(getattr(block, name).scale.shape[0], zero_scale=last))
            if block.downsample is not None:
                block.downsample.bn = frozen(block.downsample.bn.scale.shape[0])
    body.fc = None
    return body


def _conv(in_features, out_features, kernel, *, init, dtype, rngs, use_bias=True):
    pad = kernel // 2
    return nnx.Conv(in_features, out_features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                    use_bias=use_bias, kernel_init=init, bias_init=nnx.initializers.zeros,
                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


# kaiming_uniform_(a=1) (FPN), normal(std=0.01) (RPN), kaiming_normal_(fan_out, relu) (mask head).
_fpn_init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
_rpn_init = nnx.initializers.normal(0.01)
_mask_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def nearest_upsample(x, size: tuple[int, int]):
    """``F.interpolate(mode="nearest", size=size)`` on NHWC: source ``floor(i * in / out)``."""
    rows = np.floor(np.arange(size[0]) * (x.shape[1] / size[0])).astype(np.int32)
    cols = np.floor(np.arange(size[1]) * (x.shape[2] / size[1])).astype(np.int32)
    return x[:, rows][:, :, cols]


class FPN(nnx.Module):
    """torchvision's ``FeaturePyramidNetwork`` + ``LastLevelMaxPool`` (P6 = P5[::2, ::2])."""

    def __init__(self, in_channels: list[int], channels: int, *, dtype, rngs: nnx.Rngs):
        conv = functools.partial(_conv, init=_fpn_init, dtype=dtype, rngs=rngs)
        self.inner_blocks = nnx.List([conv(c, channels, 1) for c in in_channels])
        self.layer_blocks = nnx.List([conv(channels, channels, 3) for _ in in_channels])

    def __call__(self, features: list) -> list:
        last = self.inner_blocks[-1](features[-1])
        results = [self.layer_blocks[-1](last)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[i](features[i])
            last = lateral + nearest_upsample(last, lateral.shape[1:3])
            results.insert(0, self.layer_blocks[i](last))
        results.append(results[-1][:, ::2, ::2])  # max_pool2d(kernel 1, stride 2)
        return results


class Backbone(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.body = _resnet_body(config, dtype, rngs)
        widths = [config.num_filters * 2**i * models.Bottleneck.expansion for i in range(4)]
        self.fpn = FPN(widths, config.fpn_channels, dtype=dtype, rngs=rngs)
        self.trainable_layers = config.trainable_layers

    def __call__(self, images) -> list:
        """P2..P6 of NHWC ``images``; stages below the trainable ones get no gradient."""
        body = self.body
        x = nnx.relu(body.bn1(body.conv1(images)))
        x = models.max_pool_3x3(x, stride=2)
        if self.trainable_layers < 5:
            x = jax.lax.stop_gradient(x)
        outputs = []
        for index, stage in enumerate((body.layer1, body.layer2, body.layer3, body.layer4)):
            for block in stage:
                x = block(x, False)
            if index < 4 - self.trainable_layers:
                x = jax.lax.stop_gradient(x)
            outputs.append(x)
        return self.fpn(outputs)


class RPNHead(nnx.Module):
    def __init__(self, channels: int, num_anchors: int, *, dtype, rngs: nnx.Rngs):
        conv = functools.partial(_conv, init=_rpn_init, dtype=dtype, rngs=rngs)
        self.conv = conv(channels, channels, 3)
        self.cls_logits = conv(channels, num_anchors, 1)
        self.bbox_pred = conv(channels, 4 * num_anchors, 1)

    def __call__(self, features: list):
        """Objectness ``(N, T)`` and deltas ``(N, T, 4)`` over all levels, in anchor order."""
        logits, deltas = [], []
        for x in features:
            t = nnx.relu(self.conv(x))
            n = x.shape[0]
            logits.append(self.cls_logits(t).reshape(n, -1))
            deltas.append(self.bbox_pred(t).reshape(n, -1, 4))
        return (jnp.concatenate(logits, 1).astype(jnp.float32),
                jnp.concatenate(deltas, 1).astype(jnp.float32))


class RPN(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs):
        self.head = RPNHead(config.fpn_channels, len(config.aspect_ratios), dtype=dtype, rngs=rngs)


def _linear(in_features, out_features, *, dtype, rngs):
    return nnx.Linear(in_features, out_features, kernel_init=models.torch_linear_init(in_features),
                      bias_init=models.torch_linear_init(in_features), dtype=dtype,
                      param_dtype=jnp.float32, rngs=rngs)


class TwoMLPHead(nnx.Module):
    def __init__(self, in_features: int, size: int, *, dtype, rngs):
        self.fc6 = _linear(in_features, size, dtype=dtype, rngs=rngs)
        self.fc7 = _linear(size, size, dtype=dtype, rngs=rngs)

    def __call__(self, pooled):
        # torch flattens (C, 7, 7): channels slowest.
        x = jnp.transpose(pooled, (0, 3, 1, 2)).reshape(pooled.shape[0], -1)
        return nnx.relu(self.fc7(nnx.relu(self.fc6(x))))


class FastRCNNPredictor(nnx.Module):
    def __init__(self, size: int, num_classes: int, *, dtype, rngs):
        self.cls_score = _linear(size, num_classes, dtype=dtype, rngs=rngs)
        self.bbox_pred = _linear(size, num_classes * 4, dtype=dtype, rngs=rngs)


class ConvTranspose2x2(nnx.Module):
    """``ConvTranspose2d(in, out, 2, stride=2)`` as one matmul (each pixel writes its own 2x2
    block); kernel ``(2, 2, in, out)``."""

    def __init__(self, in_features: int, out_features: int, *, dtype, rngs):
        self.kernel = nnx.Param(_mask_init(rngs.params(), (2, 2, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))
        self.dtype = dtype

    def __call__(self, x):
        n, h, w, _ = x.shape
        y = jnp.einsum("nhwc,abco->nhawbo", x, self.kernel[...].astype(self.dtype))
        return y.reshape(n, 2 * h, 2 * w, -1) + self.bias[...].astype(self.dtype)


class MaskRCNNPredictor(nnx.Module):
    def __init__(self, channels: int, num_classes: int, *, dtype, rngs):
        self.conv5_mask = ConvTranspose2x2(channels, channels, dtype=dtype, rngs=rngs)
        self.mask_fcn_logits = _conv(channels, num_classes, 1, init=_mask_init, dtype=dtype,
                                     rngs=rngs)


class RoIHeads(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs):
        c = config.fpn_channels
        self.box_head = TwoMLPHead(c * config.box_pool**2, config.representation_size,
                                   dtype=dtype, rngs=rngs)
        self.box_predictor = FastRCNNPredictor(config.representation_size, config.num_classes,
                                               dtype=dtype, rngs=rngs)
        widths = [c] + [config.mask_channels] * 4
        self.mask_head = nnx.List([_conv(widths[i], widths[i + 1], 3, init=_mask_init,
                                         dtype=dtype, rngs=rngs) for i in range(4)])
        self.mask_predictor = MaskRCNNPredictor(config.mask_channels, config.num_classes,
                                                dtype=dtype, rngs=rngs)


class MaskRCNN(nnx.Module):
    """torchvision's ``MaskRCNN`` modules (the computation is in the functions below)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        if config.mask_size != 2 * config.mask_pool:
            raise ValueError(f"mask_size {config.mask_size} must be twice mask_pool "
                             f"{config.mask_pool} (the 2x2/2 deconvolution)")
        if not 0 <= config.trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {config.trainable_layers}")
        self.backbone = Backbone(config, dtype=dtype, rngs=rngs)
        self.rpn = RPN(config, dtype=dtype, rngs=rngs)
        self.roi_heads = RoIHeads(config, dtype=dtype, rngs=rngs)
        self.config = config


def create_model(config: ModelConfig, seed: int = 0) -> MaskRCNN:
    return MaskRCNN(config, rngs=models.init_rngs(seed))


def frozen_parameter(path: str, config: ModelConfig) -> bool:
    """Whether a ``/``-joined parameter path is frozen (torchvision's ``_resnet_fpn_extractor``)."""
    names = ["layer4", "layer3", "layer2", "layer1", "conv1"][config.trainable_layers:]
    if "conv1" in names:
        names.append("bn1")
    return any(path.startswith(f"backbone/body/{name}/") for name in names)


_SUFFIX_ZERO = re.compile(r"^(backbone\.fpn\.(inner|layer)_blocks\.\d+|roi_heads\.mask_head\.\d+)$")
_OLD_NAMES = (
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d)\.(weight|bias)$"),
     lambda m: f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"),
)
DECONV_KEY = "roi_heads.mask_predictor.conv5_mask.weight"


def torch_key(path: tuple[Any, ...]) -> str:
    """The torchvision state-dict key of an NNX leaf path."""
    key = weights._torch_key(path)
    module, leaf = key.rsplit(".", 1)
    if _SUFFIX_ZERO.match(module):
        module += ".0"
    elif module == "rpn.head.conv":
        module += ".0.0"
    return f"{module}.{leaf}"


def import_torchvision_state_dict(model: MaskRCNN, state_dict: dict[str, np.ndarray]) -> None:
    """Copies a torchvision ``maskrcnn_resnet50_fpn`` state dict (older names too) into ``model``;
    ``ValueError`` naming the key and shapes on a mismatch."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in _OLD_NAMES:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    state_dict = renamed
    if DECONV_KEY in state_dict:  # ConvTranspose2d (in, out, kh, kw) -> a conv's (out, in, ..)
        state_dict[DECONV_KEY] = np.transpose(np.asarray(state_dict[DECONV_KEY]), (1, 0, 2, 3))
    weights.import_state_dict(model, state_dict, torch_key, "torchvision Mask R-CNN")


def feature_sizes(image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Sizes of P2..P6 for a padded ``image_hw`` (stem, max-pool, stages, P6 halve, rounding up)."""
    sizes = [(-(-image_hw[0] // 4), -(-image_hw[1] // 4))]
    for _ in range(4):
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    return sizes


def anchors_for(config: ModelConfig, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Anchors of a padded ``image_hw`` batch (one size per level P2..P6) and their levels."""
    return rcnn_ops.generate_anchors(image_hw, feature_sizes(image_hw),
                                     [(s,) for s in config.anchor_sizes],
                                     [config.aspect_ratios] * len(config.anchor_sizes))


def propose(config: ModelConfig, objectness, deltas, anchors: np.ndarray, levels: np.ndarray,
            image_hw, train: bool):
    """torchvision's ``filter_proposals``: ``(N, P, 4)`` boxes (no gradient), ``(N, P)`` validity
    (per level the ``pre_nms_top_n`` best, decoded, clipped, NMS; the ``post_nms_top_n`` best)."""
    pre = config.rpn_pre_nms_top_n_train if train else config.rpn_pre_nms_top_n_test
    post = config.rpn_post_nms_top_n_train if train else config.rpn_post_nms_top_n_test
    objectness = jax.lax.stop_gradient(objectness)
    deltas = jax.lax.stop_gradient(deltas)
    counts = np.bincount(levels)
    starts = np.concatenate([[0], np.cumsum(counts)])
    k = min(pre, int(counts.max()))

    def one_image(logits, image_deltas, hw):
        boxes, scores, valid = [], [], []
        for level, count in enumerate(counts):
            start = starts[level]
            top = min(pre, int(count))
            level_scores, index = jax.lax.top_k(logits[start:start + count], top)
            index = index + start
            decoded = rcnn_ops.decode_boxes(image_deltas[index], jnp.asarray(anchors)[index])
            decoded = rcnn_ops.clip_boxes(decoded, hw)
            big = (((decoded[:, 2] - decoded[:, 0]) >= 1e-3)
                   & ((decoded[:, 3] - decoded[:, 1]) >= 1e-3))
            pad = k - top
            boxes.append(jnp.pad(decoded, ((0, pad), (0, 0))))
            scores.append(jnp.pad(level_scores, (0, pad), constant_values=-jnp.inf))
            valid.append(jnp.pad(big, (0, pad)))
        boxes, scores, valid = jnp.stack(boxes), jnp.stack(scores), jnp.stack(valid)
        keep = jax.vmap(rcnn_ops.nms_keep, in_axes=(0, 0, 0, None))(
            boxes, scores, valid, config.rpn_nms_thresh)
        flat_scores = scores.reshape(-1)
        index, ok = rcnn_ops.top_k_kept(flat_scores, keep.reshape(-1),
                                        min(post, flat_scores.shape[0]))
        return boxes.reshape(-1, 4)[index], ok

    return jax.vmap(one_image)(objectness, deltas, image_hw)


def _pool(config: ModelConfig, features: list, rois, size: int):
    """``MultiScaleRoIAlign`` over P2..P5 of ``rois (N, R, 4)``: ``(N * R, size, size, C)``."""
    n, r = rois.shape[:2]
    return rcnn_ops.multiscale_roi_align(
        features[:4], rois.reshape(-1, 4), np.repeat(np.arange(n), r), (size, size),
        config.sampling_ratio, canonical_scale=config.canonical_scale)


def box_head(model: MaskRCNN, features: list, rois):
    """Class logits ``(N, R, C)`` and per-class deltas ``(N, R, C, 4)`` of ``rois (N, R, 4)``."""
    n, r = rois.shape[:2]
    x = model.roi_heads.box_head(_pool(model.config, features, rois, model.config.box_pool))
    predictor = model.roi_heads.box_predictor
    logits = predictor.cls_score(x).astype(jnp.float32).reshape(n, r, -1)
    deltas = predictor.bbox_pred(x).astype(jnp.float32).reshape(n, r, -1, 4)
    return logits, deltas


def mask_head(model: MaskRCNN, features: list, rois):
    """Mask logits ``(N, R, 28, 28, C)`` of ``rois (N, R, 4)``."""
    n, r = rois.shape[:2]
    x = _pool(model.config, features, rois, model.config.mask_pool)
    for conv in model.roi_heads.mask_head:
        x = nnx.relu(conv(x))
    predictor = model.roi_heads.mask_predictor
    x = nnx.relu(predictor.conv5_mask(x))
    logits = predictor.mask_fcn_logits(x).astype(jnp.float32)
    return logits.reshape(n, r, *logits.shape[1:])


def rpn_loss(config: ModelConfig, key, objectness, deltas, anchors, gt_boxes, gt_valid):
    """torchvision's RPN loss: BCE over the sampled anchors, smooth-L1 (beta 1/9) over the sampled
    positives, both over the number sampled in the batch."""
    anchors = jnp.asarray(anchors)

    def one_image(key, logits, image_deltas, boxes, valid):
        matches, index, ok, positive = rcnn_ops.sample_matches(
            key, box_ops.pairwise_iou(boxes, anchors), valid, config.rpn_fg_iou_thresh,
            config.rpn_bg_iou_thresh, True, config.rpn_batch_size_per_image,
            config.rpn_positive_fraction)
        bce = _bce(logits[index], positive.astype(jnp.float32))
        targets = rcnn_ops.encode_boxes(boxes[jnp.maximum(matches[index], 0)], anchors[index])
        box = jnp.sum(box_ops.smooth_l1(image_deltas[index] - targets, 1.0 / 9.0), axis=-1)
        ok = ok.astype(jnp.float32)
        pos = (positive & (ok > 0)).astype(jnp.float32)
        return jnp.sum(bce * ok), jnp.sum(box * pos), jnp.sum(ok)

    keys = jax.random.split(key, objectness.shape[0])
    bce, box, count = jax.vmap(one_image)(keys, objectness, deltas, gt_boxes, gt_valid)
    count = jnp.maximum(jnp.sum(count), 1.0)
    return jnp.sum(bce) / count, jnp.sum(box) / count


def _bce(logits, targets):
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def sample_rois(config: ModelConfig, key, proposals, proposal_valid, gt_boxes, gt_labels,
                gt_valid):
    """torchvision's ``select_training_samples`` (ground truth appended to the proposals): ``(N,
    B)`` arrays ``rois``, ``valid``, ``positive`` (in the first slots), ``labels`` (0:
    background), ``matched`` (ground truth) and ``targets``."""
    def one_image(key, boxes, valid, gt, labels, gt_ok):
        candidates = jnp.concatenate([boxes, gt], 0)
        candidate_ok = jnp.concatenate([valid, gt_ok], 0)
        matches, index, ok, positive = rcnn_ops.sample_matches(
            key, box_ops.pairwise_iou(gt, candidates), gt_ok, config.box_fg_iou_thresh,
            config.box_bg_iou_thresh, False, config.box_batch_size_per_image,
            config.box_positive_fraction, candidate_ok)
        rois = candidates[index]
        matched = jnp.maximum(matches[index], 0)
        return {"rois": rois, "valid": ok, "positive": positive & ok,
                "labels": jnp.where(positive & ok, labels[matched], 0), "matched": matched,
                "targets": rcnn_ops.encode_boxes(gt[matched], rois, config.bbox_reg_weights)}

    keys = jax.random.split(key, proposals.shape[0])
    return jax.vmap(one_image)(keys, jax.lax.stop_gradient(proposals), proposal_valid, gt_boxes,
                               gt_labels, gt_valid)


def losses(model: MaskRCNN, key, images, image_hw, gt_boxes, gt_labels, gt_masks) -> dict:
    """torchvision's five training losses for a padded batch (``image_hw (N, 2)`` the unpadded
    sizes, ``gt_boxes (N, G, 4)`` pixels, ``gt_labels (N, G)`` 0 for padding, ``gt_masks``)."""
    config = model.config
    anchors, levels = anchors_for(config, images.shape[1:3])
    gt_valid = gt_labels > 0
    features = model.backbone(images)
    objectness, deltas = model.rpn.head(features)
    rpn_key, roi_key = jax.random.split(key)
    loss_objectness, loss_rpn_box = rpn_loss(config, rpn_key, objectness, deltas, anchors,
                                             gt_boxes, gt_valid)
    proposals, proposal_valid = propose(config, objectness, deltas, anchors, levels, image_hw,
                                        train=True)
    samples = sample_rois(config, roi_key, proposals, proposal_valid, gt_boxes, gt_labels,
                          gt_valid)
    logits, box_deltas = box_head(model, features, samples["rois"])
    ok = samples["valid"].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(ok), 1.0)
    log_probs = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(log_probs, samples["labels"][..., None], -1)[..., 0]
    loss_classifier = jnp.sum(ce * ok) / count
    picked = jnp.take_along_axis(box_deltas, samples["labels"][..., None, None], 2)[:, :, 0]
    box_error = jnp.sum(box_ops.smooth_l1(picked - samples["targets"], 1.0 / 9.0), -1)
    loss_box_reg = jnp.sum(box_error * samples["positive"]) / count
    # Masks: the positive slots only.
    num_pos = int(config.box_batch_size_per_image * config.box_positive_fraction)
    rois = samples["rois"][:, :num_pos]
    positive = samples["positive"][:, :num_pos].astype(jnp.float32)
    targets = jax.vmap(lambda m, r, i: rcnn_ops.mask_targets(m, r, i, config.mask_size,
                                                             config.sampling_ratio))(
        gt_masks, rois, samples["matched"][:, :num_pos])
    mask_logits = mask_head(model, features, rois)
    chosen = jnp.take_along_axis(mask_logits, samples["labels"][:, :num_pos, None, None, None],
                                 -1)[..., 0]
    pixels = jnp.mean(_bce(chosen, targets), axis=(-2, -1))
    loss_mask = jnp.sum(pixels * positive) / jnp.maximum(jnp.sum(positive), 1.0)
    return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box,
            "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
            "loss_mask": loss_mask}


def detect_boxes(model: MaskRCNN, images, image_hw):
    """Inference before NMS: features, and per proposal class probabilities ``(N, P, C)``, class
    boxes ``(N, P, C, 4)`` clipped to the image, validity ``(N, P)``."""
    config = model.config
    anchors, levels = anchors_for(config, images.shape[1:3])
    features = model.backbone(images)
    objectness, deltas = model.rpn.head(features)
    proposals, valid = propose(config, objectness, deltas, anchors, levels, image_hw, train=False)
    logits, box_deltas = box_head(model, features, proposals)
    boxes = rcnn_ops.decode_boxes(box_deltas, proposals[:, :, None, :], config.bbox_reg_weights)
    boxes = rcnn_ops.clip_boxes(boxes, image_hw[:, None, None, :])
    return features, jax.nn.softmax(logits, -1), boxes, valid


def select_detections(config: ModelConfig, scores: np.ndarray, boxes: np.ndarray,
                      valid: np.ndarray):
    """torchvision's ``postprocess_detections`` for one image on the host: ``(boxes (D, 4),
    scores (D,), labels (D,))``, best first."""
    num_classes = scores.shape[-1]
    labels = np.broadcast_to(np.arange(num_classes), scores.shape)[:, 1:].reshape(-1)
    cand_scores = np.where(valid[:, None], scores[:, 1:], 0.0).reshape(-1)
    cand_boxes = boxes[:, 1:].reshape(-1, 4)
    wide = (((cand_boxes[:, 2] - cand_boxes[:, 0]) >= 1e-2)
            & ((cand_boxes[:, 3] - cand_boxes[:, 1]) >= 1e-2))
    keep = np.flatnonzero((cand_scores > config.box_score_thresh) & wide)
    kept = box_ops.batched_nms(cand_boxes[keep], cand_scores[keep], labels[keep],
                               config.box_nms_thresh, config.detections_per_img)
    keep = keep[kept]
    return cand_boxes[keep], cand_scores[keep], labels[keep]


def detect_masks(model: MaskRCNN, features: list, boxes, labels):
    """Mask probabilities ``(N, D, 28, 28)`` of the detections ``boxes (N, D, 4)`` for their
    ``labels (N, D)``."""
    logits = mask_head(model, features, boxes)
    chosen = jnp.take_along_axis(logits, labels[:, :, None, None, None], -1)[..., 0]
    return jax.nn.sigmoid(chosen)
