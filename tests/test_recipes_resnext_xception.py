"""Tests of the ResNeXt-101 32x8d and Xception recipes (models, weight import, rules, CLI).

References are independent of the code under test: parameter counts published by torchvision
and Keras, state-dict key/shape lists written out here from torchvision's and timm's module
definitions, forward passes written directly in torch's NCHW/OIHW layouts, TensorRT's KCRS
convention checked with NumPy, and ``lax.conv_general_dilated`` for the CPU convolution paths.
"""

import os
import runpy
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
from recipes.engine import cli  # noqa: E402
from recipes.vision.classification_task import ClassificationTask  # noqa: E402
from recipes.vision import configs, grouped_conv, models, weights, xception

DEPTHWISE_REASON = "depthwise conv (1 input channel per group) cannot be 2:4"
HI = jax.lax.Precision.HIGHEST


def abstract_params(constructor):
    """Parameter shapes of a model built abstractly (nothing is allocated or computed)."""
    return nnx.state(nnx.eval_shape(constructor), nnx.Param)


def num_elements(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def random_state_dict(shapes, seed=0):
    """Random torch-layout weights with batch-norm statistics far from the identity."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(3, np.int64)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith("running_mean"):
            state[key] = rng.uniform(-0.3, 0.3, shape).astype(np.float32)
        elif key.endswith("weight") and len(shape) == 1:  # batch-norm scale
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("bias"):
            state[key] = rng.uniform(-0.2, 0.2, shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return state


def batch_norm_keys(shapes, prefix, channels):
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{name}"] = (channels,)
    shapes[f"{prefix}.num_batches_tracked"] = ()


def conv_nchw(x, weight, stride=1, pad=0, groups=1):
    return jax.lax.conv_general_dilated(x, weight, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                        feature_group_count=groups, precision=HI)


def batch_norm_nchw(x, sd, prefix):
    shape = (1, -1, 1, 1)
    scale = sd[prefix + ".weight"] / jnp.sqrt(sd[prefix + ".running_var"] + 1e-5)
    return ((x - sd[prefix + ".running_mean"].reshape(shape)) * scale.reshape(shape)
            + sd[prefix + ".bias"].reshape(shape))


def max_pool_nchw(x):  # torch MaxPool2d(3, 2, padding=1)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2),
                                 ((0, 0), (0, 0), (1, 1), (1, 1)))


def assert_kcrs_2_4(flax_kernel):
    """TensorRT's rule: in the (K, C, R, S) weight, every 4 consecutive C hold <= 2 non-zeros."""
    kcrs = np.transpose(np.asarray(flax_kernel), (3, 2, 0, 1))
    k, c, r, s = kcrs.shape
    groups = kcrs.reshape(k, c // 4, 4, r, s)
    assert np.all(np.count_nonzero(groups, axis=2) <= 2)


# ---------------------------------------------------------------------------------------------
# Parameter counts (published numbers)
# ---------------------------------------------------------------------------------------------


def test_resnext101_32x8d_has_torchvision_parameter_count():
    params = abstract_params(lambda: models.ResNeXt101_32x8d(rngs=nnx.Rngs(0)))
    assert num_elements(params) == 88_791_336  # torchvision.models.resnext101_32x8d()


def test_xception_has_keras_trainable_parameter_count():
    model = nnx.eval_shape(lambda: xception.Xception(rngs=nnx.Rngs(0)))
    # keras.applications.Xception(): 22,855,952 trainable + 54,528 non-trainable (BN statistics).
    assert models.count_params(model) == 22_855_952
    assert num_elements(nnx.state(model, nnx.BatchStat)) == 54_528


def test_scaled_channels_keep_multiples_of_8():
    # Hand-worked: 728 / 4 = 182 -> 184; 32 / 4 = 8; 2048 / 4 = 512; 728 / 8 = 91 -> 88.
    assert [xception.scaled_channels(c, 0.25) for c in (32, 64, 128, 256, 728, 1024, 1536, 2048)] \
        == [8, 16, 32, 64, 184, 256, 384, 512]
    assert xception.scaled_channels(728, 0.125) == 88
    assert xception.scaled_channels(728, 1.0) == 728


# ---------------------------------------------------------------------------------------------
# Pruning rules on the full-size models
# ---------------------------------------------------------------------------------------------


def test_full_size_xception_rules_skip_depthwise_prune_pointwise_and_fc():
    plans = sparse_jax.plan_tree(abstract_params(lambda: xception.Xception(rngs=nnx.Rngs(0))))
    kernels = {p.path: p for p in plans if p.path.endswith("kernel")}
    depthwise = [p for path, p in kernels.items() if "/depthwise/" in path]
    pointwise = [p for path, p in kernels.items() if "/pointwise/" in path]
    # 2 + 2 + 2 (entry) + 8 x 3 (middle) + 2 (exit block) + 2 (exit) separable convolutions.
    assert len(depthwise) == len(pointwise) == 34
    for plan in depthwise:
        assert plan.shape[:3] == (3, 3, 1) and not plan.pruned
        assert plan.reason == DEPTHWISE_REASON
    for plan in pointwise:
        assert plan.shape[:2] == (1, 1) and plan.pruned and plan.axis == 2
    skips = [p for path, p in kernels.items() if path.endswith("/skip/kernel")]
    assert len(skips) == 4 and all(p.pruned and p.axis == 2 for p in skips)
    assert kernels["fc/kernel"].shape == (2048, 1000) and kernels["fc/kernel"].axis == 0
    assert kernels["entry_conv2/kernel"].axis == 2
    # The RGB stem (3 input channels) cannot hold groups of 4.
    assert not kernels["entry_conv1/kernel"].pruned and "not a multiple of 4" in \
        kernels["entry_conv1/kernel"].reason
    # Every convolution and linear kernel is listed, and nothing else is pruned.
    assert len(kernels) == 34 * 2 + 4 + 2 + 1
    assert all(p.path.endswith("kernel") for p in plans if p.pruned)


@pytest.mark.slow
def test_full_size_resnext101_rules_prune_grouped_convs_along_per_group_inputs():
    plans = sparse_jax.plan_tree(abstract_params(lambda: models.ResNeXt101_32x8d(rngs=nnx.Rngs(0))))
    kernels = {p.path: p for p in plans if p.path.endswith("kernel")}
    assert len(kernels) == 1 + 33 * 3 + 4 + 1  # stem, 33 bottlenecks, 4 projections, fc
    grouped = {path: p for path, p in kernels.items() if path.endswith("conv2/kernel")}
    assert len(grouped) == 33
    per_group_inputs = set()
    for path, plan in grouped.items():
        height, width, per_group_in, out = plan.shape
        assert (height, width) == (3, 3) and per_group_in * 32 == out, path  # groups = 32
        assert plan.pruned and plan.axis == 2, path
        per_group_inputs.add(per_group_in)
    assert per_group_inputs == {8, 16, 32, 64}  # 32x8d: 8 channels a group, doubling per stage
    assert kernels["fc/kernel"].axis == 0
    assert not kernels["conv1/kernel"].pruned  # 3 input channels
    assert sum(p.pruned for p in kernels.values()) == len(kernels) - 1


def test_grouped_conv_pruning_is_tensorrt_kcrs_2_4_and_keeps_groups_apart():
    # 8 groups of 8 input channels: prune, then check with NumPy in TensorRT's layout.
    conv = nnx.Conv(64, 32, kernel_size=(3, 3), feature_group_count=8, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(conv, nnx.Param))
    pruned, masks = sparse_jax.prune(params)
    assert_kcrs_2_4(pruned["kernel"])
    assert np.count_nonzero(pruned["kernel"]) == pruned["kernel"].size // 2
    # The 2 kept of each 4 are the largest magnitudes of that group of per-group inputs.
    kcrs = np.transpose(np.asarray(params["kernel"]), (3, 2, 0, 1)).reshape(32, 2, 4, 3, 3)
    kept = np.transpose(np.asarray(pruned["kernel"]), (3, 2, 0, 1)).reshape(32, 2, 4, 3, 3) != 0
    order = np.argsort(-np.abs(kcrs), axis=2, kind="stable")
    expected = np.zeros_like(kept)
    np.put_along_axis(expected, order[:, :, :2], True, axis=2)
    np.testing.assert_array_equal(kept, expected)


@pytest.mark.slow
def test_full_size_sparsity_reports_list_every_layer():
    """sparsity_report needs concrete arrays: zeros cost no initialiser compute."""
    for constructor, kernel_count in ((lambda: xception.Xception(rngs=nnx.Rngs(0)), 75),
                                      (lambda: models.ResNeXt101_32x8d(rngs=nnx.Rngs(0)), 105)):
        shapes = abstract_params(constructor)
        params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        report = sparse_jax.sparsity_report(params)
        rows = [r for r in report.rows if r.path.endswith("kernel")]
        assert len(rows) == kernel_count
        text = str(report)
        for row in rows:
            assert row.path in text
            if row.shape[-2] == 1:
                assert not row.pruned and row.reason == DEPTHWISE_REASON
            elif row.shape[-2] % 4 == 0:
                assert row.pruned and row.axis == len(row.shape) - 2


# ---------------------------------------------------------------------------------------------
# The CPU convolution paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels,out_channels,groups,stride,padding", [
    (16, 16, 16, 1, ((1, 1), (1, 1))),   # depthwise (Xception)
    (16, 16, 16, 2, ((0, 1), (1, 0))),   # depthwise, strided, asymmetric padding
    (8, 16, 8, 1, "SAME"),               # depthwise with channel multiplier 2
    (32, 64, 8, 2, ((1, 1), (1, 1))),    # grouped, 4 inputs per group (ResNeXt)
    (24, 24, 3, 1, "VALID"),             # grouped, 8 inputs per group
    (8, 12, 1, 1, ((1, 1), (1, 1))),     # ordinary convolution: passed through
])
def test_grouped_conv_equals_lax_values_and_gradients(in_channels, out_channels, groups, stride,
                                                      padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 9, 10, in_channels)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, in_channels // groups, out_channels)),
                         jnp.float32)
    target = jnp.asarray(rng.standard_normal((3, 9, 10, out_channels)), jnp.float32)

    def loss(conv, x, kernel):
        y = conv(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                 feature_group_count=groups, precision=HI)
        return jnp.sum(y * target[:, :y.shape[1], :y.shape[2]]), y

    (_, want), want_grads = jax.value_and_grad(
        lambda x, k: loss(jax.lax.conv_general_dilated, x, k), argnums=(0, 1), has_aux=True)(
        x, kernel)
    (_, got), got_grads = jax.jit(jax.value_and_grad(
        lambda x, k: loss(grouped_conv.conv_general_dilated, x, k), argnums=(0, 1),
        has_aux=True))(x, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Xception: timm-name import
# ---------------------------------------------------------------------------------------------

# 1/4 width: hand-scaled channels (see test_scaled_channels_keep_multiples_of_8).
QUARTER = {"stem": (8, 16), "entry": (32, 64, 184), "exit_block": 256, "exit": (384, 512)}


def timm_block_spec(in_ch, out_ch, reps, stride, start_with_relu=True, grow_first=True):
    """timm Block: channels of each separable conv, and the rep index of each module."""
    convs = []
    for index in range(reps):
        if grow_first:
            convs.append((in_ch if index == 0 else out_ch, out_ch))
        else:
            convs.append((in_ch, in_ch if index < reps - 1 else out_ch))
    offset = 1 if start_with_relu else 0  # rep = [ReLU?, SepConv, BN, ReLU, SepConv, BN, ...]
    return {"convs": convs, "offset": offset, "stride": stride, "skip": in_ch != out_ch or
            stride != 1, "in": in_ch, "out": out_ch, "start_with_relu": start_with_relu}


def timm_xception_blocks(ch, middle_blocks):
    stem2 = ch["stem"][1]
    e1, e2, e3 = ch["entry"]
    blocks = [timm_block_spec(stem2, e1, 2, 2, start_with_relu=False),
              timm_block_spec(e1, e2, 2, 2), timm_block_spec(e2, e3, 2, 2)]
    blocks += [timm_block_spec(e3, e3, 3, 1) for _ in range(middle_blocks)]
    blocks.append(timm_block_spec(e3, ch["exit_block"], 2, 2, grow_first=False))
    return blocks


def timm_xception_shapes(ch, middle_blocks, num_classes, in_channels=3):
    """timm legacy_xception's state-dict keys and torch shapes, from its module definitions."""
    s1, s2 = ch["stem"]
    shapes = {"conv1.weight": (s1, in_channels, 3, 3), "conv2.weight": (s2, s1, 3, 3)}
    batch_norm_keys(shapes, "bn1", s1)
    batch_norm_keys(shapes, "bn2", s2)
    for number, block in enumerate(timm_xception_blocks(ch, middle_blocks), start=1):
        prefix = f"block{number}"
        if block["skip"]:
            shapes[f"{prefix}.skip.weight"] = (block["out"], block["in"], 1, 1)
            batch_norm_keys(shapes, f"{prefix}.skipbn", block["out"])
        for index, (cin, cout) in enumerate(block["convs"]):
            rep = 3 * index + block["offset"]
            shapes[f"{prefix}.rep.{rep}.conv1.weight"] = (cin, 1, 3, 3)
            shapes[f"{prefix}.rep.{rep}.pointwise.weight"] = (cout, cin, 1, 1)
            batch_norm_keys(shapes, f"{prefix}.rep.{rep + 1}", cout)
    x1, x2 = ch["exit"]
    for name, cin, cout, bn in (("conv3", ch["exit_block"], x1, "bn3"), ("conv4", x1, x2, "bn4")):
        shapes[f"{name}.conv1.weight"] = (cin, 1, 3, 3)
        shapes[f"{name}.pointwise.weight"] = (cout, cin, 1, 1)
        batch_norm_keys(shapes, bn, cout)
    shapes["fc.weight"] = (num_classes, x2)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def timm_layout_xception_forward(sd, x, ch, middle_blocks):
    """timm's Xception.forward, written directly on the state dict in NCHW/OIHW."""
    relu = jax.nn.relu

    def separable(x, prefix):
        x = conv_nchw(x, sd[prefix + ".conv1.weight"], pad=1, groups=x.shape[1])
        return conv_nchw(x, sd[prefix + ".pointwise.weight"])

    x = relu(batch_norm_nchw(conv_nchw(x, sd["conv1.weight"], stride=2), sd, "bn1"))
    x = relu(batch_norm_nchw(conv_nchw(x, sd["conv2.weight"]), sd, "bn2"))
    for number, block in enumerate(timm_xception_blocks(ch, middle_blocks), start=1):
        prefix = f"block{number}"
        y = x
        for index in range(len(block["convs"])):
            if index > 0 or block["start_with_relu"]:
                y = relu(y)
            rep = 3 * index + block["offset"]
            y = batch_norm_nchw(separable(y, f"{prefix}.rep.{rep}"), sd, f"{prefix}.rep.{rep + 1}")
        if block["stride"] != 1:
            y = max_pool_nchw(y)
        shortcut = x
        if block["skip"]:
            shortcut = batch_norm_nchw(conv_nchw(x, sd[prefix + ".skip.weight"],
                                                 stride=block["stride"]), sd, prefix + ".skipbn")
        x = y + shortcut
    x = relu(batch_norm_nchw(separable(x, "conv3"), sd, "bn3"))
    x = relu(batch_norm_nchw(separable(x, "conv4"), sd, "bn4"))
    x = jnp.mean(x, axis=(2, 3))
    return jnp.matmul(x, sd["fc.weight"].T, precision=HI) + sd["fc.bias"]


def test_full_size_xception_timm_keys_and_shapes():
    full = {"stem": (32, 64), "entry": (128, 256, 728), "exit_block": 1024, "exit": (1536, 2048)}
    expected = {k: v for k, v in timm_xception_shapes(full, 8, 1000).items()
                if not k.endswith("num_batches_tracked")}
    model = nnx.eval_shape(lambda: xception.Xception(rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    ours = {}
    for path, value in nnx.to_flat_state(state):
        shape = tuple(value.shape)
        shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        ours[weights.timm_key(path)] = shape
    assert ours == expected
    assert ours["block12.rep.4.pointwise.weight"] == (1024, 728, 1, 1)  # grows in its last conv
    assert "block12.rep.5.running_var" in ours and "block1.rep.4.running_var" in ours


@pytest.mark.slow
def test_xception_timm_import_gives_timm_layout_logits(tmp_path):
    from safetensors.numpy import save_file

    state_dict = random_state_dict(timm_xception_shapes(QUARTER, 2, 10), seed=1)
    path = str(tmp_path / "xception.safetensors")
    save_file(state_dict, path)
    model = nnx.jit(lambda: xception.Xception(num_classes=10, width_multiplier=0.25,
                                              middle_blocks=2, rngs=models.init_rngs(0)))()
    description = weights.init_model_from(model, path)
    assert "timm" in description

    np.testing.assert_array_equal(model.blocks[1].separable[1].depthwise.kernel[...],
                                  state_dict["block2.rep.4.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.blocks[0].bn[1].var[...],
                                  state_dict["block1.rep.4.running_var"])
    np.testing.assert_array_equal(model.exit_separable2.pointwise.kernel[...],
                                  state_dict["conv4.pointwise.weight"].transpose(2, 3, 1, 0))
    exported = weights.export_timm_state_dict(model)
    assert set(exported) == set(state_dict)
    for key, value in state_dict.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(exported[key], value, err_msg=key)

    x = np.random.default_rng(2).standard_normal((2, 3, 37, 35)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        ours = nnx.jit(lambda m, x: m(x, train=False))(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    reference = jax.jit(lambda sd, x: timm_layout_xception_forward(sd, x, QUARTER, 2))(
        state_dict, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_xception_timm_import_rejects_wrong_shapes_and_keys():
    model = nnx.jit(lambda: xception.Xception(num_classes=10, width_multiplier=0.25,
                                              middle_blocks=1, rngs=models.init_rngs(0)))()
    state_dict = random_state_dict(timm_xception_shapes(QUARTER, 1, 10))
    bad = dict(state_dict, **{"block2.rep.1.pointwise.weight": np.zeros((64, 31, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"block2\.rep\.1\.pointwise\.weight.*"
                                         r"blocks/1/separable/0/pointwise/kernel"):
        weights.import_timm_state_dict(model, bad)
    missing = {k: v for k, v in state_dict.items() if k != "block1.skipbn.bias"}
    with pytest.raises(ValueError, match=r"missing keys.*block1\.skipbn\.bias"):
        weights.import_timm_state_dict(model, missing)


def assert_same_logits_as_torch(torch, reference, model, import_state_dict, image_size):
    """Gives ``reference`` random batch-norm statistics, imports its weights, compares logits."""
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    import_state_dict(model, {k: v.numpy() for k, v in reference.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((2, 3, image_size, image_size)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    with jax.default_matmul_precision("highest"):
        ours = model(jnp.asarray(x.transpose(0, 2, 3, 1)), train=False)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-3, atol=1e-3)


def test_xception_logits_equal_timm_for_same_random_weights():
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    name = "legacy_xception" if "legacy_xception" in timm.list_models() else "xception"
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, num_classes=10).eval()
    model = nnx.jit(lambda: xception.Xception(num_classes=10, rngs=nnx.Rngs(0)))()
    assert_same_logits_as_torch(torch, reference, model, weights.import_timm_state_dict, 96)


# ---------------------------------------------------------------------------------------------
# ResNeXt-101 32x8d: torchvision-name import
# ---------------------------------------------------------------------------------------------


def torchvision_resnext_shapes(stages, planes0, groups, width_per_group, num_classes):
    """torchvision ResNet(Bottleneck, groups, width_per_group) keys and shapes, by hand."""
    shapes = {"conv1.weight": (planes0, 3, 7, 7)}
    batch_norm_keys(shapes, "bn1", planes0)
    inplanes = planes0
    for stage, blocks in enumerate(stages):
        planes = planes0 * 2**stage
        width = int(planes * width_per_group / 64) * groups
        for block in range(blocks):
            prefix = f"layer{stage + 1}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (width, inplanes, 1, 1)
            batch_norm_keys(shapes, f"{prefix}.bn1", width)
            shapes[f"{prefix}.conv2.weight"] = (width, width // groups, 3, 3)
            batch_norm_keys(shapes, f"{prefix}.bn2", width)
            shapes[f"{prefix}.conv3.weight"] = (planes * 4, width, 1, 1)
            batch_norm_keys(shapes, f"{prefix}.bn3", planes * 4)
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                batch_norm_keys(shapes, f"{prefix}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes["fc.weight"] = (num_classes, inplanes)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def torchvision_layout_resnext_forward(sd, x, stages, groups):
    relu = jax.nn.relu
    x = relu(batch_norm_nchw(conv_nchw(x, sd["conv1.weight"], 2, 3), sd, "bn1"))
    x = max_pool_nchw(x)
    for stage, blocks in enumerate(stages):
        for block in range(blocks):
            p = f"layer{stage + 1}.{block}"
            stride = 2 if stage > 0 and block == 0 else 1
            y = relu(batch_norm_nchw(conv_nchw(x, sd[p + ".conv1.weight"]), sd, p + ".bn1"))
            y = relu(batch_norm_nchw(conv_nchw(y, sd[p + ".conv2.weight"], stride, 1, groups), sd,
                                     p + ".bn2"))
            y = batch_norm_nchw(conv_nchw(y, sd[p + ".conv3.weight"]), sd, p + ".bn3")
            if block == 0:
                x = batch_norm_nchw(conv_nchw(x, sd[p + ".downsample.0.weight"], stride), sd,
                                    p + ".downsample.1")
            x = relu(y + x)
    x = jnp.mean(x, axis=(2, 3))
    return jnp.matmul(x, sd["fc.weight"].T, precision=HI) + sd["fc.bias"]


def test_full_size_resnext101_torchvision_keys_and_shapes():
    expected = {k: v for k, v in torchvision_resnext_shapes((3, 4, 23, 3), 64, 32, 8, 1000).items()
                if not k.endswith("num_batches_tracked")}
    model = nnx.eval_shape(lambda: models.ResNeXt101_32x8d(rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    ours = {}
    for path, value in nnx.to_flat_state(state):
        shape = tuple(value.shape)
        shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        ours[weights._torch_key(path)] = shape
    assert ours == expected
    assert ours["layer3.22.conv2.weight"] == (1024, 32, 3, 3)  # 32 groups of 32 channels


@pytest.mark.slow
def test_resnext_torchvision_import_gives_torch_layout_logits(tmp_path):
    from safetensors.numpy import save_file

    stages = (1, 2, 1, 1)  # reduced depth; each stage's first block has a projection
    state_dict = random_state_dict(torchvision_resnext_shapes(stages, 16, 32, 8, 10), seed=5)
    path = str(tmp_path / "resnext.safetensors")
    save_file(state_dict, path)
    model = nnx.jit(lambda: models.ResNet(models.Bottleneck, stages, groups=32, width_per_group=8,
                                          num_filters=16, num_classes=10,
                                          rngs=models.init_rngs(0)))()
    weights.init_model_from(model, path)
    np.testing.assert_array_equal(model.layer2[1].conv2.kernel[...],
                                  state_dict["layer2.1.conv2.weight"].transpose(2, 3, 1, 0))
    x = np.random.default_rng(6).standard_normal((2, 3, 41, 38)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        ours = nnx.jit(lambda m, x: m(x, train=False))(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    reference = jax.jit(lambda sd, x: torchvision_layout_resnext_forward(sd, x, stages, 32))(
        state_dict, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=2e-4, atol=2e-4)


def test_resnext_logits_equal_torchvision_for_same_random_weights():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnext101_32x8d(num_classes=10).eval()
    model = nnx.jit(lambda: models.ResNeXt101_32x8d(num_classes=10, rngs=nnx.Rngs(0)))()
    assert_same_logits_as_torch(torch, reference, model, weights.import_torchvision_state_dict, 64)


# ---------------------------------------------------------------------------------------------
# Recipes: schedules, --help, end to end
# ---------------------------------------------------------------------------------------------


def epilog(script):
    return runpy.run_path(os.path.join(REPO_ROOT, "recipes", script))["EPILOG"]


def test_full_recipes_use_the_original_schedules():
    resnext = configs.imagenet_config("resnext101_32x8d")
    assert (resnext.num_epochs, resnext.lr_step_epochs, resnext.lr_step_factor) == (100, 30, 0.1)
    assert (resnext.learning_rate, resnext.momentum, resnext.weight_decay) == (0.1, 0.9, 1e-4)
    assert resnext.image_size == 224 and resnext.batch_size == 256

    xc = configs.imagenet_config("xception")
    assert (xc.learning_rate, xc.momentum, xc.weight_decay) == (0.045, 0.9, 1e-5)
    assert (xc.lr_step_epochs, xc.lr_step_factor) == (2.0, 0.94)
    assert (xc.image_size, xc.eval_resize_size, xc.preprocessing) == (299, 333, "inception")
    assert xc.num_filters == 32  # the published width


@pytest.mark.parametrize("script,numbers", [
    ("resnext101_32x8d.py", ("79.3", "100 epochs", "lr 0.1", "x0.1 every 30 epochs")),
    ("xception.py", ("79.2", "0.045", "x0.94 every 2 epochs", "1e-5", "299", "333")),
])
def test_help_gives_full_scale_commands_and_schedules(script, numbers):
    text = cli.build_parser(ClassificationTask, "d", epilog(script)).format_help()
    for flag in ("--data-dir", "--init-from", "--batch-size", "--epochs", "--resume", "--smoke"):
        assert flag in text
    assert f"python recipes/{script} --data-dir" in text and "8 GPUs" in text
    for number in numbers:
        assert number in text, number
    assert "retraining" in text


def write_jpeg_tree(data_dir, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", 6), ("val", 2)):
        for label in range(3):
            folder = data_dir / split / f"n0000{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 60, size=(40, 52, 3)).astype(np.uint8)
                pixels[..., label] += 150
                Image.fromarray(pixels).save(folder / f"img{index}.JPEG", quality=90)


def test_xception_imagefolder_uses_inception_preprocessing(tmp_path):
    from PIL import Image

    from recipes.vision import input_pipeline

    write_jpeg_tree(tmp_path / "imagenet")
    args = cli.build_parser(ClassificationTask, "d", "").parse_args(["--data-dir", str(tmp_path / "imagenet")])
    config = cli.config_from_args(ClassificationTask, args, "xception")
    assert (config.image_size, config.eval_resize_size) == (299, 333)
    datasets = input_pipeline.create_datasets(config)
    assert datasets.info.mean == (0.5,) * 3 and datasets.info.std == (0.5,) * 3
    # Eval: shorter side -> 333 (bicubic), centre crop 299, computed here with PIL directly.
    record = datasets.eval[0]
    image = Image.open(record["path"]).convert("RGB")  # 52 x 40
    resized = image.resize((int(333 * 52 / 40), 333), Image.BICUBIC)
    top, left = int(round((333 - 299) / 2)), int(round((resized.width - 299) / 2))
    want = np.asarray(resized.crop((left, top, left + 299, top + 299)))
    np.testing.assert_array_equal(datasets.eval_transform(record)["image"], want)
    # The ResNeXt recipe keeps torchvision's normalisation.
    resnext = cli.config_from_args(ClassificationTask, args, "resnext101_32x8d")
    assert input_pipeline.create_datasets(resnext).info.mean == input_pipeline.IMAGENET_MEAN


def axis_and_status(report_line: str) -> tuple[str, str]:
    """The axis and status columns of a sparsity_report.txt row (path shape axis stacked status ...)."""
    fields = report_line.split()
    return fields[2], fields[4]


@pytest.mark.slow
def test_xception_smoke_cli_on_imagefolder(tmp_path, capsys):
    write_jpeg_tree(tmp_path / "imagenet")
    results = cli.main(ClassificationTask, "xception", "test", "", argv=[
        "--smoke", "--data-dir", str(tmp_path / "imagenet"), "--workdir", str(tmp_path / "run"),
        "--batch-size", "8", "--no-progress"])
    out = capsys.readouterr().out
    assert "| xception |" in out
    assert results["exactly_nm_sparse"] and results["steps"]["retrain"] == 6
    lines = {line.split()[0]: line for line in
             open(tmp_path / "run" / "sparsity_report.txt").read().splitlines() if line}
    assert DEPTHWISE_REASON in lines["blocks/0/separable/0/depthwise/kernel"]
    assert axis_and_status(lines["blocks/0/separable/0/pointwise/kernel"]) == ("2", "pruned")
    assert axis_and_status(lines["fc/kernel"]) == ("0", "pruned")


@pytest.mark.slow
def test_resnext_smoke_cli_end_to_end(tmp_path, capsys):
    results = cli.main(ClassificationTask, "resnext101_32x8d", "test", "", argv=[
        "--smoke", "--workdir", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "| resnext101_32x8d |" in out and results["exactly_nm_sparse"]
    # 1/8 width: 1, 2, 4, 8 inputs per group in stages 1-4 (32 groups).
    lines = {line.split()[0]: line for line in
             open(os.path.join(tmp_path, "sparsity_report.txt")).read().splitlines() if line}
    assert DEPTHWISE_REASON in lines["layer1/0/conv2/kernel"]
    assert "not a multiple of 4" in lines["layer2/0/conv2/kernel"]
    for path, shape in (("layer3/0/conv2/kernel", "3x3x4x128"), ("layer4/0/conv2/kernel", "3x3x8x256")):
        assert lines[path].split()[1] == shape, lines[path]
        assert axis_and_status(lines[path]) == ("2", "pruned"), lines[path]


@pytest.mark.slow
def test_pruned_xception_exports_to_onnx_with_depthwise_convs_dense(tmp_path):
    pytest.importorskip("jax2onnx")
    ort = pytest.importorskip("onnxruntime")
    import sparse_jax.export
    from sparse_jax import inspect as sparse_inspect

    model = xception.Xception(num_classes=10, width_multiplier=0.25, middle_blocks=1,
                              rngs=nnx.Rngs(0))
    params, _ = sparse_jax.prune(nnx.state(model, nnx.Param))
    nnx.update(model, params)
    x = jax.random.normal(jax.random.key(1), (2, 71, 71, 3))
    proto = sparse_jax.export.to_onnx(model, [x], tmp_path / "xception.onnx")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: np.asarray(x)})[0]
    with jax.default_matmul_precision("highest"):
        want = model(x, train=False)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)
    checks = sparse_inspect.inspect_onnx(tmp_path / "xception.onnx")
    # KCRS weights: only the depthwise convs (C = 1) and the 3-channel stem are not 2:4 on C.
    assert {c.shape[1] for c in checks if not c.is_24} == {1, 3}
    depthwise = [c for c in checks if c.op == "Conv" and c.shape[1] == 1]
    assert len(depthwise) == sum(1 for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
                                 if path[-2:] == ("depthwise", "kernel"))
