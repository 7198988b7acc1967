"""A decoder-only GPT in Flax NNX with GPT-2's layout and parameter names, and its HF import.

Pre-norm blocks ``h.N`` (``ln_1``, ``attn.c_attn`` (q, k, v in one ``(d, 3d)`` kernel),
``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``), learned positions ``wpe``, ``ln_f`` and
an output projection tied to ``wte``; GELU with the tanh approximation (GPT-2's ``gelu_new``),
LayerNorm epsilon 1e-5. Kernels are ``(in, out)``, as Hugging Face's ``Conv1D`` weights, so a GPT-2
``model.safetensors`` loads without transposes (`load_hf_gpt2`, `save_hf_gpt2`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    dtype: str = "float32"  # compute dtype; parameters are float32

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")


def _dense(cfg: GPTConfig, d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, dtype=jnp.dtype(cfg.dtype), rngs=rngs,
                      kernel_init=nnx.initializers.normal(std))


def _norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.n_embd, epsilon=cfg.layer_norm_epsilon, dtype=jnp.dtype(cfg.dtype),
                         rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        proj_std = 0.02 / np.sqrt(2 * cfg.n_layer)  # GPT-2's scaled init of residual projections
        self.n_head = cfg.n_head
        self.c_attn = _dense(cfg, cfg.n_embd, 3 * cfg.n_embd, 0.02, rngs)
        self.c_proj = _dense(cfg, cfg.n_embd, cfg.n_embd, proj_std, rngs)

    def __call__(self, x):
        batch, length, width = x.shape
        heads = lambda t: t.reshape(batch, length, self.n_head, width // self.n_head)
        q, k, v = (heads(t) for t in jnp.split(self.c_attn(x), 3, axis=-1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        return self.c_proj(out)


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.c_fc = _dense(cfg, cfg.n_embd, 4 * cfg.n_embd, 0.02, rngs)
        self.c_proj = _dense(cfg, 4 * cfg.n_embd, cfg.n_embd, 0.02 / np.sqrt(2 * cfg.n_layer), rngs)

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.ln_1, self.attn = _norm(cfg, rngs), Attention(cfg, rngs)
        self.ln_2, self.mlp = _norm(cfg, rngs), MLP(cfg, rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
    """``GPT(cfg, rngs)(tokens (B, T) int) -> logits (B, T, vocab) float32``."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        embed = lambda count, std: nnx.Embed(count, cfg.n_embd, dtype=jnp.dtype(cfg.dtype),
                                             embedding_init=nnx.initializers.normal(std), rngs=rngs)
        self.wte, self.wpe = embed(cfg.vocab_size, 0.02), embed(cfg.n_positions, 0.01)
        self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _norm(cfg, rngs)

    def __call__(self, tokens):
        if tokens.shape[-1] > self.cfg.n_positions:
            raise ValueError(f"tokens: {tokens.shape[-1]} positions, the model has "
                             f"{self.cfg.n_positions}")
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[-1]))
        for block in self.h:
            x = block(x)
        return self.wte.attend(self.ln_f(x)).astype(jnp.float32)  # the tied output projection


# -- Hugging Face GPT-2 checkpoints ----------------------------------------------------------
_IGNORED = re.compile(r"(^lm_head\.weight$|\.attn\.(masked_)?bias$)")  # tied head, causal buffers


def _hf_path(key: str) -> tuple:
    """``h.3.attn.c_attn.weight`` -> ``("h", 3, "attn", "c_attn", "kernel")``."""
    parts = key.removeprefix("transformer.").split(".")
    *module, leaf = parts
    if module in (["wte"], ["wpe"]) and leaf == "weight":
        return (module[0], "embedding")
    if not module or leaf not in ("weight", "bias"):
        raise KeyError(key)
    name = "bias" if leaf == "bias" else "scale" if module[-1].startswith("ln_") else "kernel"
    return tuple(int(p) if p.isdigit() else p for p in module) + (name,)


def hf_gpt2_config(path: str, **overrides) -> GPTConfig:
    """The `GPTConfig` of a GPT-2 ``model.safetensors`` (its shapes; ``n_head`` from a
    ``config.json`` beside it, else ``n_embd // 64`` as in every GPT-2 size)."""
    from safetensors import safe_open

    with safe_open(path, "numpy") as f:
        keys = list(f.keys())
        shape = lambda name: f.get_slice(next(k for k in keys if k.endswith(name))).get_shape()
        vocab, width = shape("wte.weight")
        positions = shape("wpe.weight")[0]
    layers = 1 + max(int(m.group(1)) for k in keys if (m := re.search(r"h\.(\d+)\.", k)))
    config_json = os.path.join(os.path.dirname(path), "config.json")
    heads = max(1, width // 64)
    if os.path.isfile(config_json):
        with open(config_json) as f:
            heads = json.load(f).get("n_head", heads)
    return GPTConfig(**{"vocab_size": vocab, "n_positions": positions, "n_embd": width,
                        "n_layer": layers, "n_head": heads, **overrides})


def load_hf_gpt2(path: str, like: dict) -> dict:
    """The params of a Hugging Face GPT-2 ``model.safetensors`` as a pure dict shaped like
    ``like`` (``nnx.to_pure_dict`` of the model's params); a missing, extra or misshaped
    tensor is an error naming it."""
    from safetensors.numpy import load_file

    tensors = load_file(path)
    flat = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]}
    expected = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p): v for p, v in flat.items()}
    loaded = {}
    for key, value in tensors.items():
        if _IGNORED.search(key):
            continue
        try:
            target = _hf_path(key)
        except KeyError:
            raise ValueError(f"{path}: unexpected tensor {key} {value.shape}") from None
        if target not in expected:
            raise ValueError(f"{path}: tensor {key} {value.shape} has no place in the model")
        if tuple(value.shape) != tuple(expected[target].shape):
            raise ValueError(f"{path}: {key} has shape {value.shape}, the model's "
                             f"{'/'.join(map(str, target))} expects {expected[target].shape}")
        loaded[target] = np.asarray(value, np.float32)
    missing = sorted("/".join(map(str, t)) for t in set(expected) - set(loaded))
    if missing:
        raise ValueError(f"{path}: no tensor for {', '.join(missing)}")
    out: dict = {}
    for target, value in loaded.items():
        node = out
        for part in target[:-1]:
            node = node.setdefault(part, {})
        node[target[-1]] = value
    return out


def save_hf_gpt2(params: dict, path: str) -> None:
    """Writes params (a pure dict of this model) as a Hugging Face GPT-2 ``model.safetensors``."""
    from safetensors.numpy import save_file

    tensors = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path]
        tensors[".".join(parts[:-1] + ["bias" if parts[-1] == "bias" else "weight"])] = np.ascontiguousarray(
            np.asarray(jax.device_get(leaf), np.float32))
    save_file(tensors, path, metadata={"format": "pt"})
