"""Box arithmetic of the detection recipes, on NumPy (host) or JAX (``jit``) arrays alike.

Boxes are ``(..., 4)`` corners ``(x1, y1, x2, y2)`` unless named ``xywh`` (COCO) or ``cxcywh``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def array_namespace(*arrays):
    """NumPy for NumPy inputs (the host pipeline stays in NumPy), jax.numpy otherwise."""
    return np if all(isinstance(a, (np.ndarray, np.generic, float, int)) for a in arrays) else jnp


def box_area(boxes):
    """Area of corner boxes; an inverted box has area 0."""
    xp = array_namespace(boxes)
    width = xp.maximum(boxes[..., 2] - boxes[..., 0], 0)
    height = xp.maximum(boxes[..., 3] - boxes[..., 1], 0)
    return width * height


def pairwise_iou(boxes1, boxes2):
    """IoU ``(N, M)`` of ``boxes1 (N, 4)`` with ``boxes2 (M, 4)``; an empty union gives 0."""
    xp = array_namespace(boxes1, boxes2)
    top_left = xp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = xp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    size = xp.maximum(bottom_right - top_left, 0)
    intersection = size[..., 0] * size[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - intersection
    return xp.where(union > 0, intersection / xp.where(union > 0, union, 1), 0)


def xyxy_to_xywh(boxes):
    xp = array_namespace(boxes)
    return xp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def cxcywh_to_xyxy(boxes):
    xp = array_namespace(boxes)
    half = boxes[..., 2:] / 2
    return xp.concatenate([boxes[..., :2] - half, boxes[..., :2] + half], axis=-1)


def xyxy_to_cxcywh(boxes):
    xp = array_namespace(boxes)
    return xp.concatenate([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]],
                          axis=-1)


def smooth_l1(x, beta: float = 1.0):
    """torch's SmoothL1Loss, elementwise."""
    absolute = jnp.abs(x)
    return jnp.where(absolute < beta, 0.5 * x * x / beta, absolute - 0.5 * beta)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        max_outputs: int | None = None) -> np.ndarray:
    """Greedy NMS on the host: the kept indices, best first; a kept box drops those whose IoU
    with it exceeds ``iou_threshold`` (strictly, as torchvision), ties keep the lower index."""
    boxes, scores = np.asarray(boxes), np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and (max_outputs is None or len(keep) < max_outputs):
        best, order = order[0], order[1:]
        keep.append(int(best))
        if order.size:
            overlap = pairwise_iou(boxes[best][None], boxes[order])[0]
            order = order[overlap <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float,
                max_outputs: int | None = None) -> np.ndarray:
    """`nms` within each label: indices over all labels, best first (at most ``max_outputs``)."""
    boxes, scores, labels = np.asarray(boxes), np.asarray(scores), np.asarray(labels)
    kept = [np.flatnonzero(labels == label)[nms(boxes[labels == label], scores[labels == label],
                                                 iou_threshold)]
            for label in np.unique(labels)]
    kept = np.concatenate(kept) if kept else np.zeros((0,), np.int64)
    kept = kept[np.argsort(-scores[kept], kind="stable")]
    return kept if max_outputs is None else kept[:max_outputs]
