"""prune, apply_masks, check_masks and sparsity_report on whole trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparse_jax
from test_patterns import reference_mask


def random_tree(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return {
        "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 8, 16)), "bias": jnp.ones(16)},
        "dense": {"kernel": jax.random.normal(keys[1], (16, 10)), "bias": jnp.ones(10)},
        "stem": {"kernel": jax.random.normal(keys[2], (3, 3, 3, 8))},
        "norm": {"scale": jax.random.normal(keys[3], (16,))},
    }


def test_prune_matches_reference_and_skips_the_rest():
    params = random_tree()
    pruned, masks = sparse_jax.prune(params)
    assert masks["stem"]["kernel"] is None  # 3 input channels
    assert masks["conv"]["bias"] is None and masks["norm"]["scale"] is None
    for name, axis in (("conv", 2), ("dense", 0)):
        w = np.asarray(params[name]["kernel"])
        expected = reference_mask(w, 2, 4, axis)
        np.testing.assert_array_equal(masks[name]["kernel"], expected)
        np.testing.assert_array_equal(pruned[name]["kernel"], w * expected)
    np.testing.assert_array_equal(pruned["stem"]["kernel"], params["stem"]["kernel"])
    np.testing.assert_array_equal(pruned["norm"]["scale"], params["norm"]["scale"])


def test_prune_other_patterns_and_apply_masks():
    params = random_tree(1)
    pruned, masks = sparse_jax.prune(params, n=1, m=8)
    w = np.asarray(params["dense"]["kernel"])
    np.testing.assert_array_equal(masks["dense"]["kernel"], reference_mask(w, 1, 8, 0))
    assert bool(sparse_jax.is_nm_sparse(pruned["dense"]["kernel"], 1, 8, axis=0))
    # apply_masks against numpy on a hand-made mask (with NaN and inf at dropped
    # entries, which must become exactly 0), not against prune's own output.
    rng = np.random.default_rng(7)
    hand = {k: {n: None for n in v} for k, v in params.items()}
    hand["conv"]["kernel"] = rng.random((3, 3, 8, 16)) < 0.3
    hand["norm"]["scale"] = rng.random(16) < 0.5
    poisoned = jax.tree.map(np.array, params)
    poisoned["conv"]["kernel"][~hand["conv"]["kernel"]] = np.nan
    poisoned["norm"]["scale"][~hand["norm"]["scale"]] = np.inf
    got = sparse_jax.apply_masks(poisoned, hand)
    for name, leaf in (("conv", "kernel"), ("norm", "scale")):
        want = np.where(hand[name][leaf], poisoned[name][leaf], 0.0)
        np.testing.assert_array_equal(got[name][leaf], want)
    np.testing.assert_array_equal(got["dense"]["kernel"], params["dense"]["kernel"])  # None: kept


def test_prune_nnx_state_and_update_model():
    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    pruned, masks = sparse_jax.prune(state)
    nnx.update(model, pruned)
    report = sparse_jax.sparsity_report(nnx.state(model, nnx.Param), masks)
    assert report.all_nm
    assert [r.path for r in report.rows if r.pruned] == ["layers/0/kernel", "layers/1/kernel"]
    assert report.pruned_size == 8 * 16 + 16 * 4


def test_mask_tree_errors_name_the_leaf():
    params = random_tree()
    _, masks = sparse_jax.prune(params)
    wrong_shape = jax.tree.map(lambda x: x, masks, is_leaf=lambda x: x is None)
    wrong_shape["dense"]["kernel"] = jnp.ones((10, 16), bool)
    with pytest.raises(ValueError, match=r"dense/kernel \(16, 10\): mask has shape \(10, 16\)"):
        sparse_jax.apply_masks(params, wrong_shape)
    missing = {k: v for k, v in masks.items() if k != "norm"}
    with pytest.raises(ValueError, match=r"params leaves with no mask entry: \['norm/scale'\]"):
        sparse_jax.apply_masks(params, missing)
    not_bool = dict(masks, dense={"kernel": jnp.ones((16, 10)), "bias": None})
    with pytest.raises(TypeError, match=r"dense/kernel \(16, 10\): mask must be a bool"):
        sparse_jax.apply_masks(params, not_bool)
    int_params = dict(params, dense={"kernel": jnp.ones((16, 10), jnp.int32), "bias": jnp.ones(10)})
    with pytest.raises(TypeError, match=r"dense/kernel \(16, 10\): cannot prune a int32"):
        sparse_jax.apply_masks(int_params, masks)


def test_check_masks_reports_broken_groups():
    params = random_tree()
    _, masks = sparse_jax.prune(params)
    sparse_jax.check_masks(params, masks)  # valid: no error
    broken = jax.tree.map(lambda x: x, masks, is_leaf=lambda x: x is None)
    broken["dense"]["kernel"] = broken["dense"]["kernel"].at[:3, 0].set(True).at[4:8, 1].set(True)
    with pytest.raises(
        ValueError,
        match=r"dense/kernel \(16, 10\): mask is not 2:4 along axis 0: 2 of 40 groups of 4 keep "
        r"other than exactly 2 \(they keep 3, 4\)",
    ):
        sparse_jax.check_masks(params, broken)


def test_check_masks_wants_exactly_n_unless_fewer_are_allowed():
    params = random_tree()
    _, masks = sparse_jax.prune(params)
    dead = dict(masks, conv=dict(masks["conv"], kernel=jnp.zeros((3, 3, 8, 16), bool)))
    # A scoring function gone wrong zeroes a whole layer: every group keeps 0.
    with pytest.raises(
        ValueError,
        match=r"conv/kernel \(3, 3, 8, 16\): mask is not 2:4 along axis 2: 288 of 288 groups .* keep 0",
    ):
        sparse_jax.check_masks(params, dead)
    sparse_jax.check_masks(params, dead, allow_fewer=True)  # fewer is allowed on request
    # Hand-worked: one group keeps 1; allowed only with allow_fewer.
    one_short = np.array(masks["dense"]["kernel"])
    kept = np.flatnonzero(one_short[0:4, 3])
    one_short[kept[0], 3] = False
    fewer = dict(masks, dense=dict(masks["dense"], kernel=jnp.asarray(one_short)))
    with pytest.raises(ValueError, match=r"1 of 40 groups of 4 keep other than exactly 2 \(they keep 1\)"):
        sparse_jax.check_masks(params, fewer)
    sparse_jax.check_masks(params, fewer, allow_fewer=True)
    too_many = one_short.copy()
    too_many[0:4, 5] = True
    with pytest.raises(ValueError, match=r"1 of 40 groups of 4 keep more than 2 \(they keep 4\)"):
        sparse_jax.check_masks(params, dict(masks, dense=dict(masks["dense"], kernel=jnp.asarray(too_many))), allow_fewer=True)


def test_check_masks_on_stacked_layers_uses_the_plan_axis():
    # Four layers stacked on axis 0, groups along axis 1 of each (16, 8) slice.
    params = {"layers": {"kernel": jax.random.normal(jax.random.key(5), (4, 16, 8))}}
    rules = [(r"layers/kernel", sparse_jax.Layout(axis=1, stacked=0))]
    _, masks = sparse_jax.prune(params, rules=rules)
    want = np.stack([reference_mask(np.asarray(params["layers"]["kernel"][i]), 2, 4, 0) for i in range(4)])
    np.testing.assert_array_equal(masks["layers"]["kernel"], want)
    sparse_jax.check_masks(params, masks, rules=rules)
    broken = np.array(want)
    broken[2, 4:8, 7] = False  # layer 2, one group
    with pytest.raises(ValueError, match=r"layers/kernel \(4, 16, 8\): mask is not 2:4 along axis 1: 1 of 128"):
        sparse_jax.check_masks(params, {"layers": {"kernel": jnp.asarray(broken)}}, rules=rules)


def test_report_counts_and_text():
    params = random_tree()
    pruned, masks = sparse_jax.prune(params)
    report = sparse_jax.sparsity_report(pruned, masks)
    rows = {r.path: r for r in report.rows}
    assert rows["conv/kernel"].density == pytest.approx(0.5)
    assert rows["conv/kernel"].nm_ok and rows["conv/kernel"].axis == 2
    assert not rows["stem/kernel"].pruned and "not a multiple of 4" in rows["stem/kernel"].reason
    assert report.total_size == sum(x.size for x in jax.tree.leaves(params))
    assert report.pruned_size == 3 * 3 * 8 * 16 + 16 * 10
    text = str(report)
    assert "conv/kernel" in text and "every pruned leaf 2:4: yes" in text
    # Training that drifts off the pattern is caught.
    drifted = dict(pruned, dense=dict(pruned["dense"], kernel=params["dense"]["kernel"]))
    assert not sparse_jax.sparsity_report(drifted, masks).all_nm


def test_report_without_masks_shows_what_the_rules_would_do(capsys):
    report = sparse_jax.sparsity_report(random_tree(), print_table=True)
    assert {r.path for r in report.rows if r.pruned} == {"conv/kernel", "dense/kernel"}
    assert not report.all_nm  # nothing pruned yet
    assert "conv/kernel" in capsys.readouterr().out
