"""sparse_jax.nn: a pruned NNX MLP converted to SparseLinear gives the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparse_jax
from sparse_jax.nn import SparseLinear, densify, sparsify


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dtype=None):
        self.hidden = nnx.Linear(32, 64, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(64, 64, dtype=dtype, rngs=rngs)])
        self.out = nnx.Linear(64, 10, dtype=dtype, rngs=rngs)
        self.odd = nnx.Linear(10, 6, dtype=dtype, rngs=rngs)  # 10 inputs: not 2:4-able

    def __call__(self, x):
        x = nnx.relu(self.hidden(x))
        for block in self.blocks:
            x = nnx.relu(block(x))
        return self.odd(self.out(x))


def _pruned_mlp(dtype=None):
    model = MLP(nnx.Rngs(0), dtype=dtype)
    pruned, masks = sparse_jax.prune(nnx.state(model, nnx.Param))
    nnx.update(model, pruned)
    return model


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_sparsified_mlp_gives_same_logits(impl):
    model = _pruned_mlp()
    x = jax.random.normal(jax.random.key(1), (5, 32))
    before = model(x)
    sparse = sparsify(model, impl=impl)
    assert isinstance(sparse.hidden, SparseLinear) and isinstance(sparse.out, SparseLinear)
    assert isinstance(sparse.blocks[0], SparseLinear)
    assert isinstance(sparse.odd, nnx.Linear)  # left dense
    assert isinstance(model.hidden, nnx.Linear)  # the original is untouched
    after = sparse(x)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-5, atol=1e-5)


def test_sparsified_bf16_mlp_within_bf16_tolerance():
    model = _pruned_mlp(dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (7, 32))
    before = np.asarray(model(x).astype(jnp.float32))
    after = np.asarray(sparsify(model)(x).astype(jnp.float32))
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 2e-2


def test_densify_round_trip_restores_kernels():
    model = _pruned_mlp()
    back = densify(sparsify(model))
    assert isinstance(back.hidden, nnx.Linear) and isinstance(back.blocks[0], nnx.Linear)
    np.testing.assert_array_equal(np.asarray(back.hidden.kernel[...]), np.asarray(model.hidden.kernel[...]))
    np.testing.assert_array_equal(np.asarray(back.out.bias[...]), np.asarray(model.out.bias[...]))


def test_unpruned_layers_stay_dense_unless_prune():
    model = MLP(nnx.Rngs(3))
    assert isinstance(sparsify(model).hidden, nnx.Linear)
    forced = sparsify(model, prune=True)
    assert isinstance(forced.hidden, SparseLinear) and isinstance(forced.odd, nnx.Linear)


def test_sparse_linear_fine_tunes_kept_values_only():
    model = sparsify(_pruned_mlp())
    x = jax.random.normal(jax.random.key(4), (3, 32))
    params = nnx.state(model, nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    # Only kept values get gradients (metadata is not a Param); shapes match the compressed layout.
    assert grads["hidden"]["values"][...].shape == params["hidden"]["values"][...].shape == (16, 64)
    assert "meta" not in grads["hidden"]
    assert float(jnp.abs(grads["hidden"]["values"][...]).sum()) > 0


def test_sparse_linear_rejects_bad_kernel():
    with pytest.raises(ValueError, match="2-d Sparse24"):
        SparseLinear(sparse_jax.compress(jnp.zeros((2, 8, 4)), axis=1))
