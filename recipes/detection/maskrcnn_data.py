"""COCO instance-segmentation batches for Mask R-CNN (grain), on top of ``coco_data``.

`MaskSource` is ``coco_data.CocoDetectionSource`` plus each object's segmentation (polygons or
RLE, decoded per image with pycocotools). The transforms follow torchvision's detection
reference and ``GeneralizedRCNNTransform``:

* training: horizontal flip (p 0.5), then resize so the short side is a size drawn from
  ``min_sizes`` (one size: torchvision's v1 recipe, 800) and the long side at most ``max_size``
  (1333) -- image bilinear, masks nearest, boxes scaled;
* evaluation: the same resize with the test size, no flip;
* both: pad at the bottom and right to a fixed ``canvas`` (static shapes for ``jit``;
  torchvision pads each batch to its largest image rounded up to 32, and groups images by
  aspect ratio), ground truth padded to ``max_boxes`` rows (label 0).

Batches: ``image`` uint8 ``(N, H, W, 3)`` (normalised on the device), ``image_hw`` int32 the
resized, unpadded size, ``boxes (N, G, 4)`` corner pixels, ``labels (N, G)`` in 1..C,
``masks (N, G, H, W)`` uint8; evaluation batches carry ``image_id``, ``size`` (the original
height and width) and ``valid`` (0 for the padding images of the last batch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from recipes.detection import coco_data
from recipes.vision import input_pipeline


class MaskSource(coco_data.CocoDetectionSource):
    """``CocoDetectionSource`` whose records also hold ``segmentations`` (one per box)."""

    def __init__(self, data_dir: str, split: str, *, skip_empty: bool = False):
        super().__init__(data_dir, split, skip_empty=skip_empty)
        with open(self.annotation_file) as f:
            annotations = json.load(f)["annotations"]
        # The same objects, in the same order, as CocoDetectionSource keeps.
        segmentations: dict[int, list] = {}
        for ann in annotations:
            _, _, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or w < 1 or h < 1:
                continue
            if "segmentation" not in ann:
                raise ValueError(f"{self.annotation_file}: annotation {ann.get('id')} has no "
                                 "'segmentation' (Mask R-CNN needs instance masks)")
            segmentations.setdefault(ann["image_id"], []).append(ann["segmentation"])
        for record in self.records:
            record["segmentations"] = segmentations.get(record["image_id"], [])


def decode_masks(segmentations: Sequence, height: int, width: int) -> np.ndarray:
    """COCO polygons / RLEs -> ``(n, height, width)`` uint8 masks (pycocotools)."""
    from pycocotools import mask as mask_util

    out = np.zeros((len(segmentations), height, width), np.uint8)
    for i, seg in enumerate(segmentations):
        if isinstance(seg, list):  # polygons
            rle = mask_util.merge(mask_util.frPyObjects(seg, height, width))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_util.frPyObjects(seg, height, width)
        else:
            rle = dict(seg)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        out[i] = mask_util.decode(rle)
    return out


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``GeneralizedRCNNTransform``'s size: scale ``min(min_size / short, max_size / long)``,
    each side ``floor(side * scale)``."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(np.floor(height * scale)), int(np.floor(width * scale))


def _resize_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if pixels.shape[:2] == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.BILINEAR))


def _resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour, as ``F.interpolate(mode="nearest")``."""
    if masks.shape[1:] == size:
        return masks
    rows = np.floor(np.arange(size[0]) * (masks.shape[1] / size[0])).astype(np.int64)
    cols = np.floor(np.arange(size[1]) * (masks.shape[2] / size[1])).astype(np.int64)
    return masks[:, rows][:, :, cols]


def _pad(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, array.dtype)
    out[tuple(slice(0, s) for s in array.shape)] = array
    return out


def transform(record: dict[str, Any], rng: np.random.Generator | None, *, min_sizes: Sequence[int],
              max_size: int, canvas: tuple[int, int], max_boxes: int,
              flip_probability: float = 0.5) -> dict[str, np.ndarray]:
    """One record -> a padded example (training when ``rng`` is given, evaluation otherwise)."""
    pixels = coco_data._open_rgb(record["path"])
    height, width = pixels.shape[:2]
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)[:max_boxes]
    labels = np.asarray(record["labels"], np.int32)[:max_boxes]
    masks = decode_masks(record["segmentations"][:max_boxes], height, width)
    min_size = min_sizes[int(rng.integers(len(min_sizes)))] if rng is not None else min_sizes[-1]
    if rng is not None and rng.random() < flip_probability:
        pixels, masks = pixels[:, ::-1], masks[:, :, ::-1]
        boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    size = resized_size(height, width, min_size, max_size)
    if size[0] > canvas[0] or size[1] > canvas[1]:
        raise ValueError(f"{record['path']}: resized to {size}, larger than the canvas {canvas} "
                         "(canvas must hold max_size on both sides)")
    pixels = _resize_image(np.ascontiguousarray(pixels), size)
    masks = _resize_masks(masks, size)
    boxes = boxes * np.asarray([size[1] / width, size[0] / height] * 2, np.float32)
    padded_boxes, padded_labels = coco_data.pad_boxes(boxes, labels, max_boxes)
    example = {"image": _pad(pixels, (*canvas, 3)), "image_hw": np.asarray(size, np.int32),
               "boxes": padded_boxes, "labels": padded_labels,
               "masks": _pad(masks, (max_boxes, *canvas))}
    if rng is None:
        example.update(image_id=np.int64(record["image_id"]),
                       size=np.asarray([height, width], np.int32))
    return example


def train_iterator(source: MaskSource, *, batch_size: int, seed: int, num_workers: int = 0,
                   **transform_args):
    """Endless, checkpointable grain iterator of training batches (reshuffled every epoch;
    each example's randomness comes from ``seed`` and its position, so ``set_state`` resumes
    identically)."""
    import grain

    def train_transform(record, rng):
        return transform(record, rng, **transform_args)

    dataset = (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
               .random_map(train_transform, seed=seed + 1)
               .batch(batch_size, drop_remainder=True)).to_iter_dataset()
    if num_workers > 0:
        dataset = dataset.mp_prefetch(input_pipeline._multiprocessing_options(num_workers))
    return iter(dataset)


def eval_batches(source: MaskSource, *, batch_size: int, max_images: int = -1,
                 num_workers: int = 0, **transform_args):
    """Every (or the first ``max_images``) image, in batches; the last one padded with blank
    examples whose ``valid`` is 0."""
    for batch, count in coco_data.padded_batches(
            source, lambda record: transform(record, None, **transform_args),
            batch_size=batch_size, max_images=max_images, num_workers=num_workers):
        batch["image_hw"][count:] = batch["image_hw"][0]
        batch["valid"] = np.arange(batch_size) < count
        yield batch
