"""Is it 2:4 where the hardware looks? An inspector for ONNX files and checkpoints.

TensorRT (``trtexec --sparsity=enable``) and cuSPARSELt use Sparse Tensor Cores
only for weights that are 2:4 along the reduction axis of the layer:

=========================  ======================  =========================
layer                      weight layout           axis of the groups of 4
=========================  ======================  =========================
ONNX ``Conv``              ``W[K, C/group, R, S]``  1 (input channels)
ONNX ``MatMul`` (B const)  ``B[..., K, N]``          -2 (K)
ONNX ``MatMul`` (A const)  ``A[..., M, K]``          -1 (K)
ONNX ``Gemm``              ``B[K, N]``              0, or 1 when ``transB=1``
                           ``A[M, K]``              1, or 0 when ``transA=1``
=========================  ======================  =========================

For an ONNX file, each Conv / MatMul / Gemm whose weight is a constant is
listed with the weight *as the layer consumes it*: the inspector evaluates the
chain of ``Transpose`` / ``Cast`` / ``Reshape`` / ``Identity`` /
``QuantizeLinear`` / ``DequantizeLinear`` / ``Squeeze`` / ``Unsqueeze`` nodes
between the initializer and the layer, so a weight stored transposed, cast or
quantized is checked on the axis that matters. For an orbax checkpoint each
parameter the pruning rules select is checked on its reduction axis.

Command line::

  sparse-jax-inspect model.onnx
  sparse-jax-inspect checkpoints/ --require 'layer1' --require 'fc'

``--require REGEX`` (repeatable) exits with status 1 when a layer whose name,
op or weight name matches is not 2:4, or when nothing matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

_PASS_THROUGH = {
    "Transpose",
    "Cast",
    "Reshape",
    "Identity",
    "QuantizeLinear",
    "DequantizeLinear",
    "Squeeze",
    "Unsqueeze",
}


@dataclasses.dataclass(frozen=True)
class LayerCheck:
    """One weight, checked on the axis the hardware groups along.

    Attributes:
      layer: the ONNX node name or the parameter path.
      op: ``Conv``/``MatMul``/``Gemm`` for ONNX, ``param`` for checkpoints.
      weight: the initializer (or parameter) the weight comes from.
      shape: the weight's shape as the layer consumes it.
      axis: the axis of the groups of 4 (non-negative), or None if unknown.
      is_24: whether every group of 4 along ``axis`` has at most 2 non-zeros.
      density: fraction of non-zeros.
      note: why it is not 2:4 when that is not a matter of values.
    """

    layer: str
    op: str
    weight: str
    shape: tuple[int, ...]
    axis: int | None
    is_24: bool
    density: float
    note: str = ""


def is_24_along(weight: np.ndarray, axis: int) -> tuple[bool, str]:
    """Whether ``weight`` is 2:4 along ``axis``, with a note when it cannot be.

    Example:
      >>> import numpy as np
      >>> from sparse_jax.inspect import is_24_along
      >>> w = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0]])
      >>> is_24_along(w, 0), is_24_along(w, 1)[0]
      ((True, ''), False)
    """
    if weight.ndim == 0 or weight.shape[axis] % 4:
        return False, f"axis {axis} has size {weight.shape[axis] if weight.ndim else 0}, not a multiple of 4"
    moved = np.moveaxis(weight != 0, axis, -1)
    groups = moved.reshape(-1, 4)
    bad = int((groups.sum(-1) > 2).sum())
    return bad == 0, "" if bad == 0 else f"{bad} of {len(groups)} groups keep more than 2"


def _check(layer: str, op: str, weight_name: str, weight: np.ndarray, axis: int) -> LayerCheck:
    axis = axis % weight.ndim
    ok, note = is_24_along(weight, axis)
    density = float(np.count_nonzero(weight)) / max(weight.size, 1)
    return LayerCheck(layer, op, weight_name, tuple(weight.shape), axis, ok, density, note)


# --- ONNX -------------------------------------------------------------------


class _ConstantFolder:
    """Evaluates the constant chain feeding a layer's weight input with NumPy."""

    def __init__(self, graph: Any):
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        self.constants = {t.name: t for t in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}
        for node in graph.node:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self.constants[node.output[0]] = attribute.t

    def value(self, name: str) -> tuple[np.ndarray, str] | None:
        """The value of tensor ``name`` and the initializer it comes from, if constant."""
        if name in self.constants:
            return self._to_array(self.constants[name]), name
        node = self.producers.get(name)
        if node is None or node.op_type not in _PASS_THROUGH:
            return None
        source = self.value(node.input[0])
        if source is None:
            return None
        x, origin = source
        attributes = {a.name: a for a in node.attribute}
        inputs = []
        for extra in node.input[1:]:
            found = self.value(extra) if extra else None
            inputs.append(None if found is None else found[0])
        return self._apply(node.op_type, x, attributes, inputs), origin

    def _apply(self, op: str, x: np.ndarray, attributes: dict, inputs: list) -> np.ndarray:
        import onnx

        if op == "Transpose":
            perm = list(attributes["perm"].ints) if "perm" in attributes else None
            return np.transpose(x, perm)
        if op == "Cast":
            return x.astype(onnx.helper.tensor_dtype_to_np_dtype(attributes["to"].i))
        if op == "Reshape":
            shape = [int(s) for s in inputs[0]]
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return x.reshape(shape)
        if op in ("Squeeze", "Unsqueeze"):
            axes = inputs[0] if inputs and inputs[0] is not None else attributes.get("axes")
            axes = [int(a) for a in (axes.ints if hasattr(axes, "ints") else axes)]
            if op == "Squeeze":
                return np.squeeze(x, tuple(axes))
            return np.expand_dims(x, tuple(axes))
        if op in ("QuantizeLinear", "DequantizeLinear"):
            scale = inputs[0]
            zero = inputs[1] if len(inputs) > 1 and inputs[1] is not None else np.zeros_like(scale)
            axis = attributes["axis"].i if "axis" in attributes else 1
            if np.ndim(scale) == 1 and x.ndim > 1:  # per-channel along `axis`
                shape = [1] * x.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            if op == "DequantizeLinear":
                return (x.astype(np.float32) - zero.astype(np.float32)) * scale
            return np.round(x / scale) + zero  # only zeros matter here
        return x  # Identity


def _weight_axis(node: Any, input_index: int, ndim: int) -> int:
    attributes = {a.name: a.i for a in node.attribute}
    if node.op_type == "Conv":
        return 1
    if node.op_type == "MatMul":
        return ndim - 2 if input_index == 1 else ndim - 1
    # Gemm: Y = op(A) @ op(B); K is A's axis 1 and B's axis 0 unless transposed.
    if input_index == 1:
        return 1 if attributes.get("transB", 0) else 0
    return 0 if attributes.get("transA", 0) else 1


def inspect_onnx(model: Any) -> list[LayerCheck]:
    """Checks every Conv / MatMul / Gemm weight of an ONNX model (path or ModelProto).

    Example (a one-layer graph whose MatMul weight ``B[K, N]`` is 2:4 along K):
      >>> import numpy as np
      >>> from onnx import TensorProto, helper, numpy_helper
      >>> from sparse_jax.inspect import inspect_onnx
      >>> b = np.tile(np.array([[1.0], [0.0], [0.0], [2.0]], np.float32), (2, 3))
      >>> graph = helper.make_graph(
      ...     [helper.make_node("MatMul", ["x", "B"], ["y"], name="fc")], "g",
      ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
      ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
      ...     [numpy_helper.from_array(b, "B")])
      >>> [(c.layer, c.axis, c.is_24) for c in inspect_onnx(helper.make_model(graph))]
      [('fc', 0, True)]
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    folder = _ConstantFolder(model.graph)
    checks = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        candidates = [1, 0] if node.op_type != "Conv" else [1]
        for input_index in candidates:
            if input_index >= len(node.input):
                continue
            found = folder.value(node.input[input_index])
            if found is None:
                continue
            weight, origin = found
            axis = _weight_axis(node, input_index, weight.ndim)
            name = node.name or f"{node.op_type}_{index}"
            checks.append(_check(name, node.op_type, origin, np.asarray(weight), axis))
            break
    return checks


# --- orbax checkpoints ------------------------------------------------------


def _latest_step_dir(path: pathlib.Path) -> pathlib.Path:
    steps = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps, key=lambda p: int(p.name)) if steps else path


def load_checkpoint_tree(path: str | pathlib.Path) -> Any:
    """Restores an orbax checkpoint (a step directory, or a manager's root) as NumPy.

    A `CheckpointManager` root resolves to its latest step; a step with several
    items is restored item by item into ``{item: tree}``; a compressed
    checkpoint of `sparse_jax.save_compressed` is decompressed.
    """
    import orbax.checkpoint as ocp

    from sparse_jax import _checkpoint

    path = _latest_step_dir(pathlib.Path(path).resolve())
    if _checkpoint.is_compressed_checkpoint(path):
        return _checkpoint.restore_compressed(path)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(path)
    except Exception as error:  # not a single pytree: try the items of a composite
        items = {}
        for item in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                items[item.name] = load_checkpoint_tree(item)
            except Exception:  # noqa: BLE001 - skip items that are not pytrees (metadata, json)
                continue
        if not items:
            raise ValueError(f"{path}: not an orbax pytree checkpoint ({error})") from error
        return items


def _params_subtrees(tree: Any) -> Any:
    """The ``params`` parts of a checkpoint when it has any (not optimizer moments)."""
    if not isinstance(tree, dict):
        return tree
    found = {}
    for key, value in tree.items():
        if key in ("params", "model"):
            found[key] = value
        elif isinstance(value, dict):
            inner = _params_subtrees(value)
            if inner is not value:
                found[key] = inner
    return found or tree


def inspect_checkpoint(path: str | pathlib.Path, rules: Sequence | None = None) -> list[LayerCheck]:
    """Checks each parameter the pruning rules select, on its reduction axis."""
    import jax

    from sparse_jax import _paths, _selection

    tree = _params_subtrees(load_checkpoint_tree(path))
    checks = []
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for plan, (key_path, leaf) in zip(_selection.plan_tree(tree, rules=rules), leaves):
        if plan.axis is None:
            continue
        path_str = _paths.path_to_str(key_path)
        checks.append(_check(path_str, "param", path_str, np.asarray(leaf), plan.axis))
    return checks


# --- command line -----------------------------------------------------------


def format_table(checks: Sequence[LayerCheck]) -> str:
    header = ("layer", "op", "weight", "shape", "axis", "2:4", "density", "note")
    rows = [
        (
            c.layer,
            c.op,
            c.weight,
            "x".join(map(str, c.shape)),
            "-" if c.axis is None else str(c.axis),
            "yes" if c.is_24 else "NO",
            f"{c.density:.3f}",
            c.note,
        )
        for c in checks
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    sparse = sum(c.is_24 for c in checks)
    lines.append(f"{sparse} of {len(checks)} weights are 2:4 on the axis the hardware uses")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparse-jax-inspect",
        description="List each Conv/MatMul/Gemm weight of an ONNX file (or each prunable "
        "parameter of an orbax checkpoint) and whether it is 2:4 on the axis TensorRT uses.",
    )
    parser.add_argument("path", help="an .onnx file, or an orbax checkpoint directory")
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="REGEX",
        help="exit 1 unless every layer whose name, op or weight matches REGEX is 2:4 "
        "(and at least one matches); repeatable. '.' requires all.",
    )
    args = parser.parse_args(argv)
    path = pathlib.Path(args.path)
    if not path.exists():
        parser.error(f"{path} does not exist")
    is_onnx = path.is_file() and path.suffix == ".onnx"
    checks = inspect_onnx(path) if is_onnx else inspect_checkpoint(path)
    print(format_table(checks))
    failed = []
    for pattern in args.require:
        regex = re.compile(pattern)
        matched = [c for c in checks if regex.search(c.layer) or regex.search(c.weight) or regex.search(c.op)]
        if not matched:
            failed.append(f"--require {pattern!r} matches no layer")
        failed += [f"{c.layer} ({c.weight}) is not 2:4 on axis {c.axis}" for c in matched if not c.is_24]
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
