"""Box arithmetic of the detection recipes, against hand-worked cases and brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recipes.detection import boxes as B


def _iou_by_hand(a, b):
    """One pair, written out in float64 Python."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(rng, n, size=100.0):
    corners = rng.uniform(0, size, (n, 2))
    extent = rng.uniform(1, size / 3, (n, 2))
    return np.concatenate([corners, corners + extent], axis=1)


def test_pairwise_iou_hand_worked():
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0]])
    # Overlap 1x1 of two 2x2 boxes: 1 / (4 + 4 - 1); touching corners: 0; identical: 1.
    np.testing.assert_allclose(B.pairwise_iou(a, b), [[1 / 7, 0.0, 1.0]])


def test_pairwise_iou_matches_brute_force_in_numpy_and_jax():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
    expected = np.array([[_iou_by_hand(x, y) for y in b] for x in a])
    np.testing.assert_allclose(B.pairwise_iou(a, b), expected, rtol=1e-12)
    got = jax.jit(B.pairwise_iou)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    assert isinstance(got, jax.Array)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_degenerate_boxes_have_zero_iou():
    point = np.array([[1.0, 1.0, 1.0, 1.0]])
    assert B.pairwise_iou(point, point)[0, 0] == 0.0
    assert B.box_area(np.array([3.0, 3.0, 1.0, 5.0])) == 0.0


def test_box_format_round_trips():
    rng = np.random.default_rng(1)
    xyxy = _random_boxes(rng, 6)
    np.testing.assert_allclose(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(xyxy)), xyxy)
    np.testing.assert_allclose(B.xyxy_to_xywh(np.array([1.0, 2.0, 4.0, 8.0])), [1, 2, 3, 6])


def _nms_brute_force(boxes, scores, threshold):
    """Definition: walk the boxes by falling score; keep one that overlaps no kept box too much."""
    kept = []
    for i in sorted(range(len(boxes)), key=lambda i: (-scores[i], i)):
        if all(_iou_by_hand(boxes[i], boxes[k]) <= threshold for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_brute_force(threshold):
    rng = np.random.default_rng(2)
    for _ in range(5):
        boxes = _random_boxes(rng, 40, size=60.0)
        scores = rng.uniform(size=40)
        assert B.nms(boxes, scores, threshold).tolist() == _nms_brute_force(boxes, scores, threshold)


def test_nms_hand_worked_and_max_outputs():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # Box 3 (0.95) suppresses 0 (IoU 90/100) and 1 (IoU 72/118 = 0.61 > 0.5); box 2 is apart.
    assert B.nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert B.nms(boxes, scores, 0.5, max_outputs=1).tolist() == [3]


def test_batched_nms_never_suppresses_across_labels():
    rng = np.random.default_rng(3)
    boxes = _random_boxes(rng, 60, size=50.0)
    scores = rng.uniform(size=60)
    labels = rng.integers(0, 3, size=60)
    kept = B.batched_nms(boxes, scores, labels, 0.5)
    expected = []
    for label in range(3):
        index = np.flatnonzero(labels == label)
        expected += [index[i] for i in _nms_brute_force(boxes[index], scores[index], 0.5)]
    assert sorted(kept.tolist()) == sorted(expected)
    assert np.all(np.diff(scores[kept]) <= 0)  # best first
    assert B.batched_nms(boxes, scores, labels, 0.5, max_outputs=4).tolist() == kept[:4].tolist()
