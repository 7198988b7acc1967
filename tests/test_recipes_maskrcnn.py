"""Tests of the Mask R-CNN recipe (recipes/maskrcnn_rn50.py, issue 11).

References are independent of the code under test: torchvision's published parameter count of
maskrcnn_resnet50_fpn (44,401,393), torchvision itself where it is importable (FPN features and
RPN objectness for the same random weights), state-dict names written out here from
torchvision's module definitions, pycocotools' AP of the ground truth, masks' own pixels for
the augmented boxes.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import sparse_jax  # noqa: E402
from recipes.detection import boxes as box_ops  # noqa: E402
from recipes.detection import (coco_data, coco_eval, digits_detection, maskrcnn,  # noqa: E402
                               maskrcnn_task, rcnn_ops)
from recipes.engine import workflow  # noqa: E402
from recipes.vision import weights  # noqa: E402

SMALL = maskrcnn.ModelConfig(num_classes=11, num_filters=8, stage_sizes=(1, 1, 1, 1),
                             fpn_channels=16, representation_size=32, mask_channels=16)


def test_full_model_parameter_count_is_torchvisions():
    abstract = nnx.eval_shape(lambda: maskrcnn.MaskRCNN(maskrcnn.ModelConfig(), rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    # torchvision's MaskRCNN_ResNet50_FPN_Weights.COCO_V1 meta: num_params 44,401,393 (frozen
    # BatchNorm statistics and affine are buffers, not parameters, there and here).
    assert sum(x.size for x in jax.tree.leaves(params)) == 44_401_393


@pytest.mark.slow
def test_pruning_plan_of_the_full_model():
    abstract = nnx.eval_shape(lambda: maskrcnn.MaskRCNN(maskrcnn.ModelConfig(), rngs=nnx.Rngs(0)))
    # The task's rules: sparse_jax's defaults (the workflow passes pruning_rules=None).
    plans = {p.path: p for p in sparse_jax.plan_tree(nnx.state(abstract, nnx.Param))}
    kernels = {path: p for path, p in plans.items() if len(p.shape) >= 2}
    dense = sorted(path for path, p in kernels.items() if p.axis is None)
    assert dense == ["backbone/body/conv1/kernel"]  # 3 input channels
    # Every other kernel is pruned along its input axis: -2 of (kh, kw, in, out), 0 of (in, out).
    for path, p in kernels.items():
        if path != "backbone/body/conv1/kernel":
            assert p.axis == len(p.shape) - 2, path
    for name in ("backbone/fpn/inner_blocks/3/kernel", "rpn/head/cls_logits/kernel",
                 "roi_heads/box_head/fc6/kernel", "roi_heads/box_predictor/bbox_pred/kernel",
                 "roi_heads/mask_head/0/kernel", "roi_heads/mask_predictor/conv5_mask/kernel",
                 "roi_heads/mask_predictor/mask_fcn_logits/kernel"):
        assert kernels[name].axis is not None, name
    # 53 ResNet convs + 8 FPN + 3 RPN + 4 box + 6 mask kernels, minus the stem.
    assert len(kernels) == 53 + 8 + 3 + 4 + 6 and len(dense) == 1


# State-dict keys and shapes of torchvision's maskrcnn_resnet50_fpn (module definitions in
# torchvision/models/detection/{backbone_utils,rpn,roi_heads,mask_rcnn}.py, torchvision.ops).
TORCHVISION_KEYS = {
    "backbone.body.conv1.weight": (64, 3, 7, 7),
    "backbone.body.bn1.running_var": (64,),
    "backbone.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "backbone.body.layer4.2.bn3.weight": (2048,),
    "backbone.fpn.inner_blocks.0.0.weight": (256, 256, 1, 1),
    "backbone.fpn.inner_blocks.3.0.weight": (256, 2048, 1, 1),
    "backbone.fpn.layer_blocks.2.0.bias": (256,),
    "rpn.head.conv.0.0.weight": (256, 256, 3, 3),
    "rpn.head.cls_logits.weight": (3, 256, 1, 1),
    "rpn.head.bbox_pred.weight": (12, 256, 1, 1),
    "roi_heads.box_head.fc6.weight": (1024, 12544),
    "roi_heads.box_head.fc7.weight": (1024, 1024),
    "roi_heads.box_predictor.cls_score.weight": (91, 1024),
    "roi_heads.box_predictor.bbox_pred.weight": (364, 1024),
    "roi_heads.mask_head.0.0.weight": (256, 256, 3, 3),
    "roi_heads.mask_head.3.0.bias": (256,),
    "roi_heads.mask_predictor.conv5_mask.weight": (256, 256, 2, 2),  # ConvTranspose: (in, out)
    "roi_heads.mask_predictor.mask_fcn_logits.weight": (91, 256, 1, 1),
}


def test_torchvision_names_and_shapes():
    abstract = nnx.eval_shape(lambda: maskrcnn.MaskRCNN(maskrcnn.ModelConfig(), rngs=nnx.Rngs(0)))
    from flax import traverse_util

    flat = traverse_util.flatten_dict(nnx.to_pure_dict(
        nnx.state(abstract, nnx.Any(nnx.Param, nnx.BatchStat))))
    keys = {maskrcnn.torch_key(path): value.shape for path, value in flat.items()}
    for key, shape in TORCHVISION_KEYS.items():
        assert key in keys, key
        torch_shape = keys[key]
        if len(shape) == 4:  # ours (kh, kw, in, out); torch's (out, in, kh, kw), deconv (in, out, ..)
            expected = ((shape[2], shape[3], shape[0], shape[1]) if "conv5_mask" in key
                        else (shape[2], shape[3], shape[1], shape[0]))
        elif len(shape) == 2:
            expected = shape[::-1]
        else:
            expected = shape
        assert torch_shape == expected, key
    # 53 convs + 53 frozen BN x 4 + 8 FPN x 2 + 3 RPN x 2 + 4 linear x 2 + 6 mask x 2.
    assert len(keys) == 53 + 53 * 4 + 16 + 6 + 8 + 12


def _export_torchvision_state_dict(model):
    """torch layouts and torchvision names (the deconvolution's kernel is (in, out, kh, kw))."""
    out = weights.export_state_dict(model, maskrcnn.torch_key)
    key = "roi_heads.mask_predictor.conv5_mask.weight"
    out[key] = np.ascontiguousarray(np.transpose(out[key], (1, 0, 2, 3)))
    return out


@pytest.mark.slow
def test_state_dict_round_trip_old_names_and_errors():
    model = maskrcnn.create_model(SMALL, seed=1)
    exported = _export_torchvision_state_dict(model)
    other = maskrcnn.create_model(SMALL, seed=2)
    # Older torchvision names are accepted.
    renamed = {}
    for key, value in exported.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            key = key.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        renamed[key] = value
    maskrcnn.import_torchvision_state_dict(other, renamed)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(other))):
        np.testing.assert_array_equal(a, b)
    bad = dict(exported)
    bad["roi_heads.box_predictor.cls_score.weight"] = np.zeros((91, 32), np.float32)
    with pytest.raises(ValueError, match="cls_score.weight.*91, 32"):
        maskrcnn.import_torchvision_state_dict(other, bad)
    del bad["rpn.head.bbox_pred.bias"]
    with pytest.raises(ValueError, match="missing keys.*rpn.head.bbox_pred.bias"):
        maskrcnn.import_torchvision_state_dict(other, bad)


def test_fpn_features_and_rpn_objectness_equal_torchvisions():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=11).eval()
    with torch.no_grad():  # batch-norm statistics far from the identity
        for module in reference.modules():
            if hasattr(module, "running_var"):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.normal_(0.0, 0.2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    model = maskrcnn.create_model(maskrcnn.ModelConfig(num_classes=11))
    maskrcnn.import_torchvision_state_dict(model, state)
    x = np.random.default_rng(0).normal(size=(1, 3, 128, 192)).astype(np.float32)
    with torch.no_grad():
        features = reference.backbone(torch.from_numpy(x))
        objectness, _ = reference.rpn.head(list(features.values()))
    ours = model.backbone(jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert len(ours) == len(features) == 5
    for level, value in enumerate(features.values()):
        expected = value.permute(0, 2, 3, 1).numpy()
        scale = np.abs(expected).max()
        np.testing.assert_allclose(ours[level], expected, atol=1e-4 * scale, rtol=1e-3)
    our_objectness, _ = model.rpn.head(ours)
    expected = np.concatenate([o.permute(0, 2, 3, 1).reshape(1, -1).numpy() for o in objectness], 1)
    np.testing.assert_allclose(our_objectness, expected, atol=1e-4 * np.abs(expected).max(),
                               rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Data and metric
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    spec = digits_detection.DigitsSpec(num_train_images=6, num_val_images=6, seed=3)
    return digits_detection.get_coco_directory(str(tmp_path_factory.mktemp("digits")),
                                               spec=spec, log=lambda _: None)


@pytest.mark.slow
def test_coco_segm_ap_is_one_on_ground_truth_fed_back(digits_dir):
    source = coco_data.CocoDetectionSource(digits_dir, "val2017", masks=True)
    records, pasted_records = [], []
    for record in source.records:
        masks = coco_data.decode_masks(record["segmentations"], record["height"], record["width"])
        boxes = record["boxes"]
        ids = [record["image_id"]] * len(boxes)
        categories = [source.category_ids[label - 1] for label in record["labels"]]
        records += coco_eval.detection_records(ids, categories, box_ops.xyxy_to_xywh(boxes),
                                               [1.0] * len(boxes),
                                               [digits_detection.encode_mask(m) for m in masks])
        # The prediction path: 28x28 targets on the boxes, pasted back at 0.5.
        crops = rcnn_ops.mask_targets(masks, boxes, np.arange(len(boxes)), 28)
        pasted = rcnn_ops.paste_masks(np.asarray(crops), boxes, masks.shape[1:]) > 0.5
        pasted_records += coco_eval.detection_records(
            ids, categories, box_ops.xyxy_to_xywh(boxes), [1.0] * len(boxes),
            [digits_detection.encode_mask(m) for m in pasted])
    assert len(records) >= 6
    assert coco_eval.evaluate(source.annotation_file, records, "segm")["AP"] == 1.0
    assert coco_eval.evaluate(source.annotation_file, records, "bbox")["AP"] == 1.0
    resampled = coco_eval.evaluate(source.annotation_file, pasted_records, "segm")
    # Thin strokes lose pixels at 28 x 28 (and the legacy half-pixel shift): most still match.
    assert resampled["AP50"] > 0.8 and resampled["AP"] > 0.3


def test_train_transform_flips_and_resizes_masks_with_boxes(digits_dir):
    source = coco_data.CocoDetectionSource(digits_dir, "train2017", skip_empty=True,
                                          masks=True)
    record = source.records[0]
    example = coco_data.maskrcnn_transform(record, np.random.default_rng(0), min_sizes=(48,),
                                           max_size=96, canvas=(96, 96), max_boxes=5,
                                           flip_probability=1.0)
    assert example["image"].shape == (96, 96, 3) and example["masks"].shape == (5, 96, 96)
    np.testing.assert_array_equal(example["image_hw"], [48, 48])
    assert not example["image"][48:].any() and not example["masks"][:, :, 48:].any()
    count = len(record["boxes"])
    assert np.all(example["labels"][:count] == record["labels"]) and not example["labels"][count:].any()
    for mask, box, original in zip(example["masks"][:count], example["boxes"], record["boxes"]):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        tight = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
        np.testing.assert_allclose(box, tight, atol=1.5)  # half-size nearest resampling
        # Flipped: the box's left edge comes from the original right edge.
        assert abs(box[0] - (96 - original[2]) / 2) < 1e-4
    with pytest.raises(ValueError, match="larger than the canvas"):
        coco_data.maskrcnn_transform(record, None, min_sizes=(128,), max_size=128,
                                     canvas=(96, 96), max_boxes=5)


def test_help_gives_the_full_scale_commands(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "maskrcnn_rn50", os.path.join(REPO_ROOT, "recipes", "maskrcnn_rn50.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        maskrcnn_task.main("maskrcnn_rn50", module.__doc__, module.EPILOG, ["--help"])
    out = capsys.readouterr().out
    for text in ("--data-dir /data/coco", "--batch-size 16 --epochs 26 --lr 0.02", "37.9",
                 "--init-from maskrcnn_resnet50_fpn.safetensors", "--smoke", "--resume"):
        assert text in out, text


# ---------------------------------------------------------------------------------------------
# The workflow
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # about 70 s of CPU (mostly XLA compiles): over the default suite's budget
def test_smoke_run_end_to_end(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    results = maskrcnn_task.main("maskrcnn_rn50", "", "", ["--smoke", "--no-control", "--devices", "2",
                                                            "--workdir", workdir])
    out = capsys.readouterr().out
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    for key in ("model", "dataset", "metric", "dense", "one_shot", "sparse", "control", "steps",
                "seconds", "devices", "jax"):
        assert key in saved, key
    assert saved["metric"] == "bbox_ap" and saved["control"] is None and saved["devices"] == 2
    for phase in ("dense", "one_shot", "sparse"):
        assert 0.0 <= saved[phase] <= 1.0 and 0.0 <= saved["mask_ap"][phase] <= 1.0
    assert saved["exactly_nm_sparse"] is True
    assert saved["steps"] == {"dense": 3, "retrain": 3, "control": None}
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert {r["phase"] for r in records} == {"dense", "one_shot", "retrain"}
    assert all(np.isfinite(r["loss"]) for r in records if r["split"] == "train")
    for name in ("curves.png", "sparsity_report.txt", "config.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "retrain"))) == ["2", "3"]
    assert "kept dense: backbone/body/conv1/kernel" in out
    assert "| maskrcnn_rn50 | digits_detection | mask |" in out


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):

    args = ["--smoke", "--no-control", "--devices", "1"]
    full = maskrcnn_task.main("maskrcnn_rn50", "", "", args + ["--workdir", str(tmp_path / "a")])
    # Killed after the dense phase and one retraining step, then resumed.
    with pytest.raises(workflow.Interrupted):
        maskrcnn_task.main("maskrcnn_rn50", "", "", args + [
            "--workdir", str(tmp_path / "b"), "--set", "interrupt_after_steps=4"])
    resumed = maskrcnn_task.main("maskrcnn_rn50", "", "", args + [
        "--workdir", str(tmp_path / "b"), "--resume"])
    for key in ("dense", "one_shot", "sparse"):
        assert resumed[key] == full[key], key
        assert resumed["mask_ap"][key] == full["mask_ap"][key], key
    phases = lambda d: [(r["phase"], r["step"], r["split"])  # noqa: E731
                        for r in map(json.loads, open(tmp_path / d / "metrics.jsonl"))]
    assert phases("a") == phases("b")
