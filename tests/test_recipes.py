"""Tests of the recipe engine (recipes/engine), the image-classification task and `python recipes/resnet50.py`.

References are independent of the code under test: torchvision's architecture written out in the
test in torch's NCHW/OIHW layouts, NumPy checks of the 2:4 pattern, an uninterrupted run for the
resumed one, a 1-device run for the 8-device one.
"""

import importlib.util
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
from recipes.engine import cli  # noqa: E402
from recipes.engine import workflow  # noqa: E402
from recipes.vision import classification_task, configs, input_pipeline, models, weights  # noqa: E402
from recipes.vision.classification_task import ClassificationTask  # noqa: E402

STAGES_50 = (3, 4, 6, 3)


pytestmark = pytest.mark.usefixtures("shared_compilation_cache")


@pytest.fixture(scope="module")
def small_resnet50():
    """ResNet-50's topology at 1/8 width with 10 classes, float32."""
    return models.ResNet50(num_filters=8, num_classes=10, rngs=models.init_rngs(0))


# ---------------------------------------------------------------------------------------------
# Model and weight import
# ---------------------------------------------------------------------------------------------


def test_resnet50_has_torchvision_parameter_count():
    abstract = nnx.eval_shape(lambda: models.ResNet50(rngs=nnx.Rngs(0)))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert num_params == 25_557_032  # torchvision.models.resnet50()


def torchvision_resnet_shapes(stages=STAGES_50, width=64, num_classes=1000, in_channels=3):
    """torchvision's ResNet (Bottleneck, v1.5) state-dict keys and shapes, written out by hand."""
    shapes = {"conv1.weight": (width, in_channels, 7, 7)}

    def bn(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", width)
    inplanes = width
    for stage, blocks in enumerate(stages):
        planes = width * 2**stage
        for block in range(blocks):
            prefix = f"layer{stage + 1}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{prefix}.bn1", planes)
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{prefix}.bn2", planes)
            shapes[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{prefix}.bn3", planes * 4)
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{prefix}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes["fc.weight"] = (num_classes, inplanes)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def random_state_dict(shapes, seed=0):
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(7, np.int64)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith("weight") and len(shape) == 1:  # batch-norm scale
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 16
            state[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return state


@pytest.mark.slow
def test_torchvision_import_full_resnet50_keys_shapes_layouts(tmp_path):
    from safetensors.numpy import save_file

    state_dict = random_state_dict(torchvision_resnet_shapes())
    path = str(tmp_path / "resnet50.safetensors")
    save_file(state_dict, path)
    model = models.ResNet50(rngs=models.init_rngs(1))
    description = weights.init_model_from(model, path)
    assert "torchvision" in description

    # Every torch tensor lands at its NNX path in Flax layout.
    np.testing.assert_array_equal(model.conv1.kernel[...],
                                  state_dict["conv1.weight"].transpose(2, 3, 1, 0))
    block = model.layer3[5]
    np.testing.assert_array_equal(block.conv2.kernel[...],
                                  state_dict["layer3.5.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(block.bn3.scale[...], state_dict["layer3.5.bn3.weight"])
    np.testing.assert_array_equal(block.bn3.mean[...], state_dict["layer3.5.bn3.running_mean"])
    np.testing.assert_array_equal(block.bn3.var[...], state_dict["layer3.5.bn3.running_var"])
    down = model.layer2[0].downsample
    np.testing.assert_array_equal(down.conv.kernel[...],
                                  state_dict["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(down.bn.bias[...], state_dict["layer2.0.downsample.1.bias"])
    np.testing.assert_array_equal(model.fc.kernel[...], state_dict["fc.weight"].T)
    np.testing.assert_array_equal(model.fc.bias[...], state_dict["fc.bias"])

    # Exporting gives back the same dict (so every key was consumed exactly once).
    exported = weights.export_torchvision_state_dict(model)
    assert set(exported) == set(state_dict)
    for key, value in state_dict.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(exported[key], value, err_msg=key)

    # The stem convolution computes torch's conv2d(x, W, stride 2, padding 3) in NCHW/OIHW.
    x_nchw = np.random.default_rng(2).standard_normal((2, 3, 33, 40)).astype(np.float32)
    reference = jax.lax.conv_general_dilated(
        x_nchw, state_dict["conv1.weight"], (2, 2), ((3, 3), (3, 3)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"), precision="highest")
    ours = model.conv1(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), reference, rtol=2e-4,
                               atol=2e-4)


def test_torchvision_import_rejects_wrong_shapes_and_keys(small_resnet50):
    model = small_resnet50
    state_dict = random_state_dict(torchvision_resnet_shapes(width=8, num_classes=10))
    bad = dict(state_dict, **{"layer1.0.conv2.weight": np.zeros((8, 8, 1, 3), np.float32)})
    with pytest.raises(ValueError, match=r"layer1\.0\.conv2\.weight.*layer1/0/conv2/kernel"):
        weights.import_torchvision_state_dict(model, bad)
    missing = {k: v for k, v in state_dict.items() if k != "fc.bias"}
    with pytest.raises(ValueError, match="missing keys.*fc.bias"):
        weights.import_torchvision_state_dict(model, missing)


def torch_layout_forward(sd, x_nchw, stages):
    """torchvision ResNet-50 inference written directly in torch's NCHW/OIHW layouts."""
    hi = jax.lax.Precision.HIGHEST

    def conv(x, w, stride, pad):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                            precision=hi)

    def bn(x, prefix):
        shape = (1, -1, 1, 1)
        scale = sd[prefix + ".weight"] / jnp.sqrt(sd[prefix + ".running_var"] + 1e-5)
        return ((x - sd[prefix + ".running_mean"].reshape(shape)) * scale.reshape(shape)
                + sd[prefix + ".bias"].reshape(shape))

    relu = jax.nn.relu
    x = relu(bn(conv(x_nchw, sd["conv1.weight"], 2, 3), "bn1"))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2),
                              ((0, 0), (0, 0), (1, 1), (1, 1)))
    for stage, blocks in enumerate(stages):
        for block in range(blocks):
            p = f"layer{stage + 1}.{block}"
            stride = 2 if stage > 0 and block == 0 else 1
            y = relu(bn(conv(x, sd[p + ".conv1.weight"], 1, 0), p + ".bn1"))
            y = relu(bn(conv(y, sd[p + ".conv2.weight"], stride, 1), p + ".bn2"))
            y = bn(conv(y, sd[p + ".conv3.weight"], 1, 0), p + ".bn3")
            if block == 0:
                x = bn(conv(x, sd[p + ".downsample.0.weight"], stride, 0), p + ".downsample.1")
            x = relu(y + x)
    x = jnp.mean(x, axis=(2, 3))
    return jnp.matmul(x, sd["fc.weight"].T, precision=hi) + sd["fc.bias"].reshape(1, -1)


@pytest.mark.slow
def test_imported_weights_give_torch_layout_logits(small_resnet50):
    """Same logits as torchvision's forward for odd-sized inputs (exercises explicit padding)."""
    state_dict = random_state_dict(torchvision_resnet_shapes(width=8, num_classes=10), seed=3)
    model = small_resnet50
    weights.import_torchvision_state_dict(model, state_dict)
    x_nchw = np.random.default_rng(4).standard_normal((2, 3, 45, 37)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        ours = nnx.jit(lambda m, x: m(x, train=False))(model, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
        reference = jax.jit(torch_layout_forward, static_argnums=2)(
            state_dict, jnp.asarray(x_nchw), STAGES_50)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-4, atol=1e-4)


def test_logits_equal_torchvision_for_same_random_weights():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference_model = torchvision.models.resnet50(num_classes=10).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in reference_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    state_dict = {k: v.numpy() for k, v in reference_model.state_dict().items()}
    model = models.ResNet50(num_classes=10, rngs=models.init_rngs(0))
    weights.import_torchvision_state_dict(model, state_dict)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = reference_model(torch.from_numpy(x)).numpy()
    with jax.default_matmul_precision("highest"):
        ours = model(jnp.asarray(x.transpose(0, 2, 3, 1)), train=False)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Schedule, input pipeline, CLI
# ---------------------------------------------------------------------------------------------


def test_imagenet_schedule_is_torchvision_reference():
    config = configs.imagenet_config()
    steps = workflow.phase_steps(config, 1_281_167)
    steps_per_epoch = 1_281_167 // 256
    assert abs(steps - 90 * steps_per_epoch) <= 90
    schedule = classification_task.learning_rate_schedule(config, steps)
    for epoch, lr in [(0, 0.1), (29.9, 0.1), (30.1, 0.01), (59.9, 0.01), (60.1, 0.001),
                      (89.9, 0.001)]:
        assert float(schedule(int(epoch * steps_per_epoch))) == pytest.approx(lr, rel=1e-6), epoch
    assert config.learning_rate == 0.1 and config.momentum == 0.9 and config.weight_decay == 1e-4
    assert config.replace(batch_size=1024).learning_rate == pytest.approx(0.4)


def test_random_resized_crop_box_stays_inside_and_is_deterministic():
    for seed in range(50):
        rng = np.random.default_rng(seed)
        height, width = int(rng.integers(5, 400)), int(rng.integers(5, 400))
        top, left, crop_h, crop_w = input_pipeline.random_resized_crop_box(
            height, width, np.random.default_rng(seed))
        assert 0 <= top and top + crop_h <= height and 0 < crop_h
        assert 0 <= left and left + crop_w <= width and 0 < crop_w
        assert (top, left, crop_h, crop_w) == input_pipeline.random_resized_crop_box(
            height, width, np.random.default_rng(seed))


def test_help_documents_full_scale_use():
    import runpy

    script = runpy.run_path(os.path.join(REPO_ROOT, "recipes", "resnet50.py"))  # not as __main__
    text = cli.build_parser(ClassificationTask, script["__doc__"], script["EPILOG"]).format_help()
    for flag in ("--data-dir", "--init-from", "--batch-size", "--epochs", "--devices",
                 "--resume", "--smoke", "--control"):
        assert flag in text
    assert "8 GPUs" in text and "76.1" in text


def test_train_iterator_resumes_exactly():
    datasets = input_pipeline.create_datasets(configs.builtin_config())
    iterator = input_pipeline.train_iterator(datasets, batch_size=32, seed=5)
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    resumed = input_pipeline.train_iterator(datasets, batch_size=32, seed=5)
    resumed.set_state(json.loads(json.dumps(state)))  # as stored in the checkpoint
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


# ---------------------------------------------------------------------------------------------
# Data parallelism
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_data_parallel_step_on_8_devices_matches_1_device():
    assert jax.device_count() >= 8, "tests/conftest.py should provide 8 CPU devices"
    config = configs.smoke_config(configs.builtin_config()).replace(compute_dtype="float32")
    datasets = input_pipeline.create_datasets(config)
    model = classification_task.create_model(config, datasets.info)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
    pruned, masks = sparse_jax.prune(params)
    tx = sparse_jax.masked(classification_task.create_optimizer(config, 10), masks)
    batch = next(input_pipeline.train_iterator(datasets, batch_size=16, seed=0))
    results = []
    for num_devices in (1, 8):
        mesh = workflow.create_mesh(num_devices)
        step = classification_task.make_train_step(graphdef, tx, mesh, datasets.info, jnp.float32)
        state = {"params": pruned, "batch_stats": batch_stats, "opt_state": tx.init(pruned)}
        with jax.default_matmul_precision("highest"):
            state, step_metrics = step(state, workflow.shard_batch(batch, mesh))
        assert len(jax.tree.leaves(state["params"])[0].sharding.device_set) == num_devices
        results.append(jax.device_get((state["params"], state["batch_stats"],
                                       step_metrics["loss"])))
    (params_1, stats_1, loss_1), (params_8, stats_8, loss_8) = results
    assert loss_1 == pytest.approx(loss_8, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), stats_1,
                 stats_8)
    # Same update up to float summation order (batch-norm statistics and the gradient all-reduce).
    start = jax.device_get(pruned)
    for before, after_1, after_8 in zip(*map(jax.tree.leaves, (start, params_1, params_8))):
        update_1, update_8 = after_1 - before, after_8 - before
        assert np.linalg.norm(update_8 - update_1) <= 1e-3 * np.linalg.norm(update_1) + 1e-8
    # The update really moved the weights, and kept them 2:4.
    assert not np.allclose(jax.device_get(pruned["fc"]["kernel"]), params_8["fc"]["kernel"])
    kernel = params_8["layer2"][0]["conv2"]["kernel"]  # (3, 3, in, out), groups along `in`
    groups = kernel.reshape(3, 3, -1, 4, kernel.shape[-1])
    assert np.all(np.count_nonzero(groups, axis=3) <= 2)


# ---------------------------------------------------------------------------------------------
# The whole workflow (smoke config)
# ---------------------------------------------------------------------------------------------


def restore_item(workdir, phase, step, item):
    """One saved item of a phase checkpoint, restored without a target (as saved)."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", phase))
    restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))
    manager.close()
    return jax.device_get(restored[item])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    # One device: the 8-device data parallelism has its own test, and is slow on 2 cores.
    config = configs.smoke_config(configs.builtin_config()).replace(devices=1)
    results = workflow.train_and_evaluate(ClassificationTask, config, workdir)
    return config, workdir, results


def test_smoke_run_writes_results_metrics_plot_and_sparse_checkpoint(smoke_run):
    config, workdir, results = smoke_run
    steps = config.num_train_steps
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    for key in ("model", "dataset", "metric", "dense", "one_shot", "sparse", "control", "steps",
                "seconds", "devices", "jax"):
        assert key in saved
    assert saved["steps"] == {"dense": steps, "retrain": steps, "control": steps}
    assert saved["exactly_nm_sparse"] is True
    for key in ("dense", "one_shot", "sparse", "control"):
        assert 0.0 <= saved[key] <= 1.0

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for phase in ("dense", "retrain", "control"):
        train_steps = [r["step"] for r in records if r["phase"] == phase and r["split"] == "train"]
        assert train_steps == list(range(config.log_every_steps, steps + 1, config.log_every_steps))
        final_eval = [r for r in records if r["phase"] == phase and r["split"] == "eval"][-1]
        assert final_eval["step"] == steps
        assert final_eval["metric"] == saved["sparse" if phase == "retrain" else phase]
    assert all(np.isfinite(r["loss"]) for r in records)

    with open(os.path.join(workdir, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "pruned" in open(os.path.join(workdir, "sparsity_report.txt")).read()

    # The saved sparse model is 2:4 along each kernel's input axis, checked with NumPy.
    params = restore_item(workdir, "retrain", steps, "params")
    dense = restore_item(workdir, "dense", steps, "params")
    checked = 0
    for path, kernel in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if "kernel" not in name or kernel.shape[-2] % 4:
            continue  # the 1-channel stem convolution is not prunable
        groups = np.moveaxis(kernel, -2, 0).reshape(kernel.shape[-2] // 4, 4, -1)
        assert np.all(np.count_nonzero(groups, axis=1) <= 2), name
        checked += 1
    assert checked == 17  # 16 convolutions of the (1, 1, 1, 1) bottlenecks + fc
    assert np.count_nonzero(dense["fc"]["kernel"]) == dense["fc"]["kernel"].size


@pytest.mark.slow
def test_resume_after_interrupt_gives_same_final_params(smoke_run, tmp_path):
    config, reference_dir, reference = smoke_run
    workdir = str(tmp_path)
    # 6 dense steps, then stop at the 3rd retraining step: the last checkpoint is retrain step 2.
    with pytest.raises(workflow.Interrupted):
        workflow.train_and_evaluate(ClassificationTask, config.replace(interrupt_after_steps=9),
                                    workdir)
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    with pytest.raises(FileExistsError, match="--resume"):
        workflow.train_and_evaluate(ClassificationTask, config, workdir)
    resumed = workflow.train_and_evaluate(ClassificationTask, config, workdir, resume=True)

    steps = config.num_train_steps
    for phase in ("retrain", "control"):
        want = restore_item(reference_dir, phase, steps, "params")
        got = restore_item(workdir, phase, steps, "params")
        jax.tree.map(np.testing.assert_array_equal, got, want)
    for key in ("dense", "one_shot", "sparse", "control"):
        assert resumed[key] == reference[key]
    read = lambda d: [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]  # noqa: E731
    assert read(workdir) == read(reference_dir)


def write_jpeg_tree(root, classes=3, train_per_class=6, val_per_class=3, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = os.path.join(root, split, f"n0000{label}")
            os.makedirs(folder)
            for index in range(count):
                height, width = rng.integers(30, 70, size=2)
                pixels = rng.integers(0, 60, size=(height, width, 3)).astype(np.uint8)
                pixels[..., label] += 150  # class = dominant colour: learnable
                Image.fromarray(pixels).save(os.path.join(folder, f"img{index}.JPEG"), quality=90)


@pytest.mark.slow
def test_smoke_cli_on_an_imagefolder_of_jpegs(tmp_path, capsys):
    data_dir = str(tmp_path / "imagenet")
    write_jpeg_tree(data_dir)
    workdir = str(tmp_path / "run")
    results = cli.main(ClassificationTask, "resnet50", "test", "", argv=[
        "--smoke", "--data-dir", data_dir, "--workdir", workdir, "--batch-size", "8", "--no-control",
        "--devices", "1", "--export-onnx", str(tmp_path / "model.onnx")])
    out = capsys.readouterr().out
    assert "| resnet50 |" in out and "one-shot" in out
    assert results["dataset"].startswith("imagefolder:") and results["eval_examples"] == 9
    assert results["steps"]["retrain"] == 6 and results["exactly_nm_sparse"]
    assert os.path.exists(os.path.join(workdir, "curves.png"))
    with open(os.path.join(workdir, "config.json")) as f:
        saved_config = json.load(f)
    assert saved_config["image_size"] == 32 and saved_config["dataset"] == "imagenet"
    # --export-onnx: every pruned conv/linear is 2:4 where TensorRT looks; the stem (3 input
    # channels) is the one dense weight.
    if importlib.util.find_spec("jax2onnx") is not None:
        from sparse_jax import inspect as sparse_inspect

        checks = sparse_inspect.inspect_onnx(tmp_path / "model.onnx")
        assert [c.shape[1] for c in checks if not c.is_24] == [3]
        assert {c.op for c in checks if c.is_24} == {"Conv", "Gemm"}


@pytest.mark.slow
def test_init_from_orbax_checkpoint_skips_dense_training(smoke_run, tmp_path):
    config, reference_dir, reference = smoke_run
    results = workflow.train_and_evaluate(
        ClassificationTask, config.replace(init_from=reference_dir, control=False), str(tmp_path))
    assert results["steps"]["dense"] == 0
    assert results["dense"] == reference["dense"]
    assert results["one_shot"] == reference["one_shot"]
