"""fairseq's encoder-decoder Transformer (``transformer_vaswani_wmt_en_de_big``) in Flax NNX.

As fairseq builds it: one token embedding shared by encoder, decoder and the output projection
(``--share-all-embeddings``), scaled by ``sqrt(d_model)``, plus sinusoidal positions; post-norm
blocks (``normalize_before=True``: pre-norm with a final LayerNorm per stack); ReLU feed-forward.
Every projection (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``, ``fc2``) is an
``nnx.Linear`` with an ``(in, out)`` kernel, so 2:4 groups run along axis 0. ``big`` at a
32,768-token vocabulary has 209,911,808 parameters. ``decode_step`` decodes one token at a time
with a key/value cache (``init_cache``); ``decode`` runs the whole target (training).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and regularisation of the model (fairseq argument names in comments)."""

    vocab_size: int
    d_model: int = 512  # encoder_embed_dim = decoder_embed_dim
    ffn_dim: int = 2048  # encoder_ffn_embed_dim
    num_heads: int = 8  # encoder_attention_heads
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    normalize_before: bool = False  # False: post-norm, as transformer_vaswani_wmt_en_de_big
    pad_id: int = 0
    dtype: str = "float32"  # compute dtype; parameters stay float32

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model {self.d_model} must be even (sinusoidal positions)")
        for name in ("vocab_size", "d_model", "ffn_dim", "num_heads", "encoder_layers",
                     "decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# fairseq's transformer_vaswani_wmt_en_de_big and transformer_wmt_en_de (transformer_legacy.py).
SIZES = {"big": dict(d_model=1024, ffn_dim=4096, num_heads=16, dropout=0.3),
         "base": dict(d_model=512, ffn_dim=2048, num_heads=8, dropout=0.1)}


def transformer_config(size: str, vocab_size: int, **overrides) -> TransformerConfig:
    """``big`` or ``base`` (fairseq's sizes) for ``vocab_size`` tokens, with ``overrides``."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(SIZES)}")
    return TransformerConfig(vocab_size=vocab_size, **{**SIZES[size], **overrides})


def sinusoidal_positions(length: int, dim: int, offset: Any = 0) -> jax.Array:
    """fairseq's sinusoidal table ``[sin(p * f_i) | cos(p * f_i)]``, ``f_i = 10000^(-i/(d/2-1))``"""
    half = dim // 2
    step = -(math.log(10000.0) / max(half - 1, 1))
    frequencies = jnp.exp(jnp.arange(half, dtype=jnp.float32) * step)
    positions = (jnp.arange(length, dtype=jnp.float32) + offset)[:, None] * frequencies[None, :]
    return jnp.concatenate([jnp.sin(positions), jnp.cos(positions)], axis=-1)


class _DropoutKeys:
    """A fresh key per dropout site, derived at trace time; ``None`` means no dropout."""

    def __init__(self, key: jax.Array | None):
        self.key, self.count = key, 0

    def __call__(self, x: jax.Array, rate: float) -> jax.Array:
        if self.key is None or rate <= 0.0:
            return x
        self.count += 1
        keep = jax.random.bernoulli(jax.random.fold_in(self.key, self.count), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    # fairseq initialises these with Xavier-uniform weights and zero biases.
    return nnx.Linear(d_in, d_out, kernel_init=nnx.initializers.xavier_uniform(),
                      bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                      param_dtype=jnp.float32, rngs=rngs)


class MultiHeadAttention(nnx.Module):
    """Scaled dot-product attention over ``num_heads`` heads."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_dim, self.dropout = num_heads, d_model // num_heads, dropout
        self.q_proj = _linear(d_model, d_model, dtype, rngs)
        self.k_proj = _linear(d_model, d_model, dtype, rngs)
        self.v_proj = _linear(d_model, d_model, dtype, rngs)
        self.out_proj = _linear(d_model, d_model, dtype, rngs)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def keys_values(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``memory (B, S, d)`` -> keys and values ``(B, S, heads, head_dim)``."""
        return self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))

    def attend(self, x: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
               drop: _DropoutKeys) -> jax.Array:
        """Queries from ``x (B, T, d)``; ``mask (B, 1|heads, T, S)`` True where attention goes."""
        queries = self._heads(self.q_proj(x)) * (self.head_dim ** -0.5)
        scores = jnp.einsum("bthd,bshd->bhts", queries, keys).astype(jnp.float32)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = drop(jax.nn.softmax(scores, axis=-1), self.dropout).astype(values.dtype)
        context = jnp.einsum("bhts,bshd->bthd", weights, values)
        return self.out_proj(context.reshape(*context.shape[:-2], -1))

    def __call__(self, x: jax.Array, memory: jax.Array, mask: jax.Array,
                 drop: _DropoutKeys) -> jax.Array:
        keys, values = self.keys_values(memory)
        return self.attend(x, keys, values, mask, drop)


class FeedForward(nnx.Module):
    def __init__(self, d_model: int, ffn_dim: int, dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(d_model, ffn_dim, dtype, rngs)
        self.fc2 = _linear(ffn_dim, d_model, dtype, rngs)

    def __call__(self, x: jax.Array, activation_dropout: float, drop: _DropoutKeys) -> jax.Array:
        return self.fc2(drop(jax.nn.relu(self.fc1(x)), activation_dropout))


def _layer_norm(d_model: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(d_model, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class _Sublayers(nnx.Module):
    """Post-norm (``LN(x + f(x))``) or pre-norm (``x + f(LN(x))``) residual wrapping."""

    cfg: TransformerConfig

    def residual(self, x: jax.Array, norm: nnx.LayerNorm, fn, drop: _DropoutKeys) -> jax.Array:
        if self.cfg.normalize_before:
            return x + drop(fn(norm(x)), self.cfg.dropout)
        return norm(x + drop(fn(x), self.cfg.dropout))


class EncoderLayer(_Sublayers):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.cfg, dtype = cfg, jnp.dtype(cfg.dtype)
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout,
                                            dtype, rngs)
        self.self_attn_layer_norm = _layer_norm(cfg.d_model, dtype, rngs)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, dtype, rngs)
        self.final_layer_norm = _layer_norm(cfg.d_model, dtype, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, drop: _DropoutKeys) -> jax.Array:
        x = self.residual(x, self.self_attn_layer_norm,
                          lambda h: self.self_attn(h, h, mask, drop), drop)
        return self.residual(x, self.final_layer_norm,
                             lambda h: self.ffn(h, self.cfg.activation_dropout, drop), drop)


class DecoderLayer(_Sublayers):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.cfg, dtype = cfg, jnp.dtype(cfg.dtype)
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout,
                                            dtype, rngs)
        self.self_attn_layer_norm = _layer_norm(cfg.d_model, dtype, rngs)
        self.encoder_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout,
                                               dtype, rngs)
        self.encoder_attn_layer_norm = _layer_norm(cfg.d_model, dtype, rngs)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, dtype, rngs)
        self.final_layer_norm = _layer_norm(cfg.d_model, dtype, rngs)

    def __call__(self, x, self_kv, self_mask, cross_kv, cross_mask, drop: _DropoutKeys):
        """``self_kv``: (normed) input -> this layer's self-attention keys and values."""
        def self_attention(h):
            keys, values = self_kv(h)
            return self.self_attn.attend(h, keys, values, self_mask, drop)

        x = self.residual(x, self.self_attn_layer_norm, self_attention, drop)
        x = self.residual(x, self.encoder_attn_layer_norm,
                          lambda h: self.encoder_attn.attend(h, *cross_kv, cross_mask, drop), drop)
        return self.residual(x, self.final_layer_norm,
                             lambda h: self.ffn(h, self.cfg.activation_dropout, drop), drop)


class Transformer(nnx.Module):
    """Encoder-decoder Transformer with shared (tied) embeddings; see the module docstring."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg, dtype = cfg, jnp.dtype(cfg.dtype)
        # fairseq: N(0, d^-1/2) embeddings with a zero padding row.
        embedding_init = nnx.initializers.normal(cfg.d_model ** -0.5)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=lambda *a: embedding_init(*a).at[cfg.pad_id].set(0.0))
        self.encoder_layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.encoder_layers)])
        self.decoder_layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.decoder_layers)])
        if cfg.normalize_before:
            self.encoder_layer_norm = _layer_norm(cfg.d_model, dtype, rngs)
            self.decoder_layer_norm = _layer_norm(cfg.d_model, dtype, rngs)

    def _embed(self, tokens: jax.Array, offset: Any, drop: _DropoutKeys) -> jax.Array:
        x = self.embed_tokens(tokens) * math.sqrt(self.cfg.d_model)
        x = x + sinusoidal_positions(tokens.shape[1], self.cfg.d_model, offset).astype(x.dtype)
        return drop(x, self.cfg.dropout)

    def _output_logits(self, x: jax.Array) -> jax.Array:
        if self.cfg.normalize_before:
            x = self.decoder_layer_norm(x)
        return self.embed_tokens.attend(x).astype(jnp.float32)  # the tied output projection

    def encode(self, src: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """``src (B, S)`` int tokens (``pad_id`` padded) -> encoder states ``(B, S, d)``."""
        drop = _DropoutKeys(dropout_rng)
        mask = (src != self.cfg.pad_id)[:, None, None, :]
        x = self._embed(src, 0, drop)
        for layer in self.encoder_layers:
            x = layer(x, mask, drop)
        if self.cfg.normalize_before:
            x = self.encoder_layer_norm(x)
        return x

    def decode(self, prev_tokens: jax.Array, encoded: jax.Array, src: jax.Array,
               dropout_rng: jax.Array | None = None) -> jax.Array:
        """Teacher-forced decoder: ``prev_tokens (B, T)`` -> next-token logits ``(B, T, vocab)``."""
        drop = _DropoutKeys(dropout_rng)
        length = prev_tokens.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        cross_mask = (src != self.cfg.pad_id)[:, None, None, :]
        x = self._embed(prev_tokens, 0, drop)
        for layer in self.decoder_layers:
            x = layer(x, layer.self_attn.keys_values, causal,
                      layer.encoder_attn.keys_values(encoded), cross_mask, drop)
        return self._output_logits(x)

    def __call__(self, src: jax.Array, prev_tokens: jax.Array,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        enc_rng, dec_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        return self.decode(prev_tokens, self.encode(src, enc_rng), src, dec_rng)

    def init_cache(self, encoded: jax.Array, src: jax.Array, max_length: int) -> dict[str, Any]:
        """The cache for ``max_length`` target positions: ``self_k``/``self_v`` fill up as tokens
        are decoded, ``cross_k``/``cross_v`` hold the encoder side; every leaf batch first."""
        heads = self.cfg.num_heads
        cross = [layer.encoder_attn.keys_values(encoded) for layer in self.decoder_layers]
        empty = jnp.zeros((encoded.shape[0], len(self.decoder_layers), max_length, heads,
                           self.cfg.d_model // heads), encoded.dtype)
        return {"self_k": empty, "self_v": empty,
                "cross_k": jnp.stack([k for k, _ in cross], axis=1),
                "cross_v": jnp.stack([v for _, v in cross], axis=1),
                "src_mask": src != self.cfg.pad_id}

    def decode_step(self, tokens: jax.Array, position: Any,
                    cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        """``tokens (B,)`` at target ``position`` -> next-token logits ``(B, vocab)``, new cache."""
        drop = _DropoutKeys(None)
        max_length = cache["self_k"].shape[2]
        self_mask = (jnp.arange(max_length) <= position)[None, None, None, :]
        cross_mask = cache["src_mask"][:, None, None, :]
        x = self._embed(tokens[:, None], position, drop)
        new_k, new_v = [], []
        for index, layer in enumerate(self.decoder_layers):
            def cached_kv(h, index=index, layer=layer):
                projected = layer.self_attn.keys_values(h)  # (B, 1, heads, head_dim) each
                keys, values = (jax.lax.dynamic_update_slice(
                    cache[name][:, index], new.astype(cache[name].dtype), (0, position, 0, 0))
                    for name, new in zip(("self_k", "self_v"), projected))
                new_k.append(keys)
                new_v.append(values)
                return keys, values

            cross_kv = (cache["cross_k"][:, index], cache["cross_v"][:, index])
            x = layer(x, cached_kv, self_mask, cross_kv, cross_mask, drop)
        cache = {**cache, "self_k": jnp.stack(new_k, axis=1), "self_v": jnp.stack(new_v, axis=1)}
        return self._output_logits(x)[:, 0], cache


def count_parameters(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
