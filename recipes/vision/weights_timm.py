"""Xception weights with timm's ``legacy_xception`` key names (``.safetensors``, no torch needed).

timm's module tree (ported from Keras by Cadene) names things by position; ours names them by
role. The mapping (``n`` = block number from 1, ``j`` = separable convolution in the block):

===========================================  ================================================
NNX path (``xception.py``)                   timm state-dict key
===========================================  ================================================
``entry_conv1`` / ``entry_bn1``              ``conv1`` / ``bn1``
``entry_conv2`` / ``entry_bn2``              ``conv2`` / ``bn2``
``blocks/{n-1}/skip`` / ``skip_bn``          ``block{n}.skip`` / ``block{n}.skipbn``
``blocks/{n-1}/separable/{j}/depthwise``     ``block{n}.rep.{3j+o}.conv1``
``blocks/{n-1}/separable/{j}/pointwise``     ``block{n}.rep.{3j+o}.pointwise``
``blocks/{n-1}/bn/{j}``                      ``block{n}.rep.{3j+o+1}``
``exit_separable1`` / ``exit_bn1``           ``conv3`` (``.conv1``, ``.pointwise``) / ``bn3``
``exit_separable2`` / ``exit_bn2``           ``conv4`` (``.conv1``, ``.pointwise``) / ``bn4``
``fc``                                       ``fc``
===========================================  ================================================

``o`` is 1 when the block's ``rep`` starts with a ReLU module (every block but the first) and 0
otherwise: timm's ``rep`` is one ``nn.Sequential`` of ReLU, separable conv, batch norm, ....

Layouts: a convolution weight ``(out, in/groups, kh, kw)`` becomes a Flax kernel
``(kh, kw, in/groups, out)`` (a depthwise one ``(C, 1, 3, 3)`` -> ``(3, 3, 1, C)``); the
classifier ``(out, in)`` becomes ``(in, out)``; batch norm ``weight``/``bias``/``running_mean``/
``running_var`` become ``scale``/``bias``/``mean``/``var``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from recipes.vision import weights, xception

_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
               "var": "running_var"}
_TOP_LEVEL = {"entry_conv1": "conv1", "entry_bn1": "bn1", "entry_conv2": "conv2",
              "entry_bn2": "bn2", "exit_separable1": "conv3", "exit_bn1": "bn3",
              "exit_separable2": "conv4", "exit_bn2": "bn4", "fc": "fc"}
_SEPARABLE_PARTS = {"depthwise": "conv1", "pointwise": "pointwise"}


def timm_key(nnx_path: tuple[Any, ...]) -> str:
    """The timm key of one NNX leaf: ``('blocks', 3, 'bn', 1, 'var')`` -> ``'block4.rep.5.running_var'``."""
    *modules, leaf = nnx_path
    head, *rest = modules
    if head in _TOP_LEVEL:
        parts = [_TOP_LEVEL[head]] + [_SEPARABLE_PARTS[p] for p in rest]
    elif head == "blocks":
        block_index, kind, *rest = rest
        parts = [f"block{int(block_index) + 1}"]
        rep_offset = 0 if int(block_index) == 0 else 1  # the first block's rep has no leading ReLU
        if kind == "skip":
            parts.append("skip")
        elif kind == "skip_bn":
            parts.append("skipbn")
        elif kind == "separable":
            conv_index, part = rest
            parts += ["rep", str(3 * int(conv_index) + rep_offset), _SEPARABLE_PARTS[part]]
        elif kind == "bn":
            (norm_index,) = rest
            parts += ["rep", str(3 * int(norm_index) + rep_offset + 1)]
        else:
            raise KeyError(f"no timm name for {'/'.join(map(str, nnx_path))}")
    else:
        raise KeyError(f"no timm name for {'/'.join(map(str, nnx_path))}")
    return ".".join(parts + [_LEAF_NAMES[leaf]])


def import_timm_state_dict(model: xception.Xception, state_dict: dict[str, np.ndarray]) -> None:
    """Copies a timm ``legacy_xception`` state dict into ``model`` in place.

    Raises:
        ValueError: a key is missing or unexpected, or a shape does not match; the message names
            the timm key, the NNX path and both shapes.
    """
    weights.import_state_dict(model, state_dict, timm_key, "timm")


def export_timm_state_dict(model: xception.Xception) -> dict[str, np.ndarray]:
    """The inverse of `import_timm_state_dict`: torch layouts under timm's key names."""
    return weights.export_state_dict(model, timm_key)
