"""The official COCO metric (pycocotools' ``COCOeval``), quiet, for the detection recipes.

Detections go in as COCO result records; out comes the 12-number summary of
``COCOeval.summarize()`` as a dict (``AP``: bbAP@[.5:.95]) that prints as pycocotools' lines.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats, in order, and the lines summarize() prints for them.
SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                 "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_AREAS = ("small", "medium", "large")
_SUMMARY_LINES = (
    *(("Average Precision", iou, "all", 100) for iou in ("0.50:0.95", "0.50", "0.75")),
    *(("Average Precision", "0.50:0.95", area, 100) for area in _AREAS),
    *(("Average Recall", "0.50:0.95", "all", dets) for dets in (1, 10, 100)),
    *(("Average Recall", "0.50:0.95", area, 100) for area in _AREAS),
)


class CocoSummary(dict):
    """The 12 numbers of ``COCOeval.summarize()`` by name (-1: no ground truth in that area
    range); ``str()`` gives pycocotools' 12 lines."""

    def __init__(self, stats: Sequence[float], iou_type: str):
        if len(stats) != len(SUMMARY_NAMES):
            raise ValueError(f"expected {len(SUMMARY_NAMES)} COCO statistics, got {len(stats)}")
        super().__init__(zip(SUMMARY_NAMES, (float(s) for s in stats)))
        self.iou_type = iou_type

    def __str__(self) -> str:
        lines = []
        for (kind, iou, area, max_dets), value in zip(_SUMMARY_LINES, self.values()):
            short = "(AP)" if kind.endswith("Precision") else "(AR)"
            lines.append(f" {kind:<18} {short} @[ IoU={iou:<9} | area={area:>6s} | "
                         f"maxDets={max_dets:>3d} ] = {value:0.3f}")
        return "\n".join(lines)


def _maybe_quiet(quiet: bool):
    return contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()


def load_ground_truth(annotation_file: str, quiet: bool = True):
    """A ``pycocotools.coco.COCO`` of an ``instances_*.json`` file (clear error if missing)."""
    import os

    from pycocotools.coco import COCO

    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"COCO annotation file {annotation_file!r} does not exist "
                                "(expected <data-dir>/annotations/instances_val2017.json)")
    with _maybe_quiet(quiet):
        return COCO(annotation_file)


def detection_records(image_ids: Iterable[int], category_ids: Iterable[int],
                      boxes_xywh: np.ndarray, scores: Iterable[float],
                      masks: Iterable[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Detections (COCO ids, ``[x, y, w, h]`` pixels of the original image, optional RLE masks)
    as the records ``COCO.loadRes`` takes."""
    boxes_xywh = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
    image_ids, category_ids, scores = list(image_ids), list(category_ids), list(scores)
    if not len(image_ids) == len(category_ids) == len(scores) == len(boxes_xywh):
        raise ValueError(f"detections disagree in length: {len(image_ids)} image ids, "
                         f"{len(category_ids)} categories, {len(boxes_xywh)} boxes, "
                         f"{len(scores)} scores")
    records = [{"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in box],
                "score": float(s)}
               for i, c, box, s in zip(image_ids, category_ids, boxes_xywh, scores)]
    if masks is not None:
        masks = list(masks)
        if len(masks) != len(records):
            raise ValueError(f"{len(masks)} masks for {len(records)} detections")
        for record, rle in zip(records, masks):
            record["segmentation"] = rle
    return records


def evaluate(ground_truth, detections: list[dict[str, Any]], iou_type: str = "bbox", *,
             image_ids: Sequence[int] | None = None, quiet: bool = True) -> CocoSummary:
    """The `CocoSummary` of ``detections`` against ``ground_truth`` (a ``COCO`` or an
    ``instances_*.json`` path), over ``image_ids`` (default: all)."""
    from pycocotools.cocoeval import COCOeval

    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if isinstance(ground_truth, str):
        ground_truth = load_ground_truth(ground_truth, quiet)
    if iou_type == "segm" and any("segmentation" not in d for d in detections):
        raise ValueError("segm evaluation needs a 'segmentation' RLE in every detection")
    if not detections:  # loadRes cannot take an empty list: nothing found, nothing recalled
        return CocoSummary([0.0] * len(SUMMARY_NAMES), iou_type)
    known = set(ground_truth.getImgIds())
    unknown = sorted({d["image_id"] for d in detections} - known)
    if unknown:
        raise ValueError(f"detections name image ids the ground truth does not have: {unknown[:8]}")
    with _maybe_quiet(quiet):
        results = ground_truth.loadRes(detections)
        evaluator = COCOeval(ground_truth, results, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return CocoSummary(evaluator.stats, iou_type)

