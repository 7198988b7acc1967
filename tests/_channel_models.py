"""Small NNX CNN blocks for the channel-coupling and permutation tests (NHWC, HWIO kernels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMAGE = (2, 8, 8, 3)


def bn(features, rngs):
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


def conv(cin, cout, k, rngs, groups=1, conv_fn=None, strides=1):
    kwargs = {} if conv_fn is None else {"conv_general_dilated": conv_fn}
    return nnx.Conv(cin, cout, kernel_size=(k, k), strides=strides, padding="SAME",
                    use_bias=False, feature_group_count=groups, rngs=rngs, **kwargs)


class Stem(nnx.Module):
    def __init__(self, cout, rngs):
        self.conv = conv(3, cout, 3, rngs)
        self.bn = bn(cout, rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class ResNetBlock(nnx.Module):
    """stem -> bottleneck (1x1, strided 3x3 (grouped: ResNeXt), 1x1) + downsample -> mean -> fc."""

    def __init__(self, rngs, groups=1, conv_fn=None):
        self.stem = Stem(8, rngs)
        self.conv1 = conv(8, 8, 1, rngs)
        self.bn1 = bn(8, rngs)
        self.conv2 = conv(8, 8, 3, rngs, groups=groups, conv_fn=conv_fn, strides=2)
        self.bn2 = bn(8, rngs)
        self.conv3 = conv(8, 16, 1, rngs)
        self.bn3 = bn(16, rngs)
        self.down_conv = conv(8, 16, 1, rngs, strides=2)
        self.down_bn = bn(16, rngs)
        self.fc = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        identity = self.down_bn(self.down_conv(x))
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        y = nnx.relu(y + identity)
        return self.fc(jnp.mean(y, axis=(1, 2)))


class XceptionBlock(nnx.Module):
    """stem -> 2 x (relu, depthwise 3x3, pointwise 1x1, bn) + 1x1 projection shortcut -> fc."""

    def __init__(self, rngs, conv_fn=None):
        self.stem = Stem(8, rngs)
        self.depthwise1 = conv(8, 8, 3, rngs, groups=8, conv_fn=conv_fn)
        self.pointwise1 = conv(8, 16, 1, rngs)
        self.bn1 = bn(16, rngs)
        self.depthwise2 = conv(16, 16, 3, rngs, groups=16, conv_fn=conv_fn)
        self.pointwise2 = conv(16, 16, 1, rngs)
        self.bn2 = bn(16, rngs)
        self.skip = conv(8, 16, 1, rngs)
        self.skip_bn = bn(16, rngs)
        self.fc = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        y = self.bn1(self.pointwise1(self.depthwise1(nnx.relu(x))))
        y = self.bn2(self.pointwise2(self.depthwise2(nnx.relu(y))))
        y = y + self.skip_bn(self.skip(x))
        return self.fc(jnp.mean(y, axis=(1, 2)))


def eval_fn(graphdef):
    def fn(state, x):
        model = nnx.merge(graphdef, state)
        model.eval()
        return model(x)

    return fn


def randomized(model, seed=0):
    """The model's state with random values everywhere (batch statistics too), as an nnx.State."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    filled = []
    for leaf in leaves:
        value = rng.standard_normal(leaf.shape)
        if leaf.ndim == 1:
            value = 0.5 + np.abs(value)  # positive variances (and scales) for the norms
        filled.append(jnp.asarray(value, leaf.dtype))
    return graphdef, jax.tree.unflatten(tree, filled)


def bn_members(name):
    return {(f"{name}/{leaf}", 0) for leaf in ("bias", "mean", "scale", "var")}
