"""The engine's other methods on the image task: --transposable, --permute, --recalibrate-bn
(the prune step) and --method sr-ste.

References: NumPy counts of the kept entries per group of 4 (both axes for transposable masks),
NumPy kept magnitudes, the unpermuted model's logits, NumPy mean / variance of a norm's inputs,
an uninterrupted run for the resumed one.
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

from recipes.engine import cli, metrics, workflow  # noqa: E402
from recipes.vision import configs  # noqa: E402
from recipes.vision.classification_task import ClassificationTask  # noqa: E402


pytestmark = pytest.mark.usefixtures("shared_compilation_cache")


def smoke_config(**changes):
    return configs.smoke_config(configs.builtin_config()).replace(devices=1, **changes)


def restore_item(workdir, phase, step, item):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", phase))
    restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))
    manager.close()
    return jax.device_get(restored[item])


def prunable_kernels(params):
    """(name, kernel) of the kernels with an input axis of a multiple of 4 (all but the stem)."""
    out = []
    for path, kernel in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if "kernel" in name and kernel.shape[-2] % 4 == 0:
            out.append((name, np.asarray(kernel)))
    return out


def nonzeros_per_group(kernel, axis):
    moved = np.moveaxis(kernel, axis, -1)
    return np.count_nonzero(moved.reshape(-1, 4), axis=-1)


def numpy_kept_fraction(params):
    """Kept |w| of plain 2:4 along the input axis over all |w|, of the prunable kernels."""
    kept = total = 0.0
    for _, kernel in prunable_kernels(params):
        groups = np.abs(np.moveaxis(kernel.astype(np.float64), -2, -1)).reshape(-1, 4)
        kept += np.sort(groups, axis=-1)[:, 2:].sum()
        total += groups.sum()
    return kept / total


# ---------------------------------------------------------------------------------------------
# Fast: options, errors, helpers
# ---------------------------------------------------------------------------------------------


def test_command_line_options_reach_the_config():
    parser = cli.build_parser(ClassificationTask, "", "")
    args = parser.parse_args(["--smoke", "--method", "sr-ste", "--transposable"])
    config = cli.config_from_args(ClassificationTask, args, "resnet50")
    assert (config.method, config.transposable, config.permute, config.recalibrate_bn) == (
        "sr-ste", True, False, False)
    args = parser.parse_args(["--permute", "--recalibrate-bn"])
    config = cli.config_from_args(ClassificationTask, args, "resnet50")
    assert (config.method, config.permute, config.recalibrate_bn) == ("prune-retrain", True, True)
    assert json.loads(config.to_json())["method"] == "prune-retrain"


class NoHooksTask(workflow.Task):
    """A task with none of the optional hooks."""


@pytest.mark.parametrize("changes, message", [
    ({"permute": True}, "--permute: NoHooksTask defines no forward"),
    ({"recalibrate_bn": True}, "--recalibrate-bn: NoHooksTask's model has no batch statistics"),
    ({"method": "sr-ste"}, "--method sr-ste: NoHooksTask's train step"),
    ({"method": "magnitude"}, "--method 'magnitude': expected one of"),
])
def test_a_task_without_the_hook_fails_at_start_naming_the_option(tmp_path, changes, message):
    config = workflow.WorkflowConfig(**changes)
    with pytest.raises(ValueError, match=message):
        workflow.train_and_evaluate(NoHooksTask, config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # nothing written


@pytest.mark.parametrize("changes, message", [
    ({"init_from": "somewhere"}, "--init-from"),
    ({"permute": True}, "--permute is an option of the prune step"),
    ({"recalibrate_bn": True}, "--recalibrate-bn is an option of the prune step"),
])
def test_srste_rejects_the_prune_step_options(tmp_path, changes, message):
    config = smoke_config(method="sr-ste", **changes)
    with pytest.raises(ValueError, match=message):
        workflow.train_and_evaluate(ClassificationTask, config, str(tmp_path / "run"))


def test_kept_magnitude_fraction_against_a_hand_worked_case():
    params = {"k": np.array([[1.0, -2.0], [3.0, 0.0], [-4.0, 1.0], [0.5, 1.0]]), "b": np.ones(2)}
    masks = {"k": np.abs(params["k"]) >= np.array([3.0, 1.0]), "b": None}  # keeps 3, -4 | -2, 1, 1
    assert workflow.kept_magnitude_fraction(params, masks) == pytest.approx((7 + 4) / (8.5 + 4))


def test_merged_variables_use_the_params_paths_and_split_back():
    variables = {"params": {"bn": {"scale": 1, "bias": 2}, "fc": {"kernel": 3}},
                 "batch_stats": {"bn": {"mean": 4, "var": 5}}}
    merged, split = workflow._merge_variables(variables)
    assert merged == {"bn": {"scale": 1, "bias": 2, "mean": 4, "var": 5}, "fc": {"kernel": 3}}
    assert split(merged) == variables
    with pytest.raises(ValueError, match="batch_stats/bn/scale"):
        workflow._merge_variables({"params": {"bn": {"scale": 1}},
                                   "batch_stats": {"bn": {"scale": 2}}})


# ---------------------------------------------------------------------------------------------
# The task's hooks on a smoke-size model (no training)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_and_state(tmp_path_factory):
    """The smoke ResNet-50 task set up (float32), its state with random norms and statistics
    (so that a wrong permutation of any of them shows), and a few training batches."""
    config = smoke_config(compute_dtype="float32", recalibrate_examples=40)
    workdir = str(tmp_path_factory.mktemp("hooks"))
    wf = workflow.Workflow(config, workdir, workflow.create_mesh(1),
                           metrics.MetricsLog(os.path.join(workdir, "metrics.jsonl")),
                           ClassificationTask.phases)
    task = wf.task = ClassificationTask(config, workdir, wf)
    state = task.setup()
    rng = np.random.default_rng(0)

    def randomize(path, x):
        name = jax.tree_util.keystr(path)
        if x.ndim != 1:
            return x
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.5, x.shape) + ("scale" in name), x.dtype)

    state = jax.tree_util.tree_map_with_path(randomize, state)
    batches = workflow.recalibration_batches(task, config)
    return task, state, batches


@pytest.mark.slow
def test_permutation_keeps_the_dense_function_and_never_lowers_kept_magnitude(task_and_state):
    task, state, batches = task_and_state
    permuted, record = workflow.permute_channels(task, task.config, state, batches[0])
    assert record["permuted"] > 0  # some group did move
    moved = sum(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state),
                                                        jax.tree.leaves(permuted)))
    assert moved > 0
    for batch in batches[:2]:
        want = np.asarray(task.forward(state, batch))
        got = np.asarray(task.forward(permuted, batch))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert numpy_kept_fraction(permuted["params"]) >= numpy_kept_fraction(state["params"])
    assert record["consumers_kept_after"] >= record["consumers_kept_before"]


@pytest.mark.slow
def test_recalibration_gives_the_mean_and_variance_of_the_pruned_networks_activations(
        task_and_state):
    task, state, batches = task_and_state
    pruned, masks = workflow.prune(task.config, state["params"])
    pruned_state = {**state, "params": pruned}
    new = task.recalibrate_batch_stats(pruned_state, batches)
    assert sum(len(b["image"]) for b in batches) >= 40

    assert task.config.stem == "small"  # no max-pool after the stem
    # The first norm of the first bottleneck sees conv1 of the (pruned) stem's normalised,
    # ReLU'd output; computed here layer by layer with the model's own modules, then NumPy
    # statistics over every example and position.
    model = nnx.merge(task.graphdef, pruned, state["batch_stats"])
    inputs = []
    for batch in batches:
        x = task._images(batch)
        x = nnx.relu(model.bn1(model.conv1(x), use_running_average=False))
        inputs.append(np.asarray(model.layer1[0].conv1(x), np.float64))
    inputs = np.concatenate(inputs).reshape(-1, inputs[0].shape[-1])
    got = new["batch_stats"]["layer1"][0]["bn1"]
    np.testing.assert_allclose(got["mean"], inputs.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["var"], inputs.var(0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got["mean"], state["batch_stats"]["layer1"][0]["bn1"]["mean"])
    jax.tree.map(np.testing.assert_array_equal, new["params"], pruned)  # params untouched


# ---------------------------------------------------------------------------------------------
# Whole runs (smoke size)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prune_options_run_is_exactly_2_4_transposable_and_records_the_ablation(tmp_path):
    config = smoke_config(transposable=True, permute=True, recalibrate_bn=True, control=False,
                          recalibrate_examples=32)
    workdir = str(tmp_path)
    results = workflow.train_and_evaluate(ClassificationTask, config, workdir)
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert saved["method"] == "prune-retrain"
    assert (saved["transposable"], saved["permute"], saved["recalibrate_bn"]) == (True,) * 3
    variants = saved["one_shot_variants"]
    assert set(variants) == {"magnitude", "permutation", "bn_recalibration", "both"}
    assert saved["one_shot"] == variants["both"] == results["one_shot"]
    fractions = saved["kept_magnitude_fraction"]
    assert set(fractions) == {"transposable", "transposable_permuted", "nm", "nm_permuted"}
    assert fractions["nm_permuted"] >= fractions["nm"]  # the search never lowers it
    assert saved["recalibrate_examples"] == 32
    assert saved["exactly_nm_sparse"] is True

    steps = config.num_train_steps
    params = restore_item(workdir, "retrain", steps, "params")
    checked = 0
    for name, kernel in prunable_kernels(params):
        assert np.all(nonzeros_per_group(kernel, -2) <= 2), name
        if kernel.shape[-1] % 4 == 0:  # transposable: 2:4 along the outputs of 4x4 blocks too
            blocks = np.moveaxis(kernel, (-2, -1), (0, 1)).reshape(
                kernel.shape[-2] // 4, 4, kernel.shape[-1] // 4, 4, -1)
            assert np.all(np.count_nonzero(blocks, axis=1) <= 2), name
            assert np.all(np.count_nonzero(blocks, axis=3) <= 2), name
            checked += 1
    assert checked > 0
    masks = restore_item(workdir, "retrain", steps, "masks")
    for path, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
        assert np.all(nonzeros_per_group(np.asarray(mask), -2) == 2), jax.tree_util.keystr(path)
    # The mask is the transposable mask of the permuted dense weights: it keeps at most as
    # much magnitude as the plain one of the same weights.
    assert fractions["transposable_permuted"] <= fractions["nm_permuted"] + 1e-12
    assert fractions["transposable"] <= fractions["nm"] + 1e-12


@pytest.fixture(scope="module")
def srste_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("srste"))
    config = smoke_config(method="sr-ste", control=True, num_train_steps=4)
    results = workflow.train_and_evaluate(ClassificationTask, config, workdir)
    return config, workdir, results


@pytest.mark.slow
def test_srste_run_ends_exactly_2_4_with_its_outputs(srste_run):
    config, workdir, results = srste_run
    total = 2 * config.num_train_steps
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert saved["method"] == "sr-ste"
    assert saved["steps"] == {"sr-ste": total, "control": total}
    assert saved["dense"] is None and saved["one_shot"] is None
    assert 0.0 <= saved["sparse"] <= 1.0 and 0.0 <= saved["control"] <= 1.0
    assert saved["exactly_nm_sparse"] is True
    assert 0.0 <= saved["mask_flip_fraction_last_step"] <= 1.0

    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if r["phase"] == "sr-ste" and r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(2, total + 1, 2))
    assert all(0.0 <= r["mask_flip_fraction"] <= 1.0 for r in train)
    assert any(r["mask_flip_fraction"] > 0 for r in train)  # the mask moves early on
    final_eval = [r for r in records if r["phase"] == "sr-ste" and r["split"] == "eval"][-1]
    assert final_eval["step"] == total and final_eval["metric"] == saved["sparse"]
    control = [r for r in records if r["phase"] == "control" and r["split"] == "train"]
    assert control[-1]["step"] == total

    params = restore_item(workdir, "sparse", total, "params")
    masks = restore_item(workdir, "sparse", total, "masks")
    for name, kernel in prunable_kernels(params):
        assert np.all(nonzeros_per_group(kernel, -2) <= 2), name
    for path, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
        assert np.all(nonzeros_per_group(np.asarray(mask), -2) == 2), jax.tree_util.keystr(path)
    # The sparse model is the trained dense weights times their final magnitude mask.
    dense = restore_item(workdir, "sr-ste", total, "params")
    for (name, sparse_kernel), (_, dense_kernel) in zip(prunable_kernels(params),
                                                        prunable_kernels(dense)):
        groups = np.abs(np.moveaxis(dense_kernel, -2, -1)).reshape(-1, 4)
        kept = np.moveaxis(sparse_kernel != 0, -2, -1).reshape(-1, 4)
        top2 = np.sort(groups, axis=-1)[:, 2:].sum(-1)
        np.testing.assert_allclose((groups * kept).sum(-1), top2, rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_srste_resume_equals_the_uninterrupted_run(srste_run, tmp_path):
    config, reference_dir, reference = srste_run
    workdir = str(tmp_path)
    with pytest.raises(workflow.Interrupted):
        workflow.train_and_evaluate(ClassificationTask, config.replace(interrupt_after_steps=5), workdir)
    resumed = workflow.train_and_evaluate(ClassificationTask, config, workdir, resume=True)
    total = 2 * config.num_train_steps
    for phase in ("sr-ste", "sparse", "control"):
        want = restore_item(reference_dir, phase, total, "params")
        got = restore_item(workdir, phase, total, "params")
        jax.tree.map(np.testing.assert_array_equal, got, want)
    for key in ("sparse", "control", "mask_flip_fraction_last_step"):
        assert resumed[key] == reference[key]
    read = lambda d: [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]  # noqa: E731
    assert read(workdir) == read(reference_dir)
