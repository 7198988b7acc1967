"""search_permutations / apply_permutations: same function, never less kept magnitude."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparse_jax
from recipes.vision import grouped_conv
from sparse_jax._permute import _search_group
from tests._channel_models import IMAGE, ResNetBlock, XceptionBlock, eval_fn, randomized


def kept_2of4_reference(matrix):
    """Kept magnitude of a 2:4 mask along axis 0 of a (channels, columns) |w| matrix, float64."""
    stripes = np.asarray(matrix, np.float64).reshape(-1, 4, matrix.shape[1])
    return np.sort(stripes, axis=1)[:, 2:, :].sum()


MODELS = {
    "resnet": lambda: ResNetBlock(nnx.Rngs(0)),
    "resnext": lambda: ResNetBlock(nnx.Rngs(0), groups=2,
                                   conv_fn=grouped_conv.conv_general_dilated),
    "xception": lambda: XceptionBlock(nnx.Rngs(0)),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name == "resnet"
                                  else name for name in sorted(MODELS)])
def test_random_permutations_keep_the_function(name):
    graphdef, state = randomized(MODELS[name](), seed=1)
    fn = eval_fn(graphdef)
    x = jnp.asarray(np.random.default_rng(2).standard_normal(IMAGE), jnp.float32)
    coupling = sparse_jax.channel_groups(fn, state, x)
    rng = np.random.default_rng(3)
    perms = {g: rng.permutation(coupling.groups[g].size)
             for g, group in enumerate(coupling.groups) if group.permutable}
    permuted = sparse_jax.apply_permutations(state, coupling, perms)
    expected, got = fn(state, x), fn(permuted, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))
    # and the weights did move (a real permutation, not the identity)
    changed = [a for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(permuted))
               if not np.array_equal(a, b)]
    assert len(changed) > 10


@pytest.mark.parametrize("name", ["resnet", "resnext"])
def test_search_keeps_the_function_and_matches_prune(name):
    graphdef, state = randomized(MODELS[name](), seed=4)
    fn = eval_fn(graphdef)
    x = jnp.asarray(np.random.default_rng(5).standard_normal(IMAGE), jnp.float32)
    coupling = sparse_jax.channel_groups(fn, state, x)
    rules = sparse_jax.rules_from_computation(fn, state, x)
    result = sparse_jax.search_permutations(state, coupling, 2, 4, rules, time_limit=5.0)
    permuted = sparse_jax.apply_permutations(state, coupling, result)
    np.testing.assert_allclose(fn(permuted, x), fn(state, x), rtol=1e-4, atol=1e-4)

    # the kept magnitudes it reports are what sparse_jax.prune keeps in the consumers
    consumers = {c for g in result.groups for c in g.consumers}
    assert consumers == {"conv1/kernel", "conv2/kernel", "conv3/kernel", "down_conv/kernel",
                         "fc/kernel"}

    def kept(tree):
        pruned, masks = sparse_jax.prune(tree, 2, 4, rules)
        flat = jax.tree_util.tree_flatten_with_path(pruned)[0]
        return sum(float(np.abs(np.asarray(v, np.float64)).sum()) for path, v in flat
                   if sparse_jax._paths.path_to_str(path) in consumers)

    assert result.kept_before == pytest.approx(kept(state), rel=1e-5)
    assert result.kept_after == pytest.approx(kept(permuted), rel=1e-5)
    assert result.kept_after > result.kept_before


def test_two_stripes_reach_the_brute_force_optimum():
    rng = np.random.default_rng(6)
    for _ in range(5):
        matrix = np.abs(rng.standard_normal((8, 7))).astype(np.float32)
        best = max(kept_2of4_reference(matrix[list(p)]) for p in itertools.permutations(range(8)))
        order, _, _ = _search_group(matrix, 2, 4, np.random.default_rng(0), 10.0, 3, 100)
        assert sorted(order) == list(range(8))
        assert kept_2of4_reference(matrix[order]) == pytest.approx(best, rel=1e-6)


def test_search_never_lowers_the_kept_magnitude():
    rng = np.random.default_rng(7)
    for channels, columns in ((16, 3), (32, 9), (64, 20)):
        w = {"a": jnp.asarray(rng.standard_normal((5, channels))),
             "b": jnp.asarray(rng.standard_normal((channels, columns)))}
        fn = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
        coupling = sparse_jax.channel_groups(fn, w, jnp.ones((1, 5)))
        result = sparse_jax.search_permutations(w, coupling, 2, 4, time_limit=2.0)
        (group,) = result.groups
        before = kept_2of4_reference(np.abs(np.asarray(w["b"])))
        after = kept_2of4_reference(np.abs(np.asarray(w["b"]))[result.perms[group.group]])
        assert group.kept_before == pytest.approx(before, rel=1e-6)
        assert group.kept_after == pytest.approx(after, rel=1e-6)
        assert after >= before


def test_groups_without_consumers_are_skipped():
    w = {"a": jnp.ones((4, 6)), "b": jnp.ones((6, 3))}  # 6 channels: m=4 does not divide
    fn = lambda p, x: (x @ p["a"]) @ p["b"]
    coupling = sparse_jax.channel_groups(fn, w, jnp.ones((1, 4)))
    result = sparse_jax.search_permutations(w, coupling)
    assert result.groups == ()
    assert "not a multiple of m=4" in result.skipped[0][1]


def test_apply_rejects_bad_permutations():
    w = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 3))}
    fn = lambda p, x: (x @ p["a"]) @ p["b"]
    coupling = sparse_jax.channel_groups(fn, w, jnp.ones((1, 4)))
    g = next(i for i, group in enumerate(coupling.groups) if group.permutable)
    with pytest.raises(ValueError, match="not a permutation of 8"):
        sparse_jax.apply_permutations(w, coupling, {g: [0] * 8})
    fixed = next(i for i, group in enumerate(coupling.groups) if not group.permutable)
    with pytest.raises(ValueError, match="may not be permuted"):
        sparse_jax.apply_permutations(w, coupling, {fixed: list(range(4))})
