"""Box arithmetic shared by the detection recipes (SSD, Mask R-CNN).

Boxes are ``(..., 4)`` arrays of corners ``(x1, y1, x2, y2)`` unless a name says otherwise
(``xywh``: COCO's left, top, width, height; ``cxcywh``: centre and size). The functions take
NumPy arrays (host-side data pipelines and post-processing) or JAX arrays (inside ``jit``) and
answer in the same kind.
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
    """Intersection over union of every box of ``boxes1 (N, 4)`` with every one of ``boxes2 (M, 4)``.

    Returns ``(N, M)``; a pair whose union is empty (two degenerate boxes) has IoU 0.
    """
    xp = array_namespace(boxes1, boxes2)
    top_left = xp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = xp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    size = xp.maximum(bottom_right - top_left, 0)
    intersection = size[..., 0] * size[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - intersection
    return xp.where(union > 0, intersection / xp.where(union > 0, union, 1), 0)


def xywh_to_xyxy(boxes):
    xp = array_namespace(boxes)
    return xp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


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


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        max_outputs: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression on the host.

    Keeps the highest-scoring box, drops every remaining box whose IoU with it exceeds
    ``iou_threshold`` (strictly, as torchvision), and repeats. Ties in score keep the lower index.

    Returns:
        Indices of the kept boxes, best score first (at most ``max_outputs``).
    """
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
    """NMS within each label separately (boxes of different labels never suppress each other).

    Returns:
        Indices of the kept boxes over all labels, best score first (at most ``max_outputs``).
    """
    boxes, scores, labels = np.asarray(boxes), np.asarray(scores), np.asarray(labels)
    kept = [np.flatnonzero(labels == label)[nms(boxes[labels == label], scores[labels == label],
                                                 iou_threshold)]
            for label in np.unique(labels)]
    kept = np.concatenate(kept) if kept else np.zeros((0,), np.int64)
    kept = kept[np.argsort(-scores[kept], kind="stable")]
    return kept if max_outputs is None else kept[:max_outputs]
