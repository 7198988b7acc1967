"""Tests of the Mask R-CNN building blocks (recipes/detection/rcnn_ops.py).

References are independent of the code under test: anchors and box deltas worked out by hand,
a per-sample NumPy loop of torchvision's RoIAlign kernel (bilinear_interpolate, including its
border rules), the host NumPy NMS of recipes/detection/boxes.py, a per-pixel loop for the mask
paste, and counting for the sampler.
"""

import math
import os
import sys

import jax
import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from recipes.detection import boxes as box_ops  # noqa: E402
from recipes.detection import rcnn_ops  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------------------------


def test_cell_anchors_by_hand():
    # size 32: ratio 0.5 -> w = 32 * sqrt(2) = 45.25, h = 22.63 -> half sizes 22.6, 11.3 -> 23, 11.
    expected = np.array([[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]], np.float32)
    np.testing.assert_array_equal(rcnn_ops.cell_anchors((32,), (0.5, 1.0, 2.0)), expected)
    # Halves round to even, as torch.round: 5 / 2 = 2.5 -> 2, 7 / 2 = 3.5 -> 4.
    np.testing.assert_array_equal(rcnn_ops.cell_anchors((5, 7), (1.0,)),
                                  [[-2, -2, 2, 2], [-4, -4, 4, 4]])
    # Ratio varies slowest: (ratio 0.5: sizes 8, 16), (ratio 2: sizes 8, 16).
    got = rcnn_ops.cell_anchors((8, 16), (0.5, 2.0))
    widths = got[:, 2] - got[:, 0]
    np.testing.assert_array_equal(widths, [12, 22, 6, 12])  # 2 * round(8 * 1.414 / 2) = 12, ...


def test_grid_anchors_order_and_shifts_by_hand():
    base = rcnn_ops.cell_anchors((32,), (0.5, 1.0, 2.0))
    anchors = rcnn_ops.grid_anchors(base, (2, 3), (4, 4))
    assert anchors.shape == (2 * 3 * 3, 4)
    # Row 1, column 2, ratio 1.0 -> index (1 * 3 + 2) * 3 + 1 = 16, centred at x = 8, y = 4.
    np.testing.assert_array_equal(anchors[16], [8 - 16, 4 - 16, 8 + 16, 4 + 16])
    np.testing.assert_array_equal(anchors[0], [-23, -11, 23, 11])  # cell (0, 0), ratio 0.5


def test_generate_anchors_strides_and_levels():
    anchors, levels = rcnn_ops.generate_anchors(
        (64, 96), [(16, 24), (8, 12)], [(32,), (64,)], [(0.5, 1.0, 2.0)] * 2)
    assert anchors.shape == ((16 * 24 + 8 * 12) * 3, 4)
    np.testing.assert_array_equal(np.bincount(levels), [16 * 24 * 3, 8 * 12 * 3])
    last = anchors[-2]  # level 1 (stride 8), last cell (7, 11), ratio 1.0, size 64
    np.testing.assert_array_equal(last, [88 - 32, 56 - 32, 88 + 32, 56 + 32])
    with pytest.raises(ValueError, match="one of each per level"):
        rcnn_ops.generate_anchors((64, 64), [(16, 16)], [(32,), (64,)], [(1.0,)])


# ---------------------------------------------------------------------------------------------
# Box coder
# ---------------------------------------------------------------------------------------------


def test_box_coder_by_hand_and_clamp():
    ref = np.array([[0.0, 0.0, 10.0, 10.0]], np.float32)
    target = np.array([[5.0, 0.0, 15.0, 20.0]], np.float32)
    # centres (5, 5) -> (10, 10); sizes 10 x 10 -> 10 x 20.
    deltas = rcnn_ops.encode_boxes(target, ref, (10.0, 10.0, 5.0, 5.0))
    np.testing.assert_allclose(deltas, [[5.0, 5.0, 0.0, 5.0 * math.log(2.0)]], rtol=1e-6)
    # A huge dw is clamped at log(1000 / 16): the width grows 62.5 times, not e^100.
    decoded = rcnn_ops.decode_boxes(np.array([[0.0, 0.0, 100.0, 0.0]], np.float32), ref)
    np.testing.assert_allclose(decoded, [[5 - 312.5, 0.0, 5 + 312.5, 10.0]], rtol=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_round_trip(weights):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (2, 64, 2)).astype(np.float32)
    wh = rng.uniform(2, 300, (2, 64, 2)).astype(np.float32)
    refs, targets = (np.concatenate([xy[i], xy[i] + wh[i]], axis=-1) for i in range(2))
    deltas = rcnn_ops.encode_boxes(targets, refs, weights)
    np.testing.assert_allclose(rcnn_ops.decode_boxes(deltas, refs, weights), targets, atol=2e-3)


def test_clip_boxes():
    boxes = np.array([[-5.0, 3.0, 120.0, 90.0]], np.float32)
    np.testing.assert_array_equal(rcnn_ops.clip_boxes(boxes, (80, 100)), [[0, 3, 100, 80]])


# ---------------------------------------------------------------------------------------------
# RoIAlign against a NumPy loop of torchvision's kernel
# ---------------------------------------------------------------------------------------------


def bilinear_reference(feature, y, x):
    height, width = feature.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * feature[y_low, x_low] + hy * lx * feature[y_low, x_high]
            + ly * hx * feature[y_high, x_low] + ly * lx * feature[y_high, x_high])


def roi_align_reference(feature, roi, out_hw, scale, sampling_ratio, aligned):
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (v * scale - offset for v in roi)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / out_hw[0], roi_w / out_hw[1]
    out = np.zeros((*out_hw, feature.shape[-1]))
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            for iy in range(sampling_ratio):
                y = y1 + i * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                for ix in range(sampling_ratio):
                    x = x1 + j * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                    out[i, j] += bilinear_reference(feature, y, x)
    return out / sampling_ratio**2


# Inside, across every border, wholly outside, smaller than a pixel, a single row.
ROIS = np.array([[2.0, 3.0, 11.0, 9.0], [-6.0, -4.0, 7.0, 5.0], [10.0, 8.0, 19.0, 17.0],
                 [-1.5, 6.0, 17.5, 15.9], [30.0, 30.0, 40.0, 36.0], [5.2, 5.1, 5.6, 5.3],
                 [0.0, 0.0, 16.0, 1.0]], np.float32)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("scale,sampling_ratio", [(1.0, 2), (0.5, 2), (0.5, 3)])
def test_roi_align_matches_numpy_reference(aligned, scale, sampling_ratio):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 16, 12, 3)).astype(np.float32)
    batch_index = np.arange(len(ROIS)) % 2
    got = jax.jit(rcnn_ops.roi_align, static_argnums=(3, 4, 5, 6))(
        features, ROIS, batch_index, (7, 5), scale, sampling_ratio, aligned)
    assert got.shape == (len(ROIS), 7, 5, 3)
    for r, roi in enumerate(ROIS):
        expected = roi_align_reference(features[batch_index[r]], roi, (7, 5), scale,
                                       sampling_ratio, aligned)
        np.testing.assert_allclose(got[r], expected, atol=1e-5, err_msg=f"roi {roi}")
    assert np.all(np.asarray(got[4]) == 0)  # wholly outside the 12 x 16 map: zero


def test_roi_align_rejects_adaptive_sampling_and_bad_rois():
    features = np.zeros((1, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="sampling_ratio must be positive"):
        rcnn_ops.roi_align(features, ROIS[:1], [0], (2, 2), 1.0, sampling_ratio=-1)
    with pytest.raises(ValueError, match=r"\(R, 4\)"):
        rcnn_ops.roi_align(features, np.zeros((3, 5), np.float32), [0] * 3, (2, 2), 1.0)


def test_level_mapping_by_hand():
    # sqrt(area) 224 -> level 4, 112 -> 3, 56 -> 2, 20 -> 2 (clamped), 448 -> 5, 2000 -> 5.
    sides = np.array([224, 112, 56, 20, 448, 2000, 223.9], np.float32)
    rois = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], axis=1)
    np.testing.assert_array_equal(rcnn_ops.roi_levels(rois, num_levels=4),
                                  [2, 1, 0, 0, 3, 3, 1])


@pytest.mark.slow
def test_multiscale_roi_align_reads_each_roi_from_its_level():
    rng = np.random.default_rng(2)
    image = 256
    features = [rng.normal(size=(2, image // 2**k, image // 2**k, 4)).astype(np.float32)
                for k in (2, 3, 4, 5)]
    rois = np.array([[10, 10, 40, 50], [0, 0, 224, 224], [30, 20, 250, 240], [5, 100, 120, 160],
                     [-20, -10, 90, 70]], np.float32)
    batch_index = np.array([0, 1, 1, 0, 1])
    got = rcnn_ops.multiscale_roi_align(features, rois, batch_index, (7, 7), 2)
    levels = np.asarray(rcnn_ops.roi_levels(rois, 4))
    assert set(levels) == {0, 1, 2}
    for r in range(len(rois)):
        level = levels[r]
        expected = roi_align_reference(features[level][batch_index[r]], rois[r], (7, 7),
                                       2.0 ** -(level + 2), 2, aligned=False)
        np.testing.assert_allclose(got[r], expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# NMS, matcher, sampler
# ---------------------------------------------------------------------------------------------


def random_boxes(rng, n, extent=100.0):
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(5, 40, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_size_nms_equals_greedy_host_nms(seed):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 60)
    scores = rng.uniform(size=60).astype(np.float32)
    scores[5] = scores[7]  # a tie
    valid = rng.uniform(size=60) > 0.2
    keep = np.asarray(jax.jit(rcnn_ops.nms_keep, static_argnums=3)(boxes, scores, valid, 0.5))
    candidates = np.flatnonzero(valid)
    expected = candidates[box_ops.nms(boxes[candidates], scores[candidates], 0.5)]
    np.testing.assert_array_equal(np.flatnonzero(keep), np.sort(expected))
    index, ok = rcnn_ops.top_k_kept(scores, keep, 10)
    np.testing.assert_array_equal(np.asarray(index)[np.asarray(ok)], expected[:10])


@pytest.mark.slow
def test_nms_vmaps_over_independent_sets():
    rng = np.random.default_rng(3)
    boxes = np.stack([random_boxes(rng, 30) for _ in range(3)])
    scores = rng.uniform(size=(3, 30)).astype(np.float32)
    valid = np.ones((3, 30), bool)
    keep = jax.vmap(rcnn_ops.nms_keep, in_axes=(0, 0, 0, None))(boxes, scores, valid, 0.3)
    for i in range(3):
        np.testing.assert_array_equal(np.flatnonzero(keep[i]),
                                      np.sort(box_ops.nms(boxes[i], scores[i], 0.3)))


def test_matcher_by_hand():
    # 2 real ground-truth boxes and 1 padding row, 5 predictions.
    iou = np.array([[0.9, 0.5, 0.2, 0.1, 0.0],
                    [0.1, 0.6, 0.35, 0.25, 0.0],
                    [0.99, 0.99, 0.99, 0.99, 0.99]], np.float32)
    valid = np.array([True, True, False])
    got = rcnn_ops.match_boxes(iou, valid, 0.7, 0.3, allow_low_quality_matches=False)
    np.testing.assert_array_equal(got, [0, -2, -2, -1, -1])
    # Low-quality: prediction 1 is ground truth 1's best (0.6) -> matched to it.
    got = rcnn_ops.match_boxes(iou, valid, 0.7, 0.3, allow_low_quality_matches=True)
    np.testing.assert_array_equal(got, [0, 1, -2, -1, -1])
    got = rcnn_ops.match_boxes(iou, np.zeros(3, bool), 0.5, 0.5, False)
    np.testing.assert_array_equal(got, [-1] * 5)


@pytest.mark.parametrize("num_pos,num_neg", [(300, 2000), (10, 2000), (10, 100), (0, 50)])
def test_balanced_sampler_ratios(num_pos, num_neg):
    rng = np.random.default_rng(num_pos + num_neg)
    labels = np.concatenate([np.ones(num_pos), np.zeros(num_neg), -np.ones(500)]).astype(np.int32)
    labels = labels[rng.permutation(len(labels))]
    index, valid, positive = jax.jit(rcnn_ops.sample_balanced, static_argnums=(2, 3))(
        jax.random.key(0), labels, 256, 0.25)
    index, valid, positive = map(np.asarray, (index, valid, positive))
    taken = index[valid]
    assert len(set(taken)) == len(taken)  # no candidate twice
    expected_pos = min(64, num_pos)
    expected_neg = min(256 - expected_pos, num_neg)
    assert np.sum(labels[taken] == 1) == np.sum(positive) == expected_pos
    assert np.sum(labels[taken] == 0) == expected_neg
    assert not np.any(labels[taken] == -1)
    assert np.all(positive[:expected_pos]) and not np.any(positive[64:])


def test_balanced_sampler_is_random_and_uniform():
    labels = np.array([1] * 8 + [0] * 40, np.int32)
    sample = jax.jit(jax.vmap(lambda key: rcnn_ops.sample_balanced(key, labels, 8, 0.5)))
    index, valid, _ = sample(jax.random.split(jax.random.key(0), 4000))
    rate = np.bincount(np.asarray(index)[np.asarray(valid)], minlength=48) / 4000
    # Each of the 8 positives is taken half the time (4 of 8), each negative 1 time in 10
    # (4 of 40); binomial standard deviations 0.008 and 0.005.
    assert np.all(np.abs(rate[:8] - 0.5) < 0.04)
    assert np.all(np.abs(rate[8:] - 0.1) < 0.025)


# ---------------------------------------------------------------------------------------------
# Mask targets and paste-back
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mask_targets_crop_the_matched_mask():
    masks = np.zeros((2, 40, 40), np.uint8)
    masks[0, 10:30, 10:20] = 1  # left half of the box [10, 10, 30, 30]
    masks[1, 0:8, 0:8] = 1
    rois = np.array([[10, 10, 30, 30], [12, 12, 28, 28], [0, 0, 8, 8]], np.float32)
    matched = np.array([0, 0, 1])
    targets = np.asarray(rcnn_ops.mask_targets(masks, rois, matched, 28))
    assert targets.shape == (3, 28, 28)
    assert np.all(targets[0][:26, :12] > 0.99) and np.all(targets[0][:, 14:] < 0.01)
    assert np.all(targets[2][:20, :20] > 0.99)  # the 8 x 8 square (legacy: its last pixel fades)
    for r in range(3):
        expected = roi_align_reference(masks[matched[r]][..., None].astype(np.float64), rois[r],
                                       (28, 28), 1.0, 2, aligned=False)[..., 0]
        np.testing.assert_allclose(targets[r], expected, atol=1e-5)


def interpolate_reference(image, out_h, out_w):
    """F.interpolate(bilinear, align_corners=False), one output pixel at a time."""
    in_h, in_w = image.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        sy = max((i + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = int(sy)
        y1 = min(y0 + 1, in_h - 1)
        ly = sy - y0
        for j in range(out_w):
            sx = max((j + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = int(sx)
            x1 = min(x0 + 1, in_w - 1)
            lx = sx - x0
            out[i, j] = ((1 - ly) * ((1 - lx) * image[y0, x0] + lx * image[y0, x1])
                         + ly * ((1 - lx) * image[y1, x0] + lx * image[y1, x1]))
    return out


def test_paste_masks_matches_per_pixel_reference():
    rng = np.random.default_rng(4)
    masks = rng.uniform(size=(3, 6, 6)).astype(np.float32)
    boxes = np.array([[4.0, 5.0, 20.0, 13.0], [-5.0, 20.0, 10.0, 35.0], [25.0, 2.0, 45.0, 9.5]],
                     np.float32)
    got = rcnn_ops.paste_masks(masks, boxes, (30, 40))
    assert got.shape == (3, 30, 40)
    for d in range(3):
        expected = np.zeros((30, 40))
        padded = np.pad(masks[d], 1)
        x1, y1, x2, y2 = boxes[d]
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * 8 / 6, (y2 - y1) / 2 * 8 / 6
        bx1, by1, bx2, by2 = (int(v) for v in (cx - hw, cy - hh, cx + hw, cy + hh))
        resized = interpolate_reference(padded, by2 - by1 + 1, bx2 - bx1 + 1)
        for y in range(30):
            for x in range(40):
                if by1 <= y <= by2 and bx1 <= x <= bx2:
                    expected[y, x] = resized[y - by1, x - bx1]
        np.testing.assert_allclose(got[d], expected, atol=1e-5)
    with pytest.raises(ValueError, match="masks"):
        rcnn_ops.paste_masks(np.zeros((2, 4, 5)), np.zeros((2, 4)), (10, 10))
