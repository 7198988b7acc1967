"""Tests of the SSD-RN50 recipe (recipes/ssd_rn50.py, issue 10) and its built-in digits set.

References are independent of the code under test: SSD300's default boxes written out from the
paper's / NVIDIA's figures in plain Python loops, hand-worked encodings and matchings, NumPy
brute force for hard negative mining, the loss and per-class NMS, pycocotools on ground truth
fed back as detections, pixel content for the augmentation.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from recipes.detection import coco_data, coco_eval, digits_detection, ssd  # noqa: E402
from recipes.vision import models
from recipes.detection import ssd_task  # noqa: E402
from recipes.engine import workflow  # noqa: E402
from recipes.vision import weights

SMALL_SPEC = digits_detection.DigitsSpec(num_train_images=24, num_val_images=12, image_size=64,
                                         min_digit_size=12, max_digit_size=28, seed=3)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return digits_detection.get_coco_directory(str(tmp_path_factory.mktemp("digits")),
                                               spec=SMALL_SPEC, log=lambda _: None)


# ---------------------------------------------------------------------------------------------
# Default boxes, encoding, matching
# ---------------------------------------------------------------------------------------------


def test_ssd300_has_8732_default_boxes_with_nvidia_scales():
    boxes = ssd.default_boxes()
    assert boxes.shape == (8732, 4) and boxes.dtype == np.float32
    # 38^2 * 4 + 19^2 * 6 + 10^2 * 6 + 5^2 * 6 + 3^2 * 4 + 1 * 4
    assert 5776 + 2166 + 600 + 150 + 36 + 4 == 8732 == ssd.DefaultBoxSpec().num_boxes
    # Written out from NVIDIA's dboxes300_coco: sizes (sk, sk), (sk', sk'), (sk*sqrt(a), sk/sqrt(a)),
    # (sk/sqrt(a), sk*sqrt(a)); centres (j + 0.5) / (300 / step); clipped to [0, 1].
    expected = []
    scales = [21, 45, 99, 153, 207, 261, 315]
    for k, (f, step, ratios) in enumerate(zip([38, 19, 10, 5, 3, 1], [8, 16, 32, 64, 100, 300],
                                              [[2], [2, 3], [2, 3], [2, 3], [2], [2]])):
        sk, sk_next = scales[k] / 300, scales[k + 1] / 300
        sizes = [(sk, sk), (math.sqrt(sk * sk_next), math.sqrt(sk * sk_next))]
        for a in ratios:
            sizes += [(sk * math.sqrt(a), sk / math.sqrt(a)), (sk / math.sqrt(a), sk * math.sqrt(a))]
        for i in range(f):
            for j in range(f):
                for w, h in sizes:
                    expected.append([min(max(v, 0.0), 1.0) for v in
                                     ((j + 0.5) * step / 300, (i + 0.5) * step / 300, w, h)])
    np.testing.assert_allclose(boxes, np.asarray(expected), rtol=1e-6, atol=1e-7)
    # Hand-checked entries: the first box is 21 px square at (4, 4) px; the 38x38 map's centres
    # step by 8 px; the last map's first box is 261 px square, centred.
    np.testing.assert_allclose(boxes[0], [4 / 300, 4 / 300, 21 / 300, 21 / 300], rtol=1e-6)
    np.testing.assert_allclose(boxes[1], [4 / 300, 4 / 300, math.sqrt(21 * 45) / 300,
                                          math.sqrt(21 * 45) / 300], rtol=1e-6)
    np.testing.assert_allclose(boxes[4, :2], [12 / 300, 4 / 300], rtol=1e-6)
    np.testing.assert_allclose(boxes[-4], [0.5, 0.5, 261 / 300, 261 / 300], rtol=1e-6)
    assert boxes[-2, 2] == 1.0  # 261 * sqrt(2) px is wider than the image: clipped
    assert np.all((boxes >= 0) & (boxes <= 1))


def test_default_box_spec_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match="one more scale"):
        ssd.DefaultBoxSpec(feature_sizes=(38, 19), steps=(8, 16), scales=(21, 45),
                           aspect_ratios=((2,), (2,)))


def test_encode_hand_worked_and_round_trip():
    box = np.array([[0.55, 0.5, 0.2, 0.1]])
    default = np.array([[0.5, 0.5, 0.1, 0.1]])
    # ((0.55 - 0.5) / (0.1 * 0.1), 0, log(0.2 / 0.1) / 0.2, log(1) / 0.2)
    np.testing.assert_allclose(ssd.encode(box, default), [[5.0, 0.0, math.log(2) / 0.2, 0.0]],
                               rtol=1e-12, atol=1e-12)
    rng = np.random.default_rng(0)
    defaults = np.concatenate([rng.uniform(0.1, 0.9, (50, 2)), rng.uniform(0.05, 0.5, (50, 2))], 1)
    boxes = np.concatenate([rng.uniform(0.0, 1.0, (50, 2)), rng.uniform(0.01, 1.0, (50, 2))], 1)
    np.testing.assert_allclose(ssd.decode(ssd.encode(boxes, defaults), defaults), boxes,
                               rtol=1e-10)
    got = jax.jit(lambda b, d: ssd.decode(ssd.encode(b, d), d))(
        jnp.asarray(boxes, jnp.float32), jnp.asarray(defaults, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), boxes, rtol=1e-5, atol=1e-6)


# Four default boxes tiling the unit square (as corners: the four quadrants).
QUADRANTS = np.array([[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5],
                      [0.25, 0.75, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]], np.float32)


def test_match_hand_worked():
    gt = np.array([[0.0, 0.0, 0.5, 0.4],     # label 3: IoU 0.2 / 0.25 = 0.8 with quadrant 0
                   [0.5, 0.5, 0.7, 0.7],     # label 5: IoU 0.04 / 0.25 = 0.16 with quadrant 3,
                                             # below 0.5, but it claims its best default box
                   [0.0, 0.0, 1.0, 1.0]],    # padding (label 0): IoU 0.25 everywhere, ignored
                  np.float32)
    labels = np.array([3, 5, 0], np.int32)
    boxes, matched = ssd.match(jnp.asarray(gt), jnp.asarray(labels), jnp.asarray(QUADRANTS))
    np.testing.assert_array_equal(np.asarray(matched), [3, 0, 0, 5])
    np.testing.assert_allclose(np.asarray(boxes)[0], gt[0])
    np.testing.assert_allclose(np.asarray(boxes)[3], gt[1])
    # Background rows keep their own default box (corners).
    np.testing.assert_allclose(np.asarray(boxes)[1], [0.5, 0.0, 1.0, 0.5])


@pytest.mark.slow
def test_match_threshold_is_strict_and_claims_survive():
    # Quadrant 0 vs [0, 0, 0.5, 0.25]: IoU exactly 0.5 (not a positive by IoU), but this ground
    # truth's best default box is quadrant 0, which it claims. A second box overlapping
    # quadrant 1 at IoU 0.6 is a positive by IoU; nothing matches quadrants 2 and 3.
    gt = np.array([[0.0, 0.0, 0.5, 0.25], [0.5, 0.0, 1.0, 0.3]], np.float32)
    labels = np.array([1, 2], np.int32)
    _, matched = ssd.match(jnp.asarray(gt), jnp.asarray(labels), jnp.asarray(QUADRANTS))
    np.testing.assert_array_equal(np.asarray(matched), [1, 2, 0, 0])
    # Raise the threshold: quadrant 1 (IoU 0.6) is a positive only through its claim now.
    _, matched = ssd.match(jnp.asarray(gt), jnp.asarray(labels), jnp.asarray(QUADRANTS), 0.7)
    np.testing.assert_array_equal(np.asarray(matched), [1, 2, 0, 0])
    # A default box that is no one's best and overlaps at 0.5 exactly stays background.
    defaults = np.concatenate([QUADRANTS, [[0.25, 0.125, 0.5, 0.25]]]).astype(np.float32)
    gt = np.array([[0.0, 0.0, 0.5, 0.25]], np.float32)  # best: the new fifth box (IoU 1)
    _, matched = ssd.match(jnp.asarray(gt), jnp.asarray([4]), jnp.asarray(defaults))
    np.testing.assert_array_equal(np.asarray(matched), [0, 0, 0, 0, 4])


def test_match_without_objects_is_all_background():
    gt = np.zeros((3, 4), np.float32)
    _, matched = ssd.match(jnp.asarray(gt), jnp.zeros(3, jnp.int32), jnp.asarray(QUADRANTS))
    assert not np.asarray(matched).any()


# ---------------------------------------------------------------------------------------------
# Hard negative mining and the loss
# ---------------------------------------------------------------------------------------------


def test_hard_negative_mining_takes_three_negatives_per_positive_of_highest_loss():
    rng = np.random.default_rng(0)
    loss = rng.uniform(0.1, 5.0, (4, 60)).astype(np.float32)
    positive = np.zeros((4, 60), bool)
    positive[0, [1, 7, 30]] = True           # 3 positives: 9 negatives
    positive[1, :20] = True                  # 20 positives: all 40 background boxes
    positive[3, 59] = True                   # 1 positive: 3 negatives; image 2 has none: 0
    got = np.asarray(ssd.hard_negatives(jnp.asarray(loss), jnp.asarray(positive)))
    for image in range(4):
        background = np.flatnonzero(~positive[image])
        count = min(3 * positive[image].sum(), background.size)
        expected = set(background[np.argsort(-loss[image, background])[:count]])
        assert set(np.flatnonzero(got[image])) == expected
        assert not (got[image] & positive[image]).any()
    assert [got[i].sum() for i in range(4)] == [9, 40, 0, 3]


def _loss_by_brute_force(pred, logits, target, labels):
    """NVIDIA's SSD loss, one image and one box at a time, in float64."""
    total = []
    for b in range(pred.shape[0]):
        pos = [d for d in range(pred.shape[1]) if labels[b, d] > 0]
        if not pos:
            total.append(0.0)
            continue
        box = 0.0
        for d in pos:
            for c in range(4):
                x = abs(float(pred[b, d, c]) - float(target[b, d, c]))
                box += 0.5 * x * x if x < 1 else x - 0.5
        ce = []
        for d in range(pred.shape[1]):
            z = logits[b, d].astype(np.float64)
            ce.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[labels[b, d]])
        negatives = sorted((d for d in range(pred.shape[1]) if labels[b, d] == 0),
                           key=lambda d: -ce[d])[:3 * len(pos)]
        total.append((box + sum(ce[d] for d in pos) + sum(ce[d] for d in negatives)) / len(pos))
    return float(np.mean(total))


@pytest.mark.slow
def test_ssd_loss_matches_brute_force():
    rng = np.random.default_rng(1)
    pred = rng.normal(0, 1.5, (3, 40, 4)).astype(np.float32)
    target = rng.normal(0, 1.5, (3, 40, 4)).astype(np.float32)
    logits = rng.normal(0, 2, (3, 40, 5)).astype(np.float32)
    labels = np.zeros((3, 40), np.int32)
    labels[0, [2, 5, 11]] = [1, 4, 2]
    labels[2, 30] = 3  # image 1 has no positive: it adds 0 to the batch mean
    got = ssd.ssd_loss(jnp.asarray(pred), jnp.asarray(logits), jnp.asarray(target),
                       jnp.asarray(labels))
    np.testing.assert_allclose(float(got["loss"]), _loss_by_brute_force(pred, logits, target,
                                                                          labels), rtol=1e-5)
    np.testing.assert_allclose(float(got["positives"]), 4 / 3, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


def _postprocess_by_brute_force(boxes, scores, threshold, iou_threshold, max_per_class, max_total):
    """Per class: candidates above the threshold, best first, greedy suppression with IoU
    written out pair by pair; then the best ``max_total`` overall."""

    def iou(a, b):
        ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    kept = []
    for label in range(1, scores.shape[1]):
        order = sorted((d for d in range(len(boxes)) if scores[d, label] > threshold),
                       key=lambda d: (-scores[d, label], d))[:max_per_class]
        chosen = []
        for d in order:
            if all(iou(boxes[d], boxes[c]) <= iou_threshold for c in chosen):
                chosen.append(d)
        kept += [(scores[d, label], d, label) for d in chosen]
    kept.sort(key=lambda t: -t[0])
    return kept[:max_total]


@pytest.mark.parametrize("max_total", [200, 7])
def test_postprocess_matches_brute_force_per_class_nms(max_total):
    rng = np.random.default_rng(2)
    centres = rng.uniform(0.2, 0.8, (6, 2))  # clusters of overlapping boxes
    boxes = []
    for _ in range(60):
        c = centres[rng.integers(6)] + rng.normal(0, 0.03, 2)
        half = rng.uniform(0.05, 0.15, 2)
        boxes.append(np.concatenate([c - half, c + half]))
    boxes = np.asarray(boxes)
    scores = rng.dirichlet(np.ones(4) * 0.3, size=60)
    got_boxes, got_scores, got_labels = ssd.postprocess(
        boxes, scores, score_threshold=0.05, iou_threshold=0.45, max_per_class=200,
        max_detections=max_total)
    expected = _postprocess_by_brute_force(boxes, scores, 0.05, 0.45, 200, max_total)
    assert len(got_scores) == len(expected) > 3
    np.testing.assert_allclose(got_scores, [s for s, _, _ in expected])
    np.testing.assert_array_equal(got_labels, [label for _, _, label in expected])
    np.testing.assert_allclose(got_boxes, boxes[[d for _, d, _ in expected]])


def test_postprocess_keeps_only_the_best_per_class_before_nms():
    # 5 disjoint boxes of one class: max_per_class=3 keeps the 3 best, nothing is suppressed.
    boxes = np.array([[i, 0, i + 0.5, 0.5] for i in range(5)], float)
    scores = np.zeros((5, 2))
    scores[:, 1] = [0.3, 0.9, 0.1, 0.6, 0.8]
    _, got_scores, _ = ssd.postprocess(boxes, scores, max_per_class=3)
    np.testing.assert_allclose(got_scores, [0.9, 0.8, 0.6])
    with pytest.raises(ValueError, match="expected boxes"):
        ssd.postprocess(boxes[:, :3], scores)


# ---------------------------------------------------------------------------------------------
# Built-in digits set and the COCO evaluator
# ---------------------------------------------------------------------------------------------


def test_digits_set_layout_masks_boxes_and_determinism(digits_dir, tmp_path):
    from PIL import Image
    from pycocotools import mask as mask_util

    for split in ("train2017", "val2017"):
        with open(os.path.join(digits_dir, "annotations", f"instances_{split}.json")) as f:
            coco = json.load(f)
        assert [c["name"] for c in coco["categories"]] == [str(d) for d in range(10)]
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert len(coco["images"]) == (24 if split == "train2017" else 12)
        assert len(coco["annotations"]) >= len(coco["images"])
        images = {i["id"]: i for i in coco["images"]}
        for ann in coco["annotations"]:
            image = np.asarray(Image.open(os.path.join(digits_dir, split,
                                                       images[ann["image_id"]]["file_name"])))
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            mask = mask_util.decode(rle).astype(bool)
            assert ann["iscrowd"] == 0 and ann["area"] == mask.sum() > 0
            np.testing.assert_allclose(ann["bbox"], mask_util.toBbox(rle))
            # The ink is bright: pixels in the mask outshine the background around the box.
            x, y, w, h = (int(v) for v in ann["bbox"])
            ring = np.zeros_like(mask)
            ring[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = True
            ring[y:y + h, x:x + w] = False
            if ring.any():
                assert image[mask].mean() > image[ring].mean() + 60
    # Same spec, same files; another seed, other images.
    again = digits_detection.get_coco_directory(str(tmp_path / "again"), spec=SMALL_SPEC,
                                                 log=lambda _: None)
    for name in ("annotations/instances_val2017.json", "val2017/000000000003.png"):
        with open(os.path.join(digits_dir, name), "rb") as a, open(os.path.join(again, name),
                                                                  "rb") as b:
            assert a.read() == b.read()
    other, _ = digits_detection.generate_split(
        "val2017", digits_detection.DigitsSpec(**{**SMALL_SPEC.to_dict(), "seed": 4}))
    first, _ = digits_detection.generate_split("val2017", SMALL_SPEC)
    assert not np.array_equal(other[0], first[0])


@pytest.mark.slow
def test_digits_set_is_cached_and_rewritten_for_another_spec(tmp_path):
    spec = digits_detection.DigitsSpec(num_train_images=3, num_val_images=2, image_size=48,
                                       min_digit_size=10, max_digit_size=20)
    messages = []
    root = digits_detection.get_coco_directory(workdir=str(tmp_path), spec=spec,
                                               log=messages.append)
    assert root == str(tmp_path / "digits_coco") and len(messages) == 1
    digits_detection.get_coco_directory(workdir=str(tmp_path), spec=spec, log=messages.append)
    assert len(messages) == 1  # reused
    bigger = digits_detection.DigitsSpec(**{**spec.to_dict(), "num_val_images": 4})
    digits_detection.get_coco_directory(workdir=str(tmp_path), spec=bigger, log=messages.append)
    assert len(messages) == 2 and len(os.listdir(os.path.join(root, "val2017"))) == 4
    with pytest.raises(ValueError, match="min_digit_size"):
        digits_detection.DigitsSpec(image_size=32, max_digit_size=40)


def _ground_truth_as_detections(ground_truth, iou_type="bbox"):
    """Every non-crowd ground-truth object as a detection with score 1 (a perfect detector)."""
    records = []
    for ann in ground_truth.loadAnns(ground_truth.getAnnIds(iscrowd=False)):
        record = {"image_id": ann["image_id"], "category_id": ann["category_id"],
                  "bbox": list(ann["bbox"]), "score": 1.0}
        if iou_type == "segm":
            record["segmentation"] = ground_truth.annToRLE(ann)
        records.append(record)
    return records


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_evaluator_scores_ground_truth_as_perfect(digits_dir, iou_type):
    gt = coco_eval.load_ground_truth(os.path.join(digits_dir, "annotations",
                                                  "instances_val2017.json"))
    perfect = _ground_truth_as_detections(gt, iou_type)
    summary = coco_eval.evaluate(gt, perfect, iou_type)
    assert list(summary) == list(coco_eval.SUMMARY_NAMES)
    assert summary["AP"] == summary["AP50"] == summary["AP75"] == summary["AR100"] == 1.0
    text = str(summary)
    assert len(text.splitlines()) == 12 and "IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in text
    # Half the objects missed: recall halves (to within one object), precision stays 1.
    half = perfect[::2]
    summary = coco_eval.evaluate(gt, half, iou_type)
    assert abs(summary["AR100"] - len(half) / len(perfect)) < 0.1 and summary["AR100"] < 0.75
    # Nothing detected: 0, without pycocotools' loadRes failing on an empty list.
    assert coco_eval.evaluate(gt, [], iou_type)["AP"] == 0.0


def test_coco_evaluator_penalises_shifted_boxes_and_checks_input(digits_dir):
    gt = coco_eval.load_ground_truth(os.path.join(digits_dir, "annotations",
                                                  "instances_val2017.json"))
    shifted = []
    for record in _ground_truth_as_detections(gt):
        x, y, w, h = record["bbox"]
        shifted.append({**record, "bbox": [x + 0.3 * w, y, w, h]})  # IoU 0.7 / 1.3 = 0.54
    summary = coco_eval.evaluate(gt, shifted)
    assert summary["AP50"] == 1.0 and summary["AP75"] == 0.0 and 0.0 < summary["AP"] < 0.2
    records = coco_eval.detection_records([1, 1], [2, 3], np.array([[0, 0, 5, 5], [1, 1, 4, 4]]),
                                          [0.9, 0.5])
    assert records[1] == {"image_id": 1, "category_id": 3, "bbox": [1.0, 1.0, 4.0, 4.0],
                          "score": 0.5}
    with pytest.raises(ValueError, match="image ids"):
        coco_eval.evaluate(gt, [{**records[0], "image_id": 99999}])
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        coco_eval.load_ground_truth("/nonexistent/annotations/instances_val2017.json")


# ---------------------------------------------------------------------------------------------
# Data pipeline
# ---------------------------------------------------------------------------------------------


def test_coco_source_maps_categories_and_skips_crowds(tmp_path):
    from PIL import Image

    os.makedirs(tmp_path / "annotations")
    os.makedirs(tmp_path / "val2017")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "val2017" / "a.png")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "val2017" / "b.png")
    coco = {"images": [{"id": 7, "file_name": "a.png", "height": 20, "width": 30},
                       {"id": 9, "file_name": "b.png", "height": 20, "width": 30}],
            "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 90, "bbox": [1, 2, 3, 4], "iscrowd": 0},
                {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 9, 9], "iscrowd": 1}]}
    with open(tmp_path / "annotations" / "instances_val2017.json", "w") as f:
        json.dump(coco, f)
    source = coco_data.CocoDetectionSource(str(tmp_path), "val2017")
    assert source.category_ids == [1, 90] and source.num_classes == 3
    assert len(source) == 2 and source[0]["image_id"] == 7
    np.testing.assert_allclose(source[0]["boxes"], [[1, 2, 4, 6]])
    np.testing.assert_array_equal(source[0]["labels"], [2])  # toothbrush: the second category
    assert len(coco_data.CocoDetectionSource(str(tmp_path), "val2017", skip_empty=True)) == 1
    with pytest.raises(FileNotFoundError, match="train2017"):
        coco_data.CocoDetectionSource(str(tmp_path), "train2017")


def test_ssd_augmentation_keeps_boxes_on_their_objects(tmp_path):
    """A white rectangle on black: after expand, IoU crop, flip and resize (no colour change)
    the box must still frame white pixels, and the pixels outside every box stay dark."""
    from PIL import Image

    pixels = np.zeros((120, 160, 3), np.uint8)
    pixels[30:70, 100:140] = 255
    pixels[80:110, 10:50] = 255
    Image.fromarray(pixels).save(tmp_path / "x.png")
    record = {"path": str(tmp_path / "x.png"), "image_id": 1, "height": 120, "width": 160,
              "boxes": np.array([[100, 30, 140, 70], [10, 80, 50, 110]], np.float32),
              "labels": np.array([1, 2], np.int32)}
    aug = coco_data.Augmentation(brightness=0, contrast=0, saturation=0, hue=0)
    crops = 0
    for seed in range(40):
        out = coco_data.ssd_train_transform(record, np.random.default_rng(seed), image_size=64,
                                            max_boxes=4, aug=aug)
        assert out["image"].shape == (64, 64, 3) and out["boxes"].shape == (4, 4)
        valid = out["labels"] > 0
        assert 1 <= valid.sum() <= 2 and not out["labels"][~valid].any()
        boxes = out["boxes"][valid]
        assert np.all((boxes >= 0) & (boxes <= 1))
        crops += valid.sum() < 2
        inside = np.zeros((64, 64), bool)
        for x1, y1, x2, y2 in boxes * 64:
            box = out["image"][int(math.ceil(y1)) + 1:int(y2) - 1,
                               int(math.ceil(x1)) + 1:int(x2) - 1]
            if box.size:
                assert box.mean() > 200, (seed, box.mean())
            inside[int(y1):int(math.ceil(y2)), int(x1):int(math.ceil(x2))] = True
        if valid.sum() == 2:  # nothing cropped away: only expand's grey fill and black outside
            assert out["image"][~inside].mean() < 140
    assert crops > 0  # some crops dropped an object


def test_photometric_distortion_changes_colours_only_within_limits():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    out = coco_data.photometric_distort(image, rng, coco_data.Augmentation())
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    same = coco_data.photometric_distort(image, rng, coco_data.Augmentation(
        brightness=0, contrast=0, saturation=0, hue=0))
    np.testing.assert_array_equal(same, image)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def test_ssd300_shapes_and_feature_maps():
    model = nnx.eval_shape(lambda: ssd.SSD(81, rngs=nnx.Rngs(0)))
    assert ssd.feature_sizes(model, 300) == (38, 19, 10, 5, 3, 1)
    assert model.feature_channels == (1024, 512, 512, 256, 256, 256)
    graphdef, state = nnx.split(model)
    offsets, logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                                     jax.ShapeDtypeStruct((2, 300, 300, 3), jnp.float32))
    assert offsets.shape == (2, 8732, 4) and logits.shape == (2, 8732, 81)
    # layer3 keeps the 38x38 resolution of layer2: its first block has no stride.
    assert model.backbone.layer3[0].conv2.strides == 1
    assert model.backbone.layer4 is None and model.backbone.fc is None
    with pytest.raises(ValueError, match="too small"):
        ssd.feature_sizes(model, 64)


@pytest.mark.slow
def test_backbone_imports_torchvision_resnet50_layout():
    """A torchvision-layout ResNet-50 state dict (here written by the ResNet recipe's exporter,
    at 1/8 width) loads into the backbone; layer4 and fc are ignored."""
    resnet = models.ResNet50(num_filters=8, num_classes=10, rngs=models.init_rngs(1))
    state_dict = weights.export_torchvision_state_dict(resnet)
    model = ssd.SSD(11, width=0.125, rngs=models.init_rngs(2))
    assert ssd.import_torchvision_backbone(model, state_dict) == len(
        [k for k in state_dict if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3")
         and not k.endswith("num_batches_tracked")])
    np.testing.assert_array_equal(np.asarray(model.backbone.layer3[5].conv3.kernel[...]),
                                  np.asarray(resnet.layer3[5].conv3.kernel[...]))
    np.testing.assert_array_equal(np.asarray(model.backbone.layer2[0].downsample.bn.mean[...]),
                                  np.asarray(resnet.layer2[0].downsample.bn.mean[...]))
    # Up to layer2 (same strides) the two compute the same features.
    x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    np.testing.assert_allclose(np.asarray(model.backbone.features(x, num_stages=2)),
                               np.asarray(resnet.features(x, num_stages=2)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer3.5.conv3.weight"):
        ssd.import_torchvision_backbone(model, {k: v for k, v in state_dict.items()
                                                if k != "layer3.5.conv3.weight"})


# ---------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_help_shows_the_full_scale_command():
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "recipes", "ssd_rn50.py"),
                             "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for text in ("--data-dir /data/coco2017", "--devices 8", "instances_train2017.json",
                 "24.8", "--backbone-weights", "8732"):
        assert text in result.stdout


@pytest.mark.slow  # 90 s on the shared 2-core machine (tracing and compiling SSD's steps)
def test_smoke_run_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    results = ssd_task.main("ssd_rn50", "", "", ["--smoke", "--workdir", str(workdir),
                                                  "--devices", "1"])
    for name in ("results.json", "metrics.jsonl", "curves.png", "sparsity_report.txt",
                 "coco_summary.txt", "detections_retrain.json", "config.json"):
        assert (workdir / name).exists(), name
    with open(workdir / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    assert saved["metric"] == "bbAP" and saved["exactly_nm_sparse"] is True
    for phase in ("dense", "one_shot", "sparse", "control"):
        assert 0.0 <= saved[phase] <= 1.0
        assert list(saved["coco_summary"][phase]) == list(coco_eval.SUMMARY_NAMES)
    assert saved["steps"] == {"dense": 4, "retrain": 4, "control": 4}
    assert sorted(os.listdir(workdir / "checkpoints")) == ["control", "dense", "retrain"]
    phases = {json.loads(line)["phase"] for line in open(workdir / "metrics.jsonl")}
    assert phases == {"dense", "one_shot", "retrain", "control"}
    # Every convolution with a multiple of 4 input channels is 2:4; only the RGB stem is dense.
    report = open(workdir / "sparsity_report.txt").read()
    dense_kernels = [line for line in report.splitlines()
                     if "/kernel" in line and " skipped " in line]
    assert len(dense_kernels) == 1 and dense_kernels[0].startswith("backbone/conv1/kernel")
    assert "every pruned leaf 2:4: yes" in report


@pytest.mark.slow  # two smoke runs (about 2 minutes on 2 cores)
def test_resumed_run_equals_uninterrupted_run(tmp_path, capsys):

    config = ssd_task.smoke_config(ssd_task.builtin_config()).replace(
        devices=1, checkpoint_every_steps=2, builtin_dir=str(tmp_path / "digits"))
    reference = ssd_task.train_and_evaluate(config, str(tmp_path / "reference"))
    workdir = str(tmp_path / "resumed")
    # 4 dense steps, then killed after the 3rd retraining step: its last checkpoint is step 2,
    # so the resumed run repeats step 3 with the restored parameters and data-iterator state.
    with pytest.raises(workflow.Interrupted):
        ssd_task.train_and_evaluate(config.replace(interrupt_after_steps=7), workdir)
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    capsys.readouterr()
    resumed = ssd_task.train_and_evaluate(config, workdir, resume=True)
    printed = capsys.readouterr().out
    assert "[dense] resumed from" in printed and "[retrain] resumed from" in printed
    for key in ("dense", "one_shot", "sparse", "control"):
        assert resumed[key] == reference[key], key
    read = lambda d: [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]  # noqa: E731
    assert read(workdir) == read(str(tmp_path / "reference"))


@pytest.mark.slow  # jax2onnx conversion of the whole network
def test_export_onnx_matches_jax(tmp_path):
    pytest.importorskip("jax2onnx")
    ort = pytest.importorskip("onnxruntime")
    config = ssd_task.smoke_config(ssd_task.builtin_config())
    model = ssd_task.create_model(config, 11)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    path = str(tmp_path / "ssd.onnx")
    ssd_task.export_onnx(config, 11, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats), path)
    x = np.random.default_rng(0).uniform(-2, 2, (1, 64, 64, 3)).astype(np.float32)
    got = ort.InferenceSession(path).run(None, {"image": x})
    expected = nnx.merge(graphdef, params, batch_stats)(jnp.asarray(x))
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-4)
