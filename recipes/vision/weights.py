"""Dense weights from elsewhere: torchvision state dicts (``.safetensors``) and orbax checkpoints.

torchvision names map one to one onto the NNX ResNet (``models.py`` keeps torchvision's attribute
names); only the layouts differ:

=========================================  ==========================  ======================
torchvision key                            torch layout                NNX (Flax) layout
=========================================  ==========================  ======================
``*.weight`` of a convolution              (out, in/groups, kh, kw)    kernel (kh, kw, in/groups, out)
``fc.weight``                              (out, in)                   kernel (in, out)
``*.bias``                                 (out,)                      bias (out,)
``bnX.weight`` / ``bias``                  (C,)                        scale / bias
``bnX.running_mean`` / ``running_var``     (C,)                        mean / var (batch stats)
``bnX.num_batches_tracked``                ()                          (not used)
``*.downsample.0`` / ``*.downsample.1``                                ``*.downsample.conv`` / ``.bn``
=========================================  ==========================  ======================
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from flax import nnx
from flax import traverse_util

# Parameters and batch-norm statistics: what a torchvision state dict holds.
_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)

# NNX leaf name -> torchvision parameter name, for BatchNorm and Linear/Conv.
_NNX_TO_TORCH_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
                      "var": "running_var"}


def _torch_key(nnx_path: tuple[Any, ...]) -> str:
    """('layer2', 0, 'downsample', 'conv', 'kernel') -> 'layer2.0.downsample.0.weight'."""
    parts = []
    for part in nnx_path[:-1]:
        part = {"conv": "0", "bn": "1"}.get(part, part) if parts and parts[-1] == "downsample" else part
        parts.append(str(part))
    return ".".join(parts + [_NNX_TO_TORCH_LEAF[nnx_path[-1]]])


def _torch_to_flax_layout(value: np.ndarray, target_ndim: int) -> np.ndarray:
    if target_ndim == 4 and value.ndim == 4:  # conv (out, in/groups, kh, kw) -> (kh, kw, in/groups, out)
        return np.transpose(value, (2, 3, 1, 0))
    if target_ndim == 2 and value.ndim == 2:  # linear (out, in) -> (in, out)
        return value.T
    return value


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into NumPy arrays (no torch needed)."""
    from safetensors.numpy import load_file

    return load_file(path)


def import_state_dict(model: nnx.Module, state_dict: dict[str, np.ndarray],
                      key_of: Callable[[tuple[Any, ...]], str], source: str) -> None:
    """Copies a PyTorch-layout state dict into ``model`` in place (params and batch stats).

    Args:
        model: the NNX model to fill.
        state_dict: torch-layout arrays by key (``num_batches_tracked`` entries are ignored).
        key_of: the state-dict key of an NNX leaf path.
        source: whose names these are, for error messages ("torchvision", "timm").

    Raises:
        ValueError: a key is missing or unexpected, or a shape does not match; the message names
            the key, the NNX path and both shapes.
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
        value = _torch_to_flax_layout(np.asarray(state_dict[key]), target.ndim)
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


def init_model_from(model: nnx.Module, source: str) -> str:
    """Loads dense weights into ``model`` from ``source``; returns a description of what it was.

    ``source`` is a torchvision ``.safetensors`` file, or an orbax checkpoint written by a recipe:
    a run directory, its ``checkpoints/dense`` manager directory, or one step directory in it.
    """
    if source.endswith(".safetensors"):
        from recipes.vision import weights_timm, xception

        if isinstance(model, xception.Xception):
            weights_timm.import_timm_state_dict(model, load_safetensors(source))
            return f"timm legacy_xception weights {source}"
        import_torchvision_state_dict(model, load_safetensors(source))
        return f"torchvision weights {source}"
    from recipes.engine import checkpointing

    params, batch_stats, where = checkpointing.load_dense_weights(source, model)
    state = nnx.state(model, _WEIGHTS)
    nnx.replace_by_pure_dict(state, {**_deep_merge(params, batch_stats)})
    nnx.update(model, state)
    return f"orbax checkpoint {where}"


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if key in out and isinstance(value, dict) else value
    return out

