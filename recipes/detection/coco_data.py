"""COCO 2017 detection data with grain: a directory loader, SSD's augmentation and Mask R-CNN's
transforms.

The directory is COCO's layout (a COCO 2017 download, or ``digits_detection``'s built-in set):
``<data_dir>/{train2017,val2017}/*.jpg`` and ``<data_dir>/annotations/instances_{split}.json``.
SSD's training augmentation (the original SSD's expand, NVIDIA's SSD300 v1.1 ``SSDCropping``,
flip, resize, ``ColorJitter``) gives uint8 HWC images and relative corner boxes padded to
``max_boxes`` rows (label 0); Mask R-CNN's (torchvision's ``GeneralizedRCNNTransform``: flip,
resize by short and long side, padded to a fixed canvas for static shapes) pixel boxes and masks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from recipes.detection import boxes as box_ops

# NVIDIA's SSDCropping: None = keep the whole image; (min IoU, max IoU), None = unbounded.
CROP_OPTIONS = (None, (0.1, None), (0.3, None), (0.5, None), (0.7, None), (0.9, None),
                (None, None))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """SSD's augmentation settings (NVIDIA's SSD300 v1.1)."""

    expand_probability: float = 0.5
    max_expand_ratio: float = 4.0
    crop: bool = True
    crop_probability: float = 1.0  # how often the random IoU crop is tried at all
    flip_probability: float = 0.5
    brightness: float = 0.125
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.05


class CocoDetectionSource:
    """One split of a COCO-layout directory: records ``{"path", "image_id", "height", "width",
    "boxes" (n, 4) float32 corner pixels, "labels" (n,) int32 in 1..C}`` of the non-crowd
    objects (with ``masks``, also their ``"segmentations"``); ``category_ids[label - 1]`` is a
    label's COCO id."""

    def __init__(self, data_dir: str, split: str, *, skip_empty: bool = False,
                 masks: bool = False):
        self.annotation_file = os.path.join(data_dir, "annotations", f"instances_{split}.json")
        self.image_dir = os.path.join(data_dir, split)
        for path, what in ((self.annotation_file, "file"), (self.image_dir, "directory")):
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"COCO {what} {path!r} does not exist; expected {data_dir}/{split}/ and "
                    f"{data_dir}/annotations/instances_{split}.json (COCO 2017 layout)")
        with open(self.annotation_file) as f:
            coco = json.load(f)
        for key in ("images", "annotations", "categories"):
            if key not in coco:
                raise ValueError(f"{self.annotation_file}: not a COCO instances file (no {key!r})")
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in categories]
        label_of = {cid: label + 1 for label, cid in enumerate(self.category_ids)}
        objects: dict[int, list[tuple[list[float], int, Any]]] = {}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or w < 1 or h < 1:
                continue
            if ann["category_id"] not in label_of:
                raise ValueError(f"{self.annotation_file}: annotation {ann.get('id')} has category "
                                 f"{ann['category_id']}, not among the file's categories")
            if masks and "segmentation" not in ann:
                raise ValueError(f"{self.annotation_file}: annotation {ann.get('id')} has no "
                                 "'segmentation' (Mask R-CNN needs instance masks)")
            objects.setdefault(ann["image_id"], []).append(
                ([x, y, x + w, y + h], label_of[ann["category_id"]], ann.get("segmentation")))
        self.records = []
        for image in sorted(coco["images"], key=lambda i: i["id"]):
            found = objects.get(image["id"], [])
            if skip_empty and not found:
                continue
            self.records.append({
                "path": os.path.join(self.image_dir, image["file_name"]),
                "image_id": int(image["id"]), "height": int(image["height"]),
                "width": int(image["width"]),
                "boxes": np.asarray([b for b, _, _ in found], np.float32).reshape(-1, 4),
                "labels": np.asarray([label for _, label, _ in found], np.int32)})
            if masks:
                self.records[-1]["segmentations"] = [seg for _, _, seg in found]
        if not self.records:
            raise ValueError(f"{self.annotation_file}: no images"
                             + (" with boxes" if skip_empty else ""))

    @property
    def num_classes(self) -> int:
        """Classes including the background."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]


def dataset_of(args) -> str:
    """The dataset a detection recipe's command line names: COCO with --data-dir, else digits."""
    return "coco2017" if args.data_dir else "digits"


def config_of(args, coco_config, builtin_config):
    """The full-scale COCO config with --data-dir, else the built-in digits one."""
    return (coco_config() if args.data_dir else builtin_config()).replace(data_dir=args.data_dir)


def _open_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (PIL) to ``size = (height, width)``."""
    from PIL import Image

    if pixels.shape[:2] == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.BILINEAR))


def expand(pixels: np.ndarray, boxes: np.ndarray, rng: np.random.Generator,
           max_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Zoom out: the image on a canvas ``ratio`` times larger (mean pixel fill); boxes relative."""
    height, width = pixels.shape[:2]
    ratio = rng.uniform(1.0, max_ratio)
    new_h, new_w = int(height * ratio), int(width * ratio)
    top, left = int(rng.integers(0, new_h - height + 1)), int(rng.integers(0, new_w - width + 1))
    canvas = np.empty((new_h, new_w, 3), np.uint8)
    canvas[:] = np.round(np.asarray(IMAGENET_MEAN) * 255).astype(np.uint8)
    canvas[top:top + height, left:left + width] = pixels
    scale = np.asarray([width, height, width, height], np.float32)
    offset = np.asarray([left, top, left, top], np.float32)
    new_scale = np.asarray([new_w, new_h, new_w, new_h], np.float32)
    return canvas, (boxes * scale + offset) / new_scale


def random_iou_crop(pixels: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                    rng: np.random.Generator, max_tries: int = 100):
    """NVIDIA's SSDCropping on relative corner boxes; returns ``(pixels, boxes, labels)``.

    One of `CROP_OPTIONS` is drawn, a crop of 0.3..1 of each side (aspect 0.5..2) tried whose IoU
    with every box is within the bounds and that holds a box centre; the boxes whose centres lie
    inside are kept, clipped. ``max_tries`` bounds the draws (NVIDIA's loop has no bound).
    """
    height, width = pixels.shape[:2]
    for _ in range(max_tries):
        option = CROP_OPTIONS[int(rng.integers(len(CROP_OPTIONS)))]
        if option is None:
            break
        min_iou = -math.inf if option[0] is None else option[0]
        max_iou = math.inf if option[1] is None else option[1]
        w, h = rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)
        if not 0.5 <= w / h <= 2.0:
            continue
        left, top = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
        crop = np.asarray([[left, top, left + w, top + h]], np.float32)
        iou = box_ops.pairwise_iou(boxes, crop)[:, 0]
        if not np.all((iou > min_iou) & (iou < max_iou)):
            continue
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = np.all((centres > crop[0, :2]) & (centres < crop[0, 2:]), axis=1)
        if not inside.any():
            continue
        kept = np.clip(boxes[inside], crop[0, [0, 1, 0, 1]], crop[0, [2, 3, 2, 3]])
        kept = np.clip((kept - crop[0, [0, 1, 0, 1]]) / np.asarray([w, h, w, h], np.float32),
                       0.0, 1.0)  # rounding can leave a clipped edge at 1 + 1e-7
        left_px, top_px = int(left * width), int(top * height)
        right_px, bottom_px = int((left + w) * width), int((top + h) * height)
        return (pixels[top_px:bottom_px, left_px:right_px], kept.astype(np.float32),
                labels[inside])
    return pixels, boxes, labels


def _grayscale(image: np.ndarray) -> np.ndarray:
    return image @ np.asarray([0.299, 0.587, 0.114], np.float32)


def _shift_hue(image: np.ndarray, shift: float) -> np.ndarray:
    from PIL import Image

    hsv = np.asarray(Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8))
                     .convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(round(shift * 255))) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), np.float32)


def photometric_distort(pixels: np.ndarray, rng: np.random.Generator,
                        aug: Augmentation) -> np.ndarray:
    """torchvision's ColorJitter semantics: brightness, contrast, saturation, hue, random order."""
    image = pixels.astype(np.float32)
    for op in rng.permutation(4):
        if op == 0 and aug.brightness > 0:
            image = image * rng.uniform(1 - aug.brightness, 1 + aug.brightness)
        elif op == 1 and aug.contrast > 0:
            mean = _grayscale(np.clip(image, 0, 255)).mean()
            image = (image - mean) * rng.uniform(1 - aug.contrast, 1 + aug.contrast) + mean
        elif op == 2 and aug.saturation > 0:
            gray = _grayscale(np.clip(image, 0, 255))[..., None]
            image = (image - gray) * rng.uniform(1 - aug.saturation, 1 + aug.saturation) + gray
        elif op == 3 and aug.hue > 0:
            image = _shift_hue(image, rng.uniform(-aug.hue, aug.hue))
        image = np.clip(image, 0, 255)
    return np.round(image).astype(np.uint8)


def pad_boxes(boxes: np.ndarray, labels: np.ndarray, max_boxes: int):
    """Fixed-size rows for batching: the first ``max_boxes`` boxes, then zeros (label 0)."""
    return (_pad(boxes[:max_boxes].astype(np.float32), (max_boxes, 4)),
            _pad(labels[:max_boxes].astype(np.int32), (max_boxes,)))


def _pad(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` at the start of zeros of ``shape``."""
    out = np.zeros(shape, array.dtype)
    out[tuple(slice(0, s) for s in array.shape)] = array
    return out


def ssd_train_transform(record: dict[str, Any], rng: np.random.Generator, *, image_size: int,
                        max_boxes: int,
                        aug: Augmentation = Augmentation()) -> dict[str, np.ndarray]:
    """Decode, expand, random IoU crop, flip, resize, photometric distortion."""
    pixels = _open_rgb(record["path"])
    height, width = pixels.shape[:2]
    boxes = record["boxes"] / np.asarray([width, height, width, height], np.float32)
    labels = record["labels"]
    if rng.random() < aug.expand_probability:
        pixels, boxes = expand(pixels, boxes, rng, aug.max_expand_ratio)
    if aug.crop and rng.random() < aug.crop_probability:
        pixels, boxes, labels = random_iou_crop(pixels, boxes, labels, rng)
    if rng.random() < aug.flip_probability:
        pixels = pixels[:, ::-1]
        boxes = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)
    pixels = photometric_distort(_resize(np.ascontiguousarray(pixels), (image_size,) * 2), rng,
                                 aug)
    boxes, labels = pad_boxes(boxes.astype(np.float32), labels, max_boxes)
    return {"image": pixels, "boxes": boxes, "labels": labels}


def ssd_eval_transform(record: dict[str, Any], *, image_size: int) -> dict[str, np.ndarray]:
    """Decode and resize; keeps the image id and original size (detections go back to it)."""
    return {"image": _resize(_open_rgb(record["path"]), (image_size,) * 2),
            "image_id": np.int64(record["image_id"]),
            "size": np.asarray([record["height"], record["width"]], np.int32)}


def train_iterator(source, transform, *, batch_size: int, seed: int, num_workers: int = 0):
    """An endless, checkpointable grain iterator of ``transform(record, rng)`` batches: reshuffled
    every epoch, each record's randomness from ``seed`` and its position (``set_state`` resumes
    identically)."""
    import grain

    from recipes.vision import input_pipeline

    dataset = (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
               .random_map(transform, seed=seed + 1)
               .batch(batch_size, drop_remainder=True)).to_iter_dataset()
    if num_workers > 0:
        dataset = dataset.mp_prefetch(input_pipeline._multiprocessing_options(num_workers))
    return iter(dataset)


def eval_batches(source, transform, *, batch_size: int, max_images: int = -1,
                 num_workers: int = 0):
    """``(batch, count)``: every (or the first ``max_images``) record through ``transform``, in
    batches of ``batch_size``, the last padded with zeros after ``count`` real examples (fixed
    shapes for a jitted evaluation step)."""
    import grain

    from recipes.vision import input_pipeline

    dataset = grain.MapDataset.source(source)
    if max_images > 0:
        dataset = dataset[:max_images]
    dataset = dataset.map(transform).batch(batch_size, drop_remainder=False).to_iter_dataset()
    if num_workers > 0:
        dataset = dataset.mp_prefetch(input_pipeline._multiprocessing_options(num_workers))
    for batch in dataset:
        count = len(batch["image_id"])
        pad = batch_size - count
        yield {key: np.concatenate([value, np.zeros((pad, *value.shape[1:]), value.dtype)])
               for key, value in batch.items()}, count


def evaluated_image_ids(source: CocoDetectionSource, max_images: int = -1) -> list[int]:
    """The ids of the images `eval_batches` yields."""
    records = source.records[:max_images] if max_images > 0 else source.records
    return [r["image_id"] for r in records]


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


def maskrcnn_transform(record: dict[str, Any], rng: np.random.Generator | None, *,
                       min_sizes: Sequence[int], max_size: int, canvas: tuple[int, int],
                       max_boxes: int, flip_probability: float = 0.5) -> dict[str, np.ndarray]:
    """A record -> a padded Mask R-CNN example (training when ``rng`` is given: a flip and a
    short side drawn from ``min_sizes``; evaluation: ``min_sizes[-1]``, with the image's id and
    original ``size``). Boxes in pixels of the resized image, masks resized nearest."""
    pixels = _open_rgb(record["path"])
    height, width = pixels.shape[:2]
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)[:max_boxes]
    labels = np.asarray(record["labels"], np.int32)[:max_boxes]
    masks = decode_masks(record["segmentations"][:max_boxes], height, width)
    min_size = min_sizes[int(rng.integers(len(min_sizes)))] if rng is not None else min_sizes[-1]
    if rng is not None and rng.random() < flip_probability:
        pixels, masks = pixels[:, ::-1], masks[:, :, ::-1]
        boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    # GeneralizedRCNNTransform's size: scale min(min_size / short, max_size / long), floored.
    scale = min(min_size / min(height, width), max_size / max(height, width))
    size = int(np.floor(height * scale)), int(np.floor(width * scale))
    if size[0] > canvas[0] or size[1] > canvas[1]:
        raise ValueError(f"{record['path']}: resized to {size}, larger than the canvas {canvas} "
                         "(canvas must hold max_size on both sides)")
    pixels = _resize(np.ascontiguousarray(pixels), size)
    if masks.shape[1:] != size:  # nearest, as F.interpolate(mode="nearest")
        rows = np.floor(np.arange(size[0]) * (masks.shape[1] / size[0])).astype(np.int64)
        cols = np.floor(np.arange(size[1]) * (masks.shape[2] / size[1])).astype(np.int64)
        masks = masks[:, rows][:, :, cols]
    boxes = boxes * np.asarray([size[1] / width, size[0] / height] * 2, np.float32)
    padded_boxes, padded_labels = pad_boxes(boxes, labels, max_boxes)
    example = {"image": _pad(pixels, (*canvas, 3)), "image_hw": np.asarray(size, np.int32),
               "boxes": padded_boxes, "labels": padded_labels,
               "masks": _pad(masks, (max_boxes, *canvas))}
    if rng is None:
        example.update(image_id=np.int64(record["image_id"]),
                       size=np.asarray([height, width], np.int32))
    return example
