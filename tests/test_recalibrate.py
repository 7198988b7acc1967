"""Batch-norm recalibration against NumPy population statistics of the norm inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparse_jax

EPS = 1e-5


def reference_stats(batches, k1, b1, scale1, bias1, k2):
    """float64 NumPy: the inputs of both norms in training mode, and their population stats."""
    inputs1, inputs2 = [], []
    for x in batches:
        h1 = np.einsum("bhwc,cd->bhwd", np.asarray(x, np.float64), k1) + b1  # a 1x1 conv
        mean, var = h1.mean((0, 1, 2)), h1.var((0, 1, 2))  # the batch's own statistics
        y = np.maximum((h1 - mean) / np.sqrt(var + EPS) * scale1 + bias1, 0.0)
        h2 = np.einsum("bhwc,cd->bhwd", y, k2)
        inputs1.append(h1.reshape(-1, h1.shape[-1]))
        inputs2.append(h2.reshape(-1, h2.shape[-1]))
    return [(np.concatenate(v).mean(0), np.concatenate(v).var(0)) for v in (inputs1, inputs2)]


def make_batches(seed):
    rng = np.random.default_rng(seed)
    # different batch sizes: the estimate weighs them as if concatenated
    return [jnp.asarray(2.0 + 3.0 * rng.standard_normal((size, 4, 4, 3)), jnp.float32)
            for size in (8, 8, 5)]


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 6, kernel_size=(1, 1), rngs=rngs)
        self.bn1 = nnx.BatchNorm(6, momentum=0.9, epsilon=EPS, rngs=rngs)
        self.conv2 = nnx.Conv(6, 5, kernel_size=(1, 1), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(5, momentum=0.9, epsilon=EPS, rngs=rngs)

    def __call__(self, x, train=False):
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        return self.bn2(self.conv2(y), use_running_average=not train)


def nnx_weights(model):
    return (np.asarray(model.conv1.kernel[...], np.float64)[0, 0],
            np.asarray(model.conv1.bias[...], np.float64),
            np.asarray(model.bn1.scale[...], np.float64),
            np.asarray(model.bn1.bias[...], np.float64),
            np.asarray(model.conv2.kernel[...], np.float64)[0, 0])


@pytest.mark.parametrize("jit", [False, True])
def test_nnx_population_statistics(jit):
    model = NNXNet(nnx.Rngs(0))
    model.bn1.scale[...] = jnp.linspace(0.5, 2.0, 6)
    model.bn1.bias[...] = jnp.linspace(-1.0, 1.0, 6)
    batches = make_batches(1)
    forward = lambda m, x: m(x, train=True)
    out = sparse_jax.recalibrate_batch_norm(model, batches, forward=nnx.jit(forward) if jit
                                            else forward)
    assert out is model
    (mean1, var1), (mean2, var2) = reference_stats(batches, *nnx_weights(model))
    np.testing.assert_allclose(model.bn1.mean[...], mean1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.bn1.var[...], var1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.bn2.mean[...], mean2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.bn2.var[...], var2, rtol=1e-4, atol=1e-4)
    assert model.bn1.momentum == 0.9 and model.bn2.momentum == 0.9  # restored
    assert not np.allclose(var1, 1.0)  # not the initial statistics


def test_nnx_default_forward_and_errors():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                           nnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(2)
    batches = [jnp.asarray(rng.standard_normal((6, 3)), jnp.float32) for _ in range(3)]
    sparse_jax.recalibrate_batch_norm(model, batches)
    h = np.concatenate([np.asarray(model.layers[0](b)) for b in batches])
    np.testing.assert_allclose(model.layers[1].mean[...], h.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.layers[1].var[...], h.var(0), rtol=1e-4, atol=1e-5)
    assert model.layers[1].use_running_average is True
    with pytest.raises(ValueError, match="holds no nnx.BatchNorm"):
        sparse_jax.recalibrate_batch_norm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), batches)
    with pytest.raises(ValueError, match="batches is empty"):
        sparse_jax.recalibrate_batch_norm(model, [])


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        y = nn.Conv(6, (1, 1), name="conv1")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS,
                                 name="bn1")(y))
        y = nn.Conv(5, (1, 1), use_bias=False, name="conv2")(y)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS,
                            name="bn2")(y)


def test_linen_population_statistics():
    model = LinenNet()
    variables = model.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
    params = dict(variables["params"])
    params["bn1"] = {"scale": jnp.linspace(0.5, 2.0, 6), "bias": jnp.linspace(-1.0, 1.0, 6)}
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    batches = make_batches(3)
    forward = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    stats = sparse_jax.recalibrate_batch_stats(forward, variables, batches)
    p = variables["params"]
    weights = (np.asarray(p["conv1"]["kernel"], np.float64)[0, 0],
               np.asarray(p["conv1"]["bias"], np.float64),
               np.asarray(p["bn1"]["scale"], np.float64), np.asarray(p["bn1"]["bias"], np.float64),
               np.asarray(p["conv2"]["kernel"], np.float64)[0, 0])
    (mean1, var1), (mean2, var2) = reference_stats(batches, *weights)
    np.testing.assert_allclose(stats["bn1"]["mean"], mean1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["bn1"]["var"], var1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["bn2"]["mean"], mean2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["bn2"]["var"], var2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no 'batch_stats' collection"):
        sparse_jax.recalibrate_batch_stats(forward, {"params": p}, batches)
