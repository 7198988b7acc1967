"""Dense weights from orbax checkpoints and torchvision / timm state dicts (``.safetensors``).

torchvision's names are the NNX ResNet's (``downsample.0`` / ``.1``: our ``downsample.conv`` /
``.bn``); timm's ``legacy_xception`` names by position, ours by role (`timm_key`). A convolution
weight ``(out, in/groups, kh, kw)`` is a Flax kernel ``(kh, kw, in/groups, out)``, a linear one
``(out, in)`` is ``(in, out)``; batch norm's ``weight``, ``running_mean``, ``running_var`` are
``scale``, ``mean``, ``var``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from flax import nnx
from flax import traverse_util

# Parameters and batch-norm statistics: what a torchvision state dict holds.
_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)

# NNX leaf name -> torch parameter name, for BatchNorm and Linear/Conv.
_NNX_TO_TORCH_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
                      "var": "running_var"}


def _torch_key(nnx_path: tuple[Any, ...]) -> str:
    """('layer2', 0, 'downsample', 'conv', 'kernel') -> 'layer2.0.downsample.0.weight'."""
    parts = []
    for part in nnx_path[:-1]:
        if parts and parts[-1] == "downsample":
            part = {"conv": "0", "bn": "1"}.get(part, part)
        parts.append(str(part))
    return ".".join(parts + [_NNX_TO_TORCH_LEAF[nnx_path[-1]]])


_TIMM_TOP_LEVEL = {"entry_conv1": "conv1", "entry_bn1": "bn1", "entry_conv2": "conv2",
                   "entry_bn2": "bn2", "exit_separable1": "conv3", "exit_bn1": "bn3",
                   "exit_separable2": "conv4", "exit_bn2": "bn4", "fc": "fc"}
_TIMM_SEPARABLE_PARTS = {"depthwise": "conv1", "pointwise": "pointwise"}


def timm_key(nnx_path: tuple[Any, ...]) -> str:
    """The timm key of an NNX leaf: ``('blocks', 3, 'bn', 1, 'var')`` -> 'block4.rep.5.running_var'.

    timm's ``block{n}.rep`` is one ``nn.Sequential`` of (ReLU, separable conv, batch norm) x 3,
    without the first ReLU in block 1: separable conv ``j`` is ``rep.{3j+o}``, its batch norm
    ``rep.{3j+o+1}``, with ``o`` = 0 in block 1 and 1 elsewhere.
    """
    head, *rest, leaf = nnx_path
    if head in _TIMM_TOP_LEVEL:
        parts = [_TIMM_TOP_LEVEL[head]] + [_TIMM_SEPARABLE_PARTS[p] for p in rest]
    elif head == "blocks" and rest[1] in ("skip", "skip_bn", "separable", "bn"):
        block_index, kind, *rest = rest
        parts = [f"block{int(block_index) + 1}"]
        rep = 3 * int(rest[0]) + (0 if int(block_index) == 0 else 1) if rest else None
        if kind in ("skip", "skip_bn"):
            parts.append(kind.replace("_", ""))
        elif kind == "separable":
            parts += ["rep", str(rep), _TIMM_SEPARABLE_PARTS[rest[1]]]
        else:
            parts += ["rep", str(rep + 1)]
    else:
        raise KeyError(f"no timm name for {'/'.join(map(str, nnx_path))}")
    return ".".join(parts + [_NNX_TO_TORCH_LEAF[leaf]])


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into NumPy arrays (no torch needed)."""
    from safetensors.numpy import load_file

    return load_file(path)


def import_state_dict(model: nnx.Module, state_dict: dict[str, np.ndarray],
                      key_of: Callable[[tuple[Any, ...]], str], source: str) -> None:
    """Copies a PyTorch-layout state dict (keys: ``key_of(nnx path)``) into ``model`` in place.

    A missing or unexpected key or a wrong shape raises a ValueError naming ``source``
    ("torchvision", "timm"), the key, the NNX path and both shapes.
    """
    state = nnx.state(model, _WEIGHTS)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    expected_keys = {key_of(path): path for path in flat}
    given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected_keys) - given)
    unexpected = sorted(given - set(expected_keys))
    if missing or unexpected:
        raise ValueError(f"{source} state dict does not match the {type(model).__name__} model: "
                         f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    new_flat = {}
    for key, path in expected_keys.items():
        target = flat[path]
        value = np.asarray(state_dict[key])
        if value.ndim == target.ndim == 4:  # conv (out, in/g, kh, kw) -> (kh, kw, in/g, out)
            value = np.transpose(value, (2, 3, 1, 0))
        elif value.ndim == target.ndim == 2:  # linear (out, in) -> (in, out)
            value = value.T
        if value.shape != target.shape:
            raise ValueError(f"{key}: {source} shape {tuple(np.shape(state_dict[key]))} gives "
                             f"{value.shape} for {'/'.join(map(str, path))}, which expects "
                             f"{tuple(target.shape)}")
        new_flat[path] = np.asarray(value, dtype=target.dtype)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(new_flat))
    nnx.update(model, state)


def export_state_dict(model: nnx.Module,
                      key_of: Callable[[tuple[Any, ...]], str]) -> dict[str, np.ndarray]:
    """The inverse of `import_state_dict`: torch layouts under ``key_of``'s names."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, _WEIGHTS)))
    out = {}
    for path, value in flat.items():
        value = np.asarray(value)
        if value.ndim == 4:
            value = np.transpose(value, (3, 2, 0, 1))
        elif value.ndim == 2:
            value = value.T
        out[key_of(path)] = np.ascontiguousarray(value)
        if path[-1] == "var":
            out[key_of(path).replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    return out


def import_torchvision_state_dict(model: nnx.Module, state_dict: dict[str, np.ndarray]) -> None:
    """Copies a torchvision ResNet state dict into ``model`` in place (see `import_state_dict`)."""
    import_state_dict(model, state_dict, _torch_key, "torchvision")


def export_torchvision_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse of `import_torchvision_state_dict` (torch layouts, torchvision names)."""
    return export_state_dict(model, _torch_key)


def import_timm_state_dict(model: nnx.Module, state_dict: dict[str, np.ndarray]) -> None:
    """Copies a timm ``legacy_xception`` state dict into an Xception in place."""
    import_state_dict(model, state_dict, timm_key, "timm")


def export_timm_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse of `import_timm_state_dict`: torch layouts under timm's key names."""
    return export_state_dict(model, timm_key)


def init_model_from(model: nnx.Module, source: str) -> str:
    """Loads dense weights into ``model`` from ``source``; returns a description of what it was.

    ``source`` is a torchvision (timm for Xception) ``.safetensors`` file, or an orbax checkpoint
    written by a recipe: a run directory, its ``checkpoints/dense`` directory, or one step in it.
    """
    if source.endswith(".safetensors"):
        from recipes.vision import xception

        if isinstance(model, xception.Xception):
            import_timm_state_dict(model, load_safetensors(source))
            return f"timm legacy_xception weights {source}"
        import_torchvision_state_dict(model, load_safetensors(source))
        return f"torchvision weights {source}"
    from recipes.engine import checkpointing

    params, batch_stats, where = checkpointing.load_dense_weights(source, model)
    state = nnx.state(model, _WEIGHTS)
    nnx.replace_by_pure_dict(state, _deep_merge(params, batch_stats))
    nnx.update(model, state)
    return f"orbax checkpoint {where}"


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if key in out and isinstance(value, dict) else value
    return out
