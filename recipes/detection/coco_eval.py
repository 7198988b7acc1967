"""The official COCO metric (pycocotools' ``COCOeval``) for the detection recipes.

Detections go in as plain records (image id, COCO category id, ``[x, y, w, h]`` box in pixels of
the original image, score, optionally a COCO RLE mask); out comes the 12-number summary that
``COCOeval.summarize()`` prints, as a dict keyed by short names (``AP`` is bbAP@[.5:.95], the
number of NVIDIA's Table 2), which prints as pycocotools' own 12 lines.

    ground_truth = coco_eval.load_ground_truth("coco/annotations/instances_val2017.json")
    summary = coco_eval.evaluate(ground_truth, detections, "bbox")
    print(summary)           # the 12 lines
    summary["AP"]            # 0.248

pycocotools talks a lot on stdout; everything here is quiet unless ``quiet=False``.
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
_SUMMARY_LINES = (
    ("Average Precision", "0.50:0.95", "all", 100),
    ("Average Precision", "0.50", "all", 100),
    ("Average Precision", "0.75", "all", 100),
    ("Average Precision", "0.50:0.95", "small", 100),
    ("Average Precision", "0.50:0.95", "medium", 100),
    ("Average Precision", "0.50:0.95", "large", 100),
    ("Average Recall", "0.50:0.95", "all", 1),
    ("Average Recall", "0.50:0.95", "all", 10),
    ("Average Recall", "0.50:0.95", "all", 100),
    ("Average Recall", "0.50:0.95", "small", 100),
    ("Average Recall", "0.50:0.95", "medium", 100),
    ("Average Recall", "0.50:0.95", "large", 100),
)


class CocoSummary(dict):
    """The 12 numbers of ``COCOeval.summarize()`` by name (``AP``, ``AP50``, ... ``ARl``).

    -1 means "no ground truth in that area range", as in pycocotools. ``str()`` gives
    pycocotools' 12 lines; ``iou_type`` is ``"bbox"`` or ``"segm"``.
    """

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


@contextlib.contextmanager
def _maybe_quiet(quiet: bool):
    if quiet:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    else:
        yield


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
    """Detections as COCO result records (what ``COCO.loadRes`` takes).

    Args:
        image_ids, category_ids, scores: one per detection (COCO ids, not contiguous labels).
        boxes_xywh: (N, 4) ``[x, y, w, h]`` in pixels of the original image.
        masks: optional COCO RLEs (``{"size": [h, w], "counts": ...}``), one per detection.
    """
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
    """COCOeval of ``detections`` against ``ground_truth``; returns the 12-number summary.

    Args:
        ground_truth: a ``pycocotools.coco.COCO`` or the path of an ``instances_*.json`` file.
        detections: COCO result records (see `detection_records`); ``"segmentation"`` RLEs are
            needed for ``iou_type="segm"``.
        iou_type: ``"bbox"`` (the SSD number) or ``"segm"``.
        image_ids: evaluate these images only (default: every image of the ground truth).
        quiet: silence pycocotools' own printing.
    """
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


def ground_truth_as_detections(ground_truth, iou_type: str = "bbox") -> list[dict[str, Any]]:
    """Every non-crowd ground-truth object as a detection with score 1 (a perfect detector)."""
    records = []
    for ann in ground_truth.loadAnns(ground_truth.getAnnIds(iscrowd=False)):
        record = {"image_id": ann["image_id"], "category_id": ann["category_id"],
                  "bbox": list(ann["bbox"]), "score": 1.0}
        if iou_type == "segm":
            record["segmentation"] = ground_truth.annToRLE(ann)
        records.append(record)
    return records
