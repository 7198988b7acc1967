"""ONNX export of (pruned) Flax NNX models, for TensorRT's sparse kernels.

Uses ``jax2onnx``, an optional extra. Its published requirements pin an older
orbax-checkpoint than sparse_jax uses, so install it without its dependency
resolution (the README gives the command)::

  pip install -e ".[export]" && pip install --no-deps "jax2onnx==0.17.1"

The exported graph has the weights as constant initializers (not graph
inputs), with the model in eval mode (batch norm on running statistics,
dropout off), so ``trtexec --onnx=model.onnx --sparsity=enable --fp16`` sees
the 2:4 weights. ``sparse-jax-inspect model.onnx`` shows, per layer, whether the
weight is 2:4 on the axis TensorRT uses.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax

_INSTALL_HINT = (
    'sparse_jax.export needs jax2onnx: pip install -e ".[export]" && '
    'pip install --no-deps "jax2onnx==0.17.1"'
)


# Reductions whose axes are an attribute before opset 18 (ReduceSum moved to an input at 13).
_AXES_ATTRIBUTE_BEFORE_18 = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSumSquare"})


def _reduce_axes_to_attributes(model: Any, opset: int) -> None:
    """Moves constant ``axes`` inputs of reductions to attributes where ``opset`` wants them.

    jax2onnx 0.17 writes ``ReduceMean(x, axes)`` (the opset-18 form) at any opset; onnxruntime
    and TensorRT reject that graph at opset 17.
    """
    if opset >= 18:
        return
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for node in graph.node:
        if node.op_type not in _AXES_ATTRIBUTE_BEFORE_18 or len(node.input) < 2:
            continue
        axes_name = node.input[1]
        if axes_name not in constants:
            raise ValueError(f"{node.op_type} node {node.name!r} has non-constant axes "
                             f"{axes_name!r}; export with opset >= 18")
        axes = [int(a) for a in constants[axes_name].reshape(-1)]
        del node.input[1:]
        node.attribute.append(helper.make_attribute("axes", axes))
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)


def _eval_copy(model: Any) -> Any:
    """A copy of an NNX module switched to eval mode; other callables unchanged."""
    from flax import nnx

    if not isinstance(model, nnx.Module):
        return model
    copy = nnx.clone(model)
    copy.eval()
    return copy


def to_onnx(
    model_or_fn: Callable[..., Any],
    example_inputs: Sequence[Any],
    path: str | os.PathLike,
    opset: int = 17,
    *,
    input_names: Sequence[str] | None = None,
) -> Any:
    """Exports a Flax NNX model (or a jax function) to an ONNX file.

    Args:
      model_or_fn: an ``nnx.Module`` (exported in eval mode, from a copy; the
        model itself is left as it was) or any function of arrays.
      example_inputs: arrays or ``jax.ShapeDtypeStruct``s giving each input's
        shape and dtype.
      path: the ``.onnx`` file to write.
      opset: the ONNX opset (17 is what TensorRT 8.6+ and onnxruntime read).
      input_names: optional names for the graph inputs.

    Returns:
      The ``onnx.ModelProto`` that was written.

    Example (needs the ``export`` extra and jax2onnx):
      >>> import tempfile, jax.numpy as jnp, sparse_jax
      >>> from flax import nnx
      >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
      >>> pruned, _ = sparse_jax.prune(nnx.state(model, nnx.Param))
      >>> nnx.update(model, pruned)
      >>> path = tempfile.mkdtemp() + "/linear.onnx"
      >>> _ = sparse_jax.export.to_onnx(model, [jnp.zeros((1, 8))], path)
      >>> [c.is_24 for c in sparse_jax.inspect.inspect_onnx(path)]
      [True]
    """
    try:
        import jax2onnx
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    import onnx

    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in example_inputs]
    model = jax2onnx.to_onnx(
        _eval_copy(model_or_fn),
        specs,
        opset=opset,
        input_names=list(input_names) if input_names else None,
    )
    graph_inputs = {i.name for i in model.graph.input}
    leaked = [t.name for t in model.graph.initializer if t.name in graph_inputs]
    if leaked:
        raise RuntimeError(f"weights exported as graph inputs: {leaked[:5]}")
    _reduce_axes_to_attributes(model, opset)
    # jax2onnx 0.17 records some intermediate shapes in NHWC where the graph computes NCHW;
    # value_info is optional, so drop it rather than hand TensorRT wrong shapes.
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return model
