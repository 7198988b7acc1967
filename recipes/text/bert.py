"""BERT in Flax NNX (encoder, span head, masked-LM head) and Hugging Face checkpoints.

The layers follow Hugging Face's ``BertModel`` exactly (post-LayerNorm, erf GELU, learned
positions, token types, tanh pooler), so its weights give its logits. Linear kernels are ``(in,
out)`` (Hugging Face stores ``(out, in)``): 2:4 groups along the input run along axis 0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture (Hugging Face ``config.json`` names in the comments)."""

    vocab_size: int = 30522
    hidden_size: int = 1024
    num_layers: int = 24  # num_hidden_layers
    num_heads: int = 16  # num_attention_heads
    intermediate_size: int = 4096
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1  # hidden_dropout_prob
    attention_dropout: float = 0.1  # attention_probs_dropout_prob
    initializer_range: float = 0.02  # std of the normal initialisation of kernels and tables

    def replace(self, **changes: Any) -> "BertConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_json(cls, path: str) -> "BertConfig":
        with open(path) as f:
            hf = json.load(f)
        for key, expected in (("model_type", "bert"), ("hidden_act", "gelu"),
                              ("position_embedding_type", "absolute")):
            if hf.get(key, expected) != expected:
                raise ValueError(f"{path}: {key} {hf[key]!r}; only {expected!r} is implemented")
        names = list(_HF_CONFIG_NAMES.items())
        missing = [name for _, name in names[:5] if name not in hf]  # the rest have defaults
        if missing:
            raise KeyError(f"{path}: no {', '.join(missing)}")
        return cls(**{field: hf.get(name, getattr(cls, field)) for field, name in names})

    def to_hf_json(self) -> dict[str, Any]:
        return {"model_type": "bert", "architectures": ["BertForQuestionAnswering"],
                "hidden_act": "gelu",
                **{hf_name: getattr(self, field) for field, hf_name in _HF_CONFIG_NAMES.items()}}


# Field -> Hugging Face config.json name.
_HF_CONFIG_NAMES = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps", "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob", "initializer_range": "initializer_range"}

# Google's released sizes (BERT-Large/Base and the "well-read students" miniatures).
SIZES = {
    "large": BertConfig(),
    "base": BertConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "medium": BertConfig(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048),
    "small": BertConfig(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    "mini": BertConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "tiny": BertConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
}

# Every encoder Linear 2:4 along its input dimension (axis 0 of an (in, out) kernel); all else
# dense, each with its reason in the sparsity report.
PRUNING_RULES = (
    (r"^bert/encoder/layers/\d+/(query|key|value|attention_output|intermediate|output)/kernel$", 0),
    (r"layer_norm", "skip"),  # per-feature scale and shift
    (r"embeddings", "skip"),  # lookups, not matmuls
    (r"^bert/pooler/", "skip"),  # unused by the span head; kept dense as in NVIDIA's recipe
    (r"^qa_outputs/", "skip"),  # the 2-column span head: tiny, and its outputs are the answer
    (r"^mlm_", "skip"),  # pre-training head
    (r"/bias$", "skip"),
)


class _Linear(nnx.Linear):
    def __init__(self, din: int, dout: int, dtype: Any, rngs: nnx.Rngs, stddev: float):
        super().__init__(din, dout, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=nnx.initializers.normal(stddev),
                         bias_init=nnx.initializers.zeros, rngs=rngs)


def _layer_norm(config: BertConfig, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Statistics in float32 whatever the compute dtype (bf16 variance loses too much).
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=rngs)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _fold(rng: jax.Array | None, data: int) -> jax.Array | None:
    return None if rng is None else jax.random.fold_in(rng, data)


class Embeddings(nnx.Module):
    def __init__(self, config: BertConfig, dtype: Any, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        embed = lambda n: nnx.Embed(n, config.hidden_size, embedding_init=init,
                                    param_dtype=jnp.float32, rngs=rngs)
        self.word_embeddings = embed(config.vocab_size)
        self.position_embeddings = embed(config.max_position_embeddings)
        self.token_type_embeddings = embed(config.type_vocab_size)
        self.layer_norm = _layer_norm(config, dtype, rngs)
        self.dropout_rate = config.hidden_dropout
        self.dtype = dtype

    def __call__(self, input_ids, token_type_ids, dropout_rng=None):
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        x = self.layer_norm(x).astype(self.dtype)
        return _dropout(x, self.dropout_rate, dropout_rng)


class EncoderLayer(nnx.Module):
    """Self-attention and feed-forward, each followed by dropout, residual and LayerNorm."""

    def __init__(self, config: BertConfig, dtype: Any, rngs: nnx.Rngs):
        h, f = config.hidden_size, config.intermediate_size
        if h % config.num_heads:
            raise ValueError(f"hidden_size {h} is not a multiple of num_heads {config.num_heads}")
        self.num_heads = config.num_heads
        linear = lambda din, dout: _Linear(din, dout, dtype, rngs, config.initializer_range)
        self.query, self.key, self.value, self.attention_output = (linear(h, h) for _ in range(4))
        self.attention_layer_norm = _layer_norm(config, dtype, rngs)
        self.intermediate, self.output = linear(h, f), linear(f, h)
        self.output_layer_norm = _layer_norm(config, dtype, rngs)
        self.hidden_dropout = config.hidden_dropout
        self.attention_dropout = config.attention_dropout
        self.dtype = dtype

    def __call__(self, x, attention_bias, dropout_rng=None):
        batch, length, hidden = x.shape
        heads = self.num_heads
        split = lambda t: t.reshape(batch, length, heads, hidden // heads)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        scores = scores / math.sqrt(hidden // heads) + attention_bias
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = _dropout(probs, self.attention_dropout, _fold(dropout_rng, 0))
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, hidden)
        attended = _dropout(self.attention_output(context), self.hidden_dropout,
                            _fold(dropout_rng, 1))
        x = self.attention_layer_norm(x + attended).astype(self.dtype)
        inner = jax.nn.gelu(self.intermediate(x), approximate=False)
        out = _dropout(self.output(inner), self.hidden_dropout, _fold(dropout_rng, 2))
        return self.output_layer_norm(x + out).astype(self.dtype)


class BertModel(nnx.Module):
    def __init__(self, config: BertConfig, dtype: Any, rngs: nnx.Rngs):
        self.embeddings = Embeddings(config, dtype, rngs)
        self.encoder = nnx.Module()
        self.encoder.layers = nnx.List([EncoderLayer(config, dtype, rngs)
                                        for _ in range(config.num_layers)])
        self.pooler = _Linear(config.hidden_size, config.hidden_size, dtype, rngs,
                              config.initializer_range)

    def __call__(self, input_ids, token_type_ids, attention_mask, dropout_rng=None):
        """Hidden states ``[batch, length, hidden]`` (the pooler is kept for the HF layout)."""
        # 0 where attended, a large negative number on padding (float32, added to the scores).
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)
        x = self.embeddings(input_ids, token_type_ids, _fold(dropout_rng, 0))
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x, bias, _fold(dropout_rng, i + 1))
        return x


class BertForQuestionAnswering(nnx.Module):
    """BERT with a linear span head: start and end logits for every token."""

    def __init__(self, config: BertConfig, dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.bert = BertModel(config, dtype, rngs)
        self.qa_outputs = _Linear(config.hidden_size, 2, dtype, rngs, config.initializer_range)

    def __call__(self, input_ids, token_type_ids, attention_mask, dropout_rng=None):
        hidden = self.bert(input_ids, token_type_ids, attention_mask, dropout_rng)
        logits = self.qa_outputs(hidden).astype(jnp.float32)
        # Padding can never be an answer boundary.
        logits = jnp.where(attention_mask[..., None] > 0, logits, -1e9)
        return logits[..., 0], logits[..., 1]


class BertForMaskedLM(nnx.Module):
    """BERT with the masked-LM head (transform, LayerNorm, decoder tied to the word embeddings)."""

    def __init__(self, config: BertConfig, dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.bert = BertModel(config, dtype, rngs)
        self.mlm_transform = _Linear(config.hidden_size, config.hidden_size, dtype, rngs,
                                     config.initializer_range)
        self.mlm_layer_norm = _layer_norm(config, dtype, rngs)
        self.mlm_bias = nnx.Param(jnp.zeros((config.vocab_size,), jnp.float32))
        self.dtype = dtype

    def __call__(self, input_ids, token_type_ids, attention_mask, masked_positions,
                 dropout_rng=None):
        """Vocabulary logits at ``masked_positions`` (``[batch, num_masked]`` token indices)."""
        hidden = self.bert(input_ids, token_type_ids, attention_mask, dropout_rng)
        picked = jnp.take_along_axis(hidden, masked_positions[..., None], axis=1)
        x = self.mlm_layer_norm(jax.nn.gelu(self.mlm_transform(picked), approximate=False))
        table = self.bert.embeddings.word_embeddings.embedding[...].astype(self.dtype)
        return (x.astype(self.dtype) @ table.T).astype(jnp.float32) + self.mlm_bias[...]


def num_parameters(model_or_params) -> int:
    if isinstance(model_or_params, nnx.Module):
        model_or_params = nnx.state(model_or_params, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(model_or_params)))


def _hf_names(num_layers: int) -> list[tuple[tuple, str, bool]]:
    """``(params path, Hugging Face name, is a Linear weight)`` for every BERT-QA parameter."""
    names = []

    def add(path: tuple, hf: str, weight: str) -> None:  # weight: "kernel" (Linear) or "scale"
        names.append((path + (weight,), hf + ".weight", weight == "kernel"))
        names.append((path + ("bias",), hf + ".bias", False))

    linear = lambda path, hf: add(path, hf, "kernel")
    norm = lambda path, hf: add(path, hf, "scale")

    for table in ("word", "position", "token_type"):
        names.append((("bert", "embeddings", f"{table}_embeddings", "embedding"),
                      f"bert.embeddings.{table}_embeddings.weight", False))
    norm(("bert", "embeddings", "layer_norm"), "bert.embeddings.LayerNorm")
    for i in range(num_layers):
        ours, hf = ("bert", "encoder", "layers", i), f"bert.encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            linear(ours + (proj,), f"{hf}.attention.self.{proj}")
        linear(ours + ("attention_output",), f"{hf}.attention.output.dense")
        norm(ours + ("attention_layer_norm",), f"{hf}.attention.output.LayerNorm")
        linear(ours + ("intermediate",), f"{hf}.intermediate.dense")
        linear(ours + ("output",), f"{hf}.output.dense")
        norm(ours + ("output_layer_norm",), f"{hf}.output.LayerNorm")
    linear(("bert", "pooler"), "bert.pooler.dense")
    linear(("qa_outputs",), "qa_outputs")
    return names


# Parts a pre-trained (not yet fine-tuned) or a pooler-less checkpoint may lack.
_OPTIONAL_PREFIXES = ("bert.pooler.", "qa_outputs.")


def _canonical_hf_name(name: str) -> str:
    # BertModel checkpoints have no "bert." prefix; TF-converted ones say gamma/beta.
    if not name.startswith(("bert.", "qa_outputs.", "cls.")):
        name = "bert." + name
    for tf_name, hf_name in (("gamma", "weight"), ("beta", "bias")):
        if name.endswith("LayerNorm." + tf_name):
            name = name[: -len(tf_name)] + hf_name
    return name


def _get(tree: dict, path: tuple):
    return functools.reduce(operator.getitem, path, tree)


def params_from_hf(state_dict: dict[str, np.ndarray], like: dict) -> tuple[dict, list[str]]:
    """``(params, notes)``: ``like`` (a QA model's pure params dict) with the values of a Hugging
    Face state dict; notes name what was kept from ``like`` (pooler, span head) and the unused
    entries (pre-training heads). Raises on a missing encoder weight or a shape mismatch."""
    num_layers = len(like["bert"]["encoder"]["layers"])
    state = {_canonical_hf_name(k): v for k, v in state_dict.items()}
    params = jax.tree.map(lambda x: x, like)
    used, kept = set(), []
    for path, hf, is_linear in _hf_names(num_layers):
        target = _get(like, path)
        if hf not in state:
            if hf.startswith(_OPTIONAL_PREFIXES):
                kept.append(hf)
                continue
            raise KeyError(f"the checkpoint has no {hf!r} (is it a BERT with {num_layers} layers?)")
        value = np.asarray(state[hf], dtype=np.float32)
        if is_linear:
            value = value.T  # (out, in) -> (in, out)
        if value.shape != tuple(target.shape):
            raise ValueError(f"{hf}: shape {value.shape} (after transposing Linear weights), "
                             f"the model expects {tuple(target.shape)}")
        _get(params, path[:-1])[path[-1]] = jnp.asarray(value)
        used.add(hf)
    notes = []
    if kept:
        notes.append("not in the checkpoint, initialised: " + ", ".join(
            sorted({k.rsplit(".", 1)[0] for k in kept})))
    unused = sorted(k for k in state if k not in used and not k.endswith("position_ids"))
    if unused:
        heads = sorted({".".join(k.split(".")[:2]) for k in unused})
        notes.append(f"unused checkpoint entries ({len(unused)}): " + ", ".join(heads))
    return params, notes


def params_to_hf(params: dict) -> dict[str, np.ndarray]:
    """A Hugging Face ``BertForQuestionAnswering`` state dict (Linear weights ``(out, in)``)."""
    num_layers = len(params["bert"]["encoder"]["layers"])
    out = {}
    for path, hf, is_linear in _hf_names(num_layers):
        value = np.asarray(_get(params, path), dtype=np.float32)
        out[hf] = np.ascontiguousarray(value.T if is_linear else value)
    return out


def read_hf_state_dict(directory: str) -> dict[str, np.ndarray]:
    """``model.safetensors`` (preferred) or ``pytorch_model.bin`` (needs torch) as NumPy arrays."""
    safetensors_path = os.path.join(directory, "model.safetensors")
    torch_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(safetensors_path):
        from safetensors.numpy import load_file

        try:
            return load_file(safetensors_path)
        except TypeError:  # bf16 tensors: numpy cannot hold them, torch can
            pass
    elif not os.path.exists(torch_path):
        raise FileNotFoundError(f"{directory}: neither model.safetensors nor pytorch_model.bin")
    try:
        import torch
        from safetensors.torch import load_file as load_torch
    except ImportError as error:
        raise ImportError(f"{directory}: reading pytorch_model.bin (or a bf16 safetensors file) "
                          "needs torch; or convert it once to float32 model.safetensors") from error
    tensors = (load_torch(safetensors_path) if os.path.exists(safetensors_path) else
               torch.load(torch_path, map_location="cpu", weights_only=True))
    return {k: v.float().numpy() for k, v in tensors.items()}


def load_hf_checkpoint(directory: str) -> tuple[BertConfig, dict[str, np.ndarray], str]:
    """``(config, state dict, vocab.txt path)`` of a local Hugging Face BERT directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory (expected a Hugging Face BERT "
                                "checkpoint: config.json, vocab.txt, model.safetensors)")
    for name in ("config.json", "vocab.txt"):
        if not os.path.exists(os.path.join(directory, name)):
            raise FileNotFoundError(f"{directory}: no {name}")
    config = BertConfig.from_hf_json(os.path.join(directory, "config.json"))
    return config, read_hf_state_dict(directory), os.path.join(directory, "vocab.txt")


def save_hf_checkpoint(directory: str, config: BertConfig, params: dict,
                       vocab_path: str | None = None) -> None:
    """Writes ``config.json``, ``model.safetensors`` (and a copy of ``vocab.txt``)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_hf_json(), f, indent=2)
    save_file(params_to_hf(params), os.path.join(directory, "model.safetensors"))
    if vocab_path:
        shutil.copyfile(vocab_path, os.path.join(directory, "vocab.txt"))
