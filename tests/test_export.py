"""ONNX export (jax2onnx) and the 2:4 inspector, checked with onnxruntime and by hand-built graphs."""

import importlib.metadata

import jax
import numpy as np
import pytest
from flax import nnx

import sparse_jax
from sparse_jax import inspect as sparse_inspect

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

jax2onnx = pytest.importorskip(
    "jax2onnx", reason='install with: pip install --no-deps "jax2onnx==0.17.1"'
)


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.grouped = nnx.Conv(16, 16, (3, 3), feature_group_count=2, rngs=rngs)
        self.linear = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        x = nnx.relu(self.grouped(x))
        return self.linear(x.mean(axis=(1, 2)))


class TransformerBlock(nnx.Module):
    def __init__(self, rngs, dim=16, heads=2):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, qkv_features=dim, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


def prune_model(model, rules=None):
    params, masks = sparse_jax.prune(nnx.state(model, nnx.Param), rules=rules)
    nnx.update(model, params)
    return masks


def run_onnx(model_proto, x):
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.asarray(x)})[0]


@pytest.mark.parametrize(
    "make, shape",
    [(lambda: CNN(nnx.Rngs(0)), (2, 10, 10, 8)),
     pytest.param(lambda: TransformerBlock(nnx.Rngs(1)), (2, 6, 16), marks=pytest.mark.slow)],
    ids=["cnn", "transformer_block"],
)
def test_export_matches_jax_and_inspector_sees_2_4(tmp_path, make, shape):
    model = make()
    prune_model(model)
    # Non-trivial batch-norm statistics, so eval mode is really exercised.
    if isinstance(model, CNN):
        model.bn.mean[...] = jax.random.normal(jax.random.key(3), (16,))
        model.bn.var[...] = 1.5 + jax.random.uniform(jax.random.key(4), (16,))
    x = jax.random.normal(jax.random.key(2), shape)
    proto = sparse_jax.export.to_onnx(model, [x], tmp_path / "model.onnx")

    assert not {t.name for t in proto.graph.initializer} & {i.name for i in proto.graph.input}
    model.eval()
    np.testing.assert_allclose(run_onnx(proto, x), np.asarray(model(x)), rtol=1e-4, atol=1e-5)

    checks = sparse_inspect.inspect_onnx(tmp_path / "model.onnx")
    pruned_kernels = [p for p in sparse_jax.plan_tree(nnx.state(model, nnx.Param)) if p.pruned]
    assert len(checks) == len(pruned_kernels)
    assert all(c.is_24 for c in checks), sparse_inspect.format_table(checks)
    assert {c.op for c in checks} == ({"Conv", "Gemm"} if isinstance(model, CNN) else {"Gemm"})


def test_inspector_flags_dense_and_wrong_axis_weights(tmp_path):
    dense = CNN(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 10, 10, 8))
    sparse_jax.export.to_onnx(dense, [x], tmp_path / "dense.onnx")
    assert not any(c.is_24 for c in sparse_inspect.inspect_onnx(tmp_path / "dense.onnx"))

    # Linear pruned along its output axis: 2:4 in memory, but not where TensorRT looks.
    wrong = CNN(nnx.Rngs(0))
    prune_model(wrong, rules=[("linear/kernel", 1)])
    sparse_jax.export.to_onnx(wrong, [x], tmp_path / "wrong.onnx")
    checks = {c.op: c for c in sparse_inspect.inspect_onnx(tmp_path / "wrong.onnx")}
    assert not checks["Gemm"].is_24 and checks["Gemm"].axis == 0

    assert sparse_inspect.main([str(tmp_path / "wrong.onnx")]) == 0
    assert sparse_inspect.main([str(tmp_path / "wrong.onnx"), "--require", "Conv"]) == 0  # pruned as usual
    assert sparse_inspect.main([str(tmp_path / "wrong.onnx"), "--require", "Gemm"]) == 1
    assert sparse_inspect.main([str(tmp_path / "wrong.onnx"), "--require", "no_such_layer"]) == 1


def two_four(rows, cols, seed):
    """A random (rows, cols) array that is 2:4 along axis 0."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return w * np.asarray(sparse_jax.nm_mask(w, 2, 4, axis=0))


def test_inspector_sees_through_transpose_cast_and_dequantize():
    k, n = 16, 8
    w = two_four(k, n, 0)  # (K, N), 2:4 along K
    scale = np.full((n,), 0.05, np.float32)
    quantized = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    initializers = [
        numpy_helper.from_array(w.T.copy(), "w_transposed"),  # stored (N, K)
        numpy_helper.from_array(w.astype(np.float16), "w_half"),
        numpy_helper.from_array(quantized, "w_int8"),
        numpy_helper.from_array(scale, "w_scale"),
        numpy_helper.from_array(np.zeros((n,), np.int8), "w_zero"),
        numpy_helper.from_array(w.T.copy(), "w_gemm_transb"),
        numpy_helper.from_array(w.T.copy(), "w_bad"),  # used untransposed: 2:4 on the wrong axis
    ]
    nodes = [
        helper.make_node("Transpose", ["w_transposed"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_t"], ["y1"], name="via_transpose"),
        helper.make_node("Cast", ["w_half"], ["w_cast"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w_cast"], ["y2"], name="via_cast"),
        helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zero"], ["w_dq"], axis=1),
        helper.make_node("MatMul", ["x", "w_dq"], ["y3"], name="via_dequantize"),
        helper.make_node("Gemm", ["x", "w_gemm_transb"], ["y4"], name="gemm_transb", transB=1),
        helper.make_node("Gemm", ["x", "w_bad"], ["y5"], name="gemm_wrong_axis", transB=0),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(1, 6)]
    graph = helper.make_graph(nodes, "g", [x], outputs, initializer=initializers)
    checks = {c.layer: c for c in sparse_inspect.inspect_onnx(helper.make_model(graph))}
    assert checks["via_transpose"].is_24 and checks["via_transpose"].weight == "w_transposed"
    assert checks["via_transpose"].shape == (k, n)
    assert checks["via_cast"].is_24
    assert checks["via_dequantize"].is_24 and checks["via_dequantize"].weight == "w_int8"
    assert checks["gemm_transb"].is_24 and checks["gemm_transb"].axis == 1
    # "w_bad" is (N, K) = (8, 16) used as B[K=8, N=16]: groups along its axis 0 are not 2:4.
    assert not checks["gemm_wrong_axis"].is_24


def test_inspector_on_checkpoints(tmp_path):
    import orbax.checkpoint as ocp

    model = CNN(nnx.Rngs(0))
    masks = prune_model(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "plain", {"params": params, "step": 3})
    checks = {c.layer: c for c in sparse_inspect.inspect_checkpoint(tmp_path / "plain")}
    assert set(checks) == {"params/conv/kernel", "params/grouped/kernel", "params/linear/kernel"}
    assert all(c.is_24 for c in checks.values())

    sparse_jax.save_compressed(tmp_path / "compressed", nnx.state(model, nnx.Param), masks)
    assert sparse_inspect.main([str(tmp_path / "compressed"), "--require", "."]) == 0

    dense = CNN(nnx.Rngs(0))
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "dense", nnx.to_pure_dict(nnx.state(dense, nnx.Param)))
    assert sparse_inspect.main([str(tmp_path / "dense"), "--require", "linear"]) == 1


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("sparse-jax-inspect") == "sparse_jax.inspect:main"


@pytest.mark.slow
def test_recipe_resnet_exports_a_graph_onnxruntime_runs(tmp_path):
    # The recipes' models end in a global mean: jax2onnx 0.17 writes ReduceMean's axes as an
    # input, which opset 17 does not allow; to_onnx must turn them back into an attribute.
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from recipes.vision import models

    model = models.ResNet(models.Bottleneck, (1, 1, 1, 1), groups=2, width_per_group=64,
                          num_filters=8, num_classes=10, rngs=models.init_rngs(0))
    prune_model(model)
    x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
    proto = sparse_jax.export.to_onnx(model, [x], tmp_path / "resnet.onnx", opset=17)
    assert all(len(n.input) == 1 for n in proto.graph.node if n.op_type == "ReduceMean")
    with jax.default_matmul_precision("highest"):
        want = model(x, train=False)
    np.testing.assert_allclose(run_onnx(proto, x), np.asarray(want), rtol=1e-4, atol=1e-5)
