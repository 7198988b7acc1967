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
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return model
