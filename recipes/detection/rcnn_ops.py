"""Mask R-CNN building blocks with torchvision's semantics (``maskrcnn_resnet50_fpn`` v1) and
static shapes, so that they ``jit``: anchors, the box coder, RoIAlign, fixed-size NMS, matching,
balanced sampling, mask targets and paste-back. Each function says where it departs from
torchvision (only where a static shape requires it). Corner boxes in image pixels, NHWC maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recipes.detection import boxes as box_ops

# torchvision's BoxCoder clamps the predicted log-scale changes at log(1000 / 16).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """One cell's anchors around (0, 0), ``(len(ratios) * len(sizes), 4)``, ratio slowest:
    torchvision's ``round(+-(size / sqrt(r), size * sqrt(r)) / 2)`` in float32."""
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    if scales.ndim != 1 or ratios.ndim != 1 or not scales.size or not ratios.size:
        raise ValueError(f"sizes and aspect_ratios must be non-empty 1-D sequences, got {sizes!r} "
                         f"and {aspect_ratios!r}")
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1.0) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)).astype(np.float32)


def grid_anchors(base: np.ndarray, grid_hw: tuple[int, int],
                 stride_hw: tuple[int, int]) -> np.ndarray:
    """``base`` anchors on every cell of a ``grid_hw`` map: ``(H * W * A, 4)``, cell-major (the
    RPN head's ``(N, H, W, A)`` order)."""
    shift_x = np.arange(grid_hw[1], dtype=np.float32) * stride_hw[1]
    shift_y = np.arange(grid_hw[0], dtype=np.float32) * stride_hw[0]
    yy, xx = np.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = np.stack([xx, yy, xx, yy], axis=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4).astype(np.float32)


def generate_anchors(image_hw: tuple[int, int], feature_hws: Sequence[tuple[int, int]],
                     sizes: Sequence[Sequence[float]],
                     aspect_ratios: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """``(anchors (T, 4), level (T,))`` of a padded ``image_hw`` with maps ``feature_hws``; level
    ``l`` has ``sizes[l]``, ``aspect_ratios[l]`` and stride ``image // feature`` (torchvision)."""
    if not (len(feature_hws) == len(sizes) == len(aspect_ratios)):
        raise ValueError(f"{len(feature_hws)} feature maps but {len(sizes)} anchor sizes and "
                         f"{len(aspect_ratios)} aspect-ratio sets: one of each per level")
    anchors, levels = [], []
    for level, (hw, level_sizes, ratios) in enumerate(zip(feature_hws, sizes, aspect_ratios)):
        stride = (image_hw[0] // hw[0], image_hw[1] // hw[1])
        level_anchors = grid_anchors(cell_anchors(level_sizes, ratios), hw, stride)
        anchors.append(level_anchors)
        levels.append(np.full((len(level_anchors),), level, np.int32))
    return np.concatenate(anchors), np.concatenate(levels)


def encode_boxes(targets, references, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
    """torchvision's ``BoxCoder``: ``(wx dx / w, wy dy / h, ww log(w' / w), wh log(h' / h))``."""
    wx, wy, ww, wh = weights
    ref_w = references[..., 2] - references[..., 0]
    ref_h = references[..., 3] - references[..., 1]
    ref_x = references[..., 0] + 0.5 * ref_w
    ref_y = references[..., 1] + 0.5 * ref_h
    gt_w = targets[..., 2] - targets[..., 0]
    gt_h = targets[..., 3] - targets[..., 1]
    gt_x = targets[..., 0] + 0.5 * gt_w
    gt_y = targets[..., 1] + 0.5 * gt_h
    return jnp.stack([wx * (gt_x - ref_x) / ref_w, wy * (gt_y - ref_y) / ref_h,
                      ww * jnp.log(gt_w / ref_w), wh * jnp.log(gt_h / ref_h)], axis=-1)


def decode_boxes(deltas, references, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 clip: float = BBOX_XFORM_CLIP):
    """The inverse of `encode_boxes`; ``dw`` and ``dh`` are clamped at ``clip`` first."""
    wx, wy, ww, wh = weights
    deltas = deltas.astype(jnp.float32)
    ref_w = references[..., 2] - references[..., 0]
    ref_h = references[..., 3] - references[..., 1]
    ref_x = references[..., 0] + 0.5 * ref_w
    ref_y = references[..., 1] + 0.5 * ref_h
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, clip)
    dh = jnp.minimum(deltas[..., 3] / wh, clip)
    x, y = dx * ref_w + ref_x, dy * ref_h + ref_y
    half_w, half_h = 0.5 * jnp.exp(dw) * ref_w, 0.5 * jnp.exp(dh) * ref_h
    return jnp.stack([x - half_w, y - half_h, x + half_w, y + half_h], axis=-1)


def clip_boxes(boxes, image_hw):
    """Boxes clamped to ``[0, width] x [0, height]`` of ``image_hw`` (``(..., 2)``, broadcast)."""
    image_hw = jnp.asarray(image_hw, jnp.float32)
    h, w = image_hw[..., 0:1], image_hw[..., 1:2]
    x = jnp.clip(boxes[..., 0::2], 0.0, w)
    y = jnp.clip(boxes[..., 1::2], 0.0, h)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def _bilinear_axis(coords, size, valid_extent):
    """The two neighbours and weights of each coordinate, as torchvision's
    ``bilinear_interpolate`` (below -1 or beyond ``size``: weight 0)."""
    inside = (coords >= -1.0) & (coords <= valid_extent)
    coords = jnp.maximum(coords, 0.0)
    low = jnp.floor(coords).astype(jnp.int32)
    at_end = low >= size - 1
    low = jnp.where(at_end, size - 1, low)
    high = jnp.where(at_end, size - 1, low + 1)
    frac = jnp.where(at_end, 0.0, coords - low)
    weight = inside.astype(coords.dtype)
    return low, high, (1.0 - frac) * weight, frac * weight


def _roi_align_flat(flat, heights, widths, offsets, scales, rois, batch_index,
                    output_size: tuple[int, int], sampling_ratio: int, aligned: bool):
    """RoIAlign from row-major flattened maps ``flat (N, T, C)``: roi ``r`` reads the
    ``heights[r] x widths[r]`` map at ``offsets[r]`` of image ``batch_index[r]``."""
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be positive (a fixed grid, for static shapes), got "
                         f"{sampling_ratio}; torchvision's adaptive ratio (<= 0) is not supported")
    ph, pw = output_size
    s = sampling_ratio
    rois = rois.astype(jnp.float32)
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 0] * scales - offset
    y1 = rois[:, 1] * scales - offset
    roi_w = rois[:, 2] * scales - offset - x1
    roi_h = rois[:, 3] * scales - offset - y1
    if not aligned:  # the legacy behaviour: rois are at least 1 x 1
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    # Sample positions: bin p, sample i at start + p * bin + (i + 0.5) * bin / s.
    grid_y = np.repeat(np.arange(ph), s) + (np.tile(np.arange(s), ph) + 0.5) / s  # in bins
    grid_x = np.repeat(np.arange(pw), s) + (np.tile(np.arange(s), pw) + 0.5) / s
    ys = y1[:, None] + grid_y[None, :] * bin_h[:, None]  # (R, ph * s)
    xs = x1[:, None] + grid_x[None, :] * bin_w[:, None]  # (R, pw * s)
    hgt = heights[:, None].astype(jnp.float32)
    wid = widths[:, None].astype(jnp.float32)
    y_lo, y_hi, wy_lo, wy_hi = _bilinear_axis(ys, heights[:, None], hgt)
    x_lo, x_hi, wx_lo, wx_hi = _bilinear_axis(xs, widths[:, None], wid)
    base = offsets[:, None, None]
    row = widths[:, None, None]
    batch = batch_index[:, None, None]
    out = 0.0
    for y_idx, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for x_idx, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            index = base + y_idx[:, :, None] * row + x_idx[:, None, :]  # (R, ph * s, pw * s)
            weight = (wy[:, :, None] * wx[:, None, :]).astype(flat.dtype)
            out = out + weight[..., None] * flat[batch, index]
    c = flat.shape[-1]
    return out.reshape(-1, ph, s, pw, s, c).mean(axis=(2, 4))


def roi_align(features, rois, batch_index, output_size: tuple[int, int], spatial_scale: float,
              sampling_ratio: int = 2, aligned: bool = False):
    """``torchvision.ops.roi_align`` on NHWC ``features``: ``(R, ph, pw, C)`` for ``rois (R,
    4)`` of images ``batch_index (R,)``, with a fixed ``sampling_ratio`` (static shapes)."""
    n, h, w, c = features.shape
    r = rois.shape[0]
    if rois.ndim != 2 or rois.shape[-1] != 4:
        raise ValueError(f"rois must be (R, 4) corner boxes, got shape {rois.shape}")
    flat = features.reshape(n, h * w, c)
    full = lambda v: jnp.full((r,), v)  # noqa: E731
    return _roi_align_flat(flat, full(h), full(w), full(0), full(spatial_scale).astype(jnp.float32),
                           rois, jnp.asarray(batch_index, jnp.int32), tuple(output_size),
                           sampling_ratio, aligned)


def roi_levels(rois, num_levels: int, min_level: int = 2, canonical_scale: float = 224.0,
               canonical_level: int = 4):
    """torchvision's ``LevelMapper``: each roi's pyramid level, 0-based from ``min_level``."""
    area = box_ops.box_area(rois.astype(jnp.float32))
    level = jnp.floor(canonical_level + jnp.log2(jnp.sqrt(area) / canonical_scale) + 1e-6)
    level = jnp.clip(level, min_level, min_level + num_levels - 1)
    return (level - min_level).astype(jnp.int32)


def multiscale_roi_align(features: Sequence, rois, batch_index, output_size: tuple[int, int],
                         sampling_ratio: int = 2, min_level: int = 2,
                         canonical_scale: float = 224.0, canonical_level: int = 4,
                         aligned: bool = False):
    """torchvision's ``MultiScaleRoIAlign`` over ``features`` (finest first, map ``l`` at stride
    ``2**(min_level + l)``); one gather over all maps flattened, whatever each roi's level."""
    n, c = features[0].shape[0], features[0].shape[-1]
    sizes = [f.shape[1:3] for f in features]
    flat = jnp.concatenate([f.reshape(n, -1, c) for f in features], axis=1)
    starts = np.cumsum([0] + [h * w for h, w in sizes])[:-1]
    level = roi_levels(rois, len(features), min_level, canonical_scale, canonical_level)
    pick = lambda values: jnp.asarray(np.asarray(values))[level]  # noqa: E731
    scales = pick([2.0 ** -(min_level + l) for l in range(len(features))]).astype(jnp.float32)
    return _roi_align_flat(flat, pick([h for h, _ in sizes]), pick([w for _, w in sizes]),
                           pick(starts), scales, rois, jnp.asarray(batch_index, jnp.int32),
                           tuple(output_size), sampling_ratio, aligned)


def nms_keep(boxes, scores, valid, iou_threshold: float):
    """`boxes.nms` over ``K`` fixed candidates, as a ``(K,)`` kept mask; invalid ones (padding)
    are neither kept nor suppress."""
    k = boxes.shape[0]
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
    sorted_boxes, sorted_valid = boxes[order], valid[order]
    overlaps = box_ops.pairwise_iou(sorted_boxes, sorted_boxes) > iou_threshold
    later = jnp.arange(k)

    def step(i, suppressed):
        kept = sorted_valid[i] & ~suppressed[i]
        return suppressed | (kept & overlaps[i] & (later > i))

    suppressed = jax.lax.fori_loop(0, k, step, jnp.zeros((k,), bool))
    return jnp.zeros((k,), bool).at[order].set(sorted_valid & ~suppressed)


def top_k_kept(scores, keep, k: int):
    """Indices of the ``k`` best kept candidates and their validity (fewer kept: False)."""
    masked = jnp.where(keep, scores, -jnp.inf)
    if k > scores.shape[0]:
        raise ValueError(f"cannot take {k} of {scores.shape[0]} candidates")
    _, index = jax.lax.top_k(masked, k)
    return index, keep[index]


BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def match_boxes(iou, gt_valid, high_threshold: float, low_threshold: float,
                allow_low_quality_matches: bool):
    """torchvision's ``Matcher`` on ``iou (G, P)``: per prediction its ground truth, -1 below
    ``low_threshold``, -2 between the thresholds; padded ground truth is never matched."""
    iou = jnp.where(gt_valid[:, None], iou, -1.0)
    best = jnp.max(iou, axis=0)
    matches = jnp.argmax(iou, axis=0).astype(jnp.int32)
    result = jnp.where(best < low_threshold, BELOW_LOW_THRESHOLD,
                       jnp.where(best < high_threshold, BETWEEN_THRESHOLDS, matches))
    if allow_low_quality_matches:
        highest_per_gt = jnp.max(iou, axis=1, keepdims=True)
        is_highest = jnp.any((iou == highest_per_gt) & gt_valid[:, None], axis=0)
        result = jnp.where(is_highest, matches, result)
    return result


def sample_matches(key, iou, gt_valid, high_threshold: float, low_threshold: float,
                   allow_low_quality_matches: bool, batch_size: int, positive_fraction: float,
                   candidate_valid=True):
    """`match_boxes`, then `sample_balanced` of the matched (positives) and those below
    ``low_threshold`` (negatives) among ``candidate_valid``: ``(matches, index, valid,
    positive)``."""
    matches = match_boxes(iou, gt_valid, high_threshold, low_threshold, allow_low_quality_matches)
    labels = jnp.where(matches >= 0, 1, jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
    labels = jnp.where(candidate_valid, labels, -1)
    return (matches, *sample_balanced(key, labels, batch_size, positive_fraction))


def sample_balanced(key, labels, batch_size: int, positive_fraction: float):
    """torchvision's ``BalancedPositiveNegativeSampler`` on ``labels (P,)`` (1, 0, -1 ignored),
    fixed size: ``(index, valid, positive)``, the positives in the first
    ``int(batch_size * positive_fraction)`` slots, negatives in the rest."""
    p = labels.shape[0]
    max_pos = int(batch_size * positive_fraction)
    if batch_size > p:
        raise ValueError(f"cannot sample {batch_size} of {p} candidates")
    pos, neg = labels == 1, labels == 0
    u_pos, u_neg = jax.random.uniform(key, (2, p))
    pos_order = jnp.argsort(jnp.where(pos, u_pos, 2.0))  # positives first, in random order
    neg_order = jnp.argsort(jnp.where(neg, u_neg, 2.0))
    num_pos = jnp.minimum(max_pos, jnp.sum(pos))
    num_neg = jnp.minimum(batch_size - num_pos, jnp.sum(neg))
    slot = jnp.arange(batch_size)
    # Negative rank of each slot: the tail slots take ranks 0.., the unused positive slots next.
    neg_rank = jnp.where(slot >= max_pos, slot - max_pos, batch_size - max_pos + slot - num_pos)
    is_pos = slot < num_pos
    index = jnp.where(is_pos, pos_order[jnp.minimum(slot, p - 1)],
                      neg_order[jnp.clip(neg_rank, 0, p - 1)])
    valid = is_pos | ((neg_rank >= 0) & (neg_rank < num_neg))
    return index, valid, is_pos


def mask_targets(gt_masks, rois, matched, size: int, sampling_ratio: int = 2):
    """torchvision's ``project_masks_on_boxes``: ``(K, size, size)`` targets of ``gt_masks (G, H,
    W)`` on ``rois (K, 4)`` of ground truth ``matched (K,)``, with a fixed sampling grid."""
    features = gt_masks.astype(jnp.float32)[..., None]
    return roi_align(features, rois, matched, (size, size), 1.0, sampling_ratio,
                     aligned=False)[..., 0]


def _resize_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``(out, in)`` weights of ``F.interpolate``'s 1-D bilinear resize (align_corners False)."""
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = src - low
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), high), frac)
    return matrix


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """torchvision's ``paste_masks_in_image``: ``masks (D, M, M)`` of ``boxes (D, 4)`` ->
    ``(D, H, W)`` probabilities on the image (a 1-pixel border, boxes grown by ``(M + 2) / M``)."""
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float32)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or len(masks) != len(boxes):
        raise ValueError(f"expected masks (D, M, M) and boxes (D, 4), got {masks.shape} and "
                         f"{boxes.shape}")
    image_h, image_w = image_hw
    out = np.zeros((len(masks), image_h, image_w), np.float32)
    if not len(masks):
        return out
    m = masks.shape[-1]
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    scale = np.float32((m + 2) / m)
    half_w = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    cy = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    expanded = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1).astype(np.int32)
    for i, (x1, y1, x2, y2) in enumerate(expanded):
        w, h = max(int(x2 - x1 + 1), 1), max(int(y2 - y1 + 1), 1)
        resized = _resize_matrix(h, m + 2) @ padded[i] @ _resize_matrix(w, m + 2).T
        x_0, x_1 = max(x1, 0), min(x2 + 1, image_w)
        y_0, y_1 = max(y1, 0), min(y2 + 1, image_h)
        if x_1 > x_0 and y_1 > y_0:
            out[i, y_0:y_1, x_0:x_1] = resized[y_0 - y1:y_1 - y1, x_0 - x1:x_1 - x1]
    return out
