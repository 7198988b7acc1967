"""channel_groups: the coupled axes of small models equal hand-derived groups."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import sparse_jax
from recipes.vision import grouped_conv
from tests._channel_models import (IMAGE, ResNetBlock, XceptionBlock, bn_members, eval_fn,
                                   randomized)


def permutable_sets(coupling):
    return {frozenset(g.members) for g in coupling.permutable}


def group_of(coupling, member):
    (group,) = [g for g in coupling.groups if member in g.members]
    return group


def coupling_of(model):
    graphdef, state = randomized(model)
    return sparse_jax.channel_groups(eval_fn(graphdef), state, jnp.ones(IMAGE))


STEM = bn_members("stem/bn") | {("stem/conv/kernel", 3)}


def test_mlp_hidden_channels():
    p = {"w1": jnp.ones((8, 16)), "b1": jnp.ones(16), "w2": jnp.ones((16, 12)),
         "b2": jnp.ones(12), "w3": jnp.ones((12, 4))}

    def fn(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        h = jnp.tanh(h @ p["w2"] + p["b2"])
        return h @ p["w3"]

    coupling = sparse_jax.channel_groups(fn, p, jnp.ones((2, 8)))
    assert permutable_sets(coupling) == {
        frozenset({("w1", 1), ("b1", 0), ("w2", 0)}),
        frozenset({("w2", 1), ("b2", 0), ("w3", 0)}),
    }
    assert "input" in group_of(coupling, ("w1", 0)).reason
    assert "output" in group_of(coupling, ("w3", 1)).reason


@pytest.mark.slow
def test_resnet_block_with_downsample():
    coupling = coupling_of(ResNetBlock(nnx.Rngs(0)))
    assert permutable_sets(coupling) == {
        frozenset(STEM | {("conv1/kernel", 2), ("down_conv/kernel", 2)}),
        frozenset(bn_members("bn1") | {("conv1/kernel", 3), ("conv2/kernel", 2)}),
        frozenset(bn_members("bn2") | {("conv2/kernel", 3), ("conv3/kernel", 2)}),
        # the residual add ties the last conv, the downsample and the classifier
        frozenset(bn_members("bn3") | bn_members("down_bn") | {
            ("conv3/kernel", 3), ("down_conv/kernel", 3), ("fc/kernel", 0)}),
    }
    assert "input of fn" in group_of(coupling, ("stem/conv/kernel", 2)).reason
    assert "spatial" in group_of(coupling, ("conv2/kernel", 0)).reason


@pytest.mark.parametrize("conv_fn", [None, grouped_conv.conv_general_dilated],
                         ids=["lax", "recipes_grouped_conv"])
def test_resnext_grouped_block(conv_fn):
    coupling = coupling_of(ResNetBlock(nnx.Rngs(0), groups=2, conv_fn=conv_fn))
    assert permutable_sets(coupling) == {
        frozenset(STEM | {("conv1/kernel", 2), ("down_conv/kernel", 2)}),
        # into and out of the 2-group conv: 4 channels per group, permuted alike in both groups
        frozenset(bn_members("bn1") | {("conv1/kernel", 3), ("conv2/kernel", 2)}),
        frozenset(bn_members("bn2") | {("conv2/kernel", 3), ("conv3/kernel", 2)}),
        frozenset(bn_members("bn3") | bn_members("down_bn") | {
            ("conv3/kernel", 3), ("down_conv/kernel", 3), ("fc/kernel", 0)}),
    }
    into = group_of(coupling, ("conv1/kernel", 3))
    out_of = group_of(coupling, ("conv2/kernel", 3))
    assert into.size == out_of.size == 4
    assert dict(zip(into.members, into.copies)) == {
        **{m: 2 for m in bn_members("bn1")}, ("conv1/kernel", 3): 2, ("conv2/kernel", 2): 1}
    assert set(out_of.copies) == {2}
    # a channel's position within its group moves, the same way in every group
    assert into.axis_order(0, [2, 0, 3, 1]).tolist() == [2, 0, 3, 1, 6, 4, 7, 5]


def test_depthwise_with_a_channel_multiplier_is_left_alone():
    p = {"a": jnp.ones((3, 4)), "dw": jnp.ones((3, 3, 1, 8)), "b": jnp.ones((8, 2))}

    def fn(p, x):
        h = x @ p["a"]
        h = jax.lax.conv_general_dilated(h, p["dw"], (1, 1), "SAME", feature_group_count=4,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return h @ p["b"]

    coupling = sparse_jax.channel_groups(fn, p, jnp.ones((1, 5, 5, 3)))
    assert coupling.permutable == ()
    assert "grouped convolution (4 groups of 1 input channel and 8 outputs)" in group_of(
        coupling, ("a", 1)).reason


@pytest.mark.parametrize("conv_fn", [None, grouped_conv.conv_general_dilated],
                         ids=["lax", "recipes_depthwise"])
def test_xception_separable_block(conv_fn):
    coupling = coupling_of(XceptionBlock(nnx.Rngs(0), conv_fn=conv_fn))
    # a depthwise conv ties its output channels to its input channels
    assert permutable_sets(coupling) == {
        frozenset(STEM | {("depthwise1/kernel", 3), ("pointwise1/kernel", 2),
                          ("skip/kernel", 2)}),
        frozenset(bn_members("bn1") | {("pointwise1/kernel", 3), ("depthwise2/kernel", 3),
                                       ("pointwise2/kernel", 2)}),
        frozenset(bn_members("bn2") | bn_members("skip_bn") | {
            ("pointwise2/kernel", 3), ("skip/kernel", 3), ("fc/kernel", 0)}),
    }


def test_flatten_and_concatenate_are_left_alone():
    p = {"conv": jnp.ones((3, 3, 3, 4)), "fc": jnp.ones((8 * 8 * 4, 5)),
         "a": jnp.ones((5, 6)), "b": jnp.ones((5, 6)), "out": jnp.ones((12, 2))}

    def fn(p, x):
        y = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = y.reshape(y.shape[0], -1) @ p["fc"]  # flatten: channels mixed with pixels
        h = jnp.concatenate([h @ p["a"], h @ p["b"]], axis=-1)
        return h @ p["out"]

    coupling = sparse_jax.channel_groups(fn, p, jnp.ones((2, 8, 8, 3)))
    assert "reshape" in group_of(coupling, ("conv", 3)).reason
    assert "concatenation" in group_of(coupling, ("a", 1)).reason
    assert "concatenation" in group_of(coupling, ("b", 1)).reason
    # the fc output channel still ties fc, a and b
    assert permutable_sets(coupling) == {frozenset({("fc", 1), ("a", 0), ("b", 0)})}


def test_an_unknown_op_fixes_its_dims():
    p = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 4))}

    def fn(p, x):
        h = jnp.sort(x @ p["w1"], axis=-1)  # order along the channel matters
        return h @ p["w2"]

    coupling = sparse_jax.channel_groups(fn, p, jnp.ones((2, 4)))
    assert coupling.permutable == ()
    assert "sort" in group_of(coupling, ("w1", 1)).reason


def test_non_array_leaf_is_an_error():
    with pytest.raises(TypeError, match="w: variables leaves must be arrays"):
        sparse_jax.channel_groups(lambda p, x: x, {"w": "nope"}, jnp.ones(2))


def test_split_along_a_channel_is_left_alone_a_sum_over_it_is_not():
    p = {"a": jnp.ones((4, 8)), "b": jnp.ones((4, 8))}

    def fn(p, x):
        halves = jnp.split(x @ p["a"], 2, axis=1)  # which channel lands in which half matters
        return halves[0] * halves[1] + jnp.sum(x @ p["b"], axis=1, keepdims=True)

    coupling = sparse_jax.channel_groups(fn, p, jnp.ones((2, 4)))
    assert "split along it" in group_of(coupling, ("a", 1)).reason
    assert permutable_sets(coupling) == {frozenset({("b", 1)})}
