"""Default and user rules: which leaves are pruned, along which axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import sparse_jax


def plans_by_path(params, **kwargs):
    return {p.path: p for p in sparse_jax.plan_tree(params, **kwargs)}


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(32, 16)(tokens)
        x = nn.Conv(8, (3,), name="conv_in3")(x)          # in=16: pruned on axis -2
        x = nn.Conv(12, (3,), name="conv_in8")(x)         # in=8
        x = nn.Conv(8, (3,), name="conv_in12")(x)         # in=12: pruned
        x = nn.Conv(8, (1,), name="conv_in8_b")(x[..., :6])  # in=6: skipped
        x = nn.LayerNorm()(x)
        x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
        return nn.Dense(10)(x)


def test_linen_defaults():
    params = LinenNet().init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))["params"]
    plans = plans_by_path(params)
    assert plans["Embed_0/embedding"].axis is None
    assert "embedding" in plans["Embed_0/embedding"].reason
    assert plans["conv_in3/kernel"].axis == 1  # (W, in, out): the in axis
    assert plans["conv_in8/kernel"].axis == 1
    assert plans["conv_in12/kernel"].axis == 1
    assert plans["conv_in8_b/kernel"].axis is None
    assert "reduction size 6" in plans["conv_in8_b/kernel"].reason
    assert plans["LayerNorm_0/scale"].axis is None
    attention = "MultiHeadDotProductAttention_0"
    for name in ("query", "key", "value"):  # (in, heads, head_dim): contract axis 0
        assert plans[f"{attention}/{name}/kernel"].axis == 0
        assert plans[f"{attention}/{name}/bias"].axis is None
    assert plans[f"{attention}/out/kernel"].axis == 1  # (heads, head_dim, out)
    assert plans["Dense_0/kernel"].axis == 0
    assert plans["Dense_0/bias"].axis is None


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.linear = nnx.Linear(8, 6, rngs=rngs)


def test_nnx_state_and_plain_dict_get_the_same_plan():
    model = NNXNet(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    plain = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    from_state = [(p.path, p.axis) for p in sparse_jax.plan_tree(state)]
    from_dict = [(p.path, p.axis) for p in sparse_jax.plan_tree(plain)]
    assert from_state == from_dict
    assert dict(from_state) == {
        "bn/bias": None,
        "bn/scale": None,
        "conv/bias": None,
        "conv/kernel": 2,
        "linear/bias": None,
        "linear/kernel": 0,
    }


def test_grouped_conv_pruned_per_group_and_depthwise_skipped():
    model_params = {
        "grouped": {"kernel": jnp.ones((3, 3, 8, 64))},  # 32 groups x 8 in-channels per group
        "depthwise": {"kernel": jnp.ones((3, 3, 1, 64))},  # feature_group_count == in channels
    }
    plans = plans_by_path(model_params)
    assert plans["grouped/kernel"].axis == 2
    assert plans["depthwise/kernel"].axis is None
    assert "depthwise" in plans["depthwise/kernel"].reason


def test_non_float_and_small_leaves_are_skipped():
    params = {"count": jnp.zeros((8, 8), jnp.int32), "flag": jnp.zeros((8, 8), bool),
              "scalar": jnp.float32(1.0), "w": jnp.ones((8, 8))}
    plans = plans_by_path(params)
    assert plans["count"].axis is None and "int32" in plans["count"].reason
    assert plans["flag"].axis is None
    assert plans["scalar"].axis is None
    assert plans["w"].axis == 0


def test_abstract_leaves_are_planned_like_concrete_ones():
    model = nnx.eval_shape(lambda: NNXNet(nnx.Rngs(0)))
    abstract = nnx.state(model, nnx.Param)
    concrete = nnx.state(NNXNet(nnx.Rngs(0)), nnx.Param)
    assert sparse_jax.plan_tree(abstract) == sparse_jax.plan_tree(concrete)


def test_asp_size_rule():
    params = {"a": jnp.ones((16, 8)), "b": jnp.ones((8, 8)), "c": jnp.ones((16, 12)),
              "conv": jnp.ones((3, 3, 32, 16))}
    plans = plans_by_path(params, asp_size_rule=True)
    assert plans["a"].axis == 0
    assert plans["b"].axis is None  # in = 8, not a multiple of 16
    assert plans["c"].axis is None  # out = 12, not a multiple of 8
    assert plans["conv"].axis == 2
    assert plans_by_path(params)["b"].axis == 0  # off by default


def test_user_rules_first_match_wins():
    params = {"head": {"kernel": jnp.ones((8, 8))}, "body": {"kernel": jnp.ones((8, 8))},
              "einsum": {"kernel": jnp.ones((4, 8, 8))}}
    rules = [("^head/", "skip"), ("einsum/kernel$", 1), ("body", "default")]
    plans = plans_by_path(params, rules=rules)
    assert plans["head/kernel"].axis is None and "rule" in plans["head/kernel"].reason
    assert plans["einsum/kernel"].axis == 1
    assert plans["body/kernel"].axis == 0


def test_forced_rule_on_bad_leaf_raises_with_path_and_shape():
    params = {"layer": {"kernel": jnp.ones((6, 8)), "steps": jnp.ones((8, 8), jnp.int32)}}
    with pytest.raises(ValueError, match=r"layer/kernel \(6, 8\): axis 0 has size 6"):
        sparse_jax.plan_tree(params, rules=[("kernel", 0)])
    with pytest.raises(TypeError, match=r"layer/steps \(8, 8\).*int32"):
        sparse_jax.plan_tree(params, rules=[("steps", 0)])


@pytest.mark.parametrize(
    "rules, error",
    [("kernel", TypeError), ([("kernel",)], TypeError), ([("kernel", "prune")], ValueError)],
)
def test_malformed_rules_raise(rules, error):
    with pytest.raises(error):
        sparse_jax.plan_tree({"kernel": jnp.ones((4, 4))}, rules=rules)


def test_n_larger_than_m_raises():
    with pytest.raises(ValueError, match="n=3 is larger than m=2"):
        sparse_jax.plan_tree({"w": jnp.ones((4, 4))}, n=3, m=2)
