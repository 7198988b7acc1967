"""The encoder-decoder Transformer of fairseq's ``transformer_vaswani_wmt_en_de_big``, in Flax NNX.

Architecture (Vaswani et al. 2017, as fairseq builds it):

- one token embedding shared by the encoder input, the decoder input and the output projection
  (fairseq's ``--share-all-embeddings``), scaled by ``sqrt(d_model)``, plus sinusoidal positions
  (no parameters);
- ``encoder_layers`` layers of self-attention + ReLU feed-forward, ``decoder_layers`` layers of
  causal self-attention + encoder-decoder attention + feed-forward;
- post-norm residual blocks (``x = LayerNorm(x + sublayer(x))``), fairseq's default for this
  architecture (``normalize_before=False``); ``normalize_before=True`` gives pre-norm blocks and
  a final LayerNorm after each stack, as fairseq does;
- every projection is an ``nnx.Linear`` with a bias and an ``(in, out)`` kernel: ``q_proj``,
  ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``, ``fc2``. Their reduction (input) axis is axis 0,
  the axis 2:4 pruning groups run along.

``big`` is ``d_model`` 1024, FFN 4096, 16 heads, dropout 0.3; ``base`` is 512 / 2048 / 8 heads,
dropout 0.1; both 6 + 6 layers. With a 32,768-token joint vocabulary ``big`` has 209,911,808
parameters (tests/test_recipes_transformer.py derives the figure from the architecture).

Decoding: ``encode`` once, then ``decode_step`` one token at a time with a key/value cache
(``init_cache``): self-attention keys and values of earlier positions are stored, and the
encoder-side keys and values of every cross-attention are computed once. ``decode`` runs the
whole target at once (training, and the reference the cached path is tested against).
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


# fairseq's architectures (fairseq/models/transformer/transformer_legacy.py).
BIG = dict(d_model=1024, ffn_dim=4096, num_heads=16, encoder_layers=6, decoder_layers=6,
           dropout=0.3)  # transformer_vaswani_wmt_en_de_big
BASE = dict(d_model=512, ffn_dim=2048, num_heads=8, encoder_layers=6, decoder_layers=6,
            dropout=0.1)  # transformer_wmt_en_de
SIZES = {"big": BIG, "base": BASE}


def transformer_config(size: str, vocab_size: int, **overrides) -> TransformerConfig:
    """``big`` or ``base`` (fairseq's sizes) for ``vocab_size`` tokens, with ``overrides``."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(SIZES)}")
    return TransformerConfig(vocab_size=vocab_size, **{**SIZES[size], **overrides})


def sinusoidal_positions(length: int, dim: int, offset: Any = 0) -> jax.Array:
    """fairseq's sinusoidal table: ``[sin(p * f_i) | cos(p * f_i)]``, ``f_i = 10000^(-i/(d/2-1))``."""
    half = dim // 2
    frequencies = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / max(half - 1, 1)))
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
    """Scaled dot-product attention over ``num_heads`` heads; ``q/k/v/out_proj`` are ``(in, out)``."""

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
        """Queries from ``x (B, T, d)``; ``mask (B, 1|heads, T, S)`` is True where attention is allowed."""
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
        """``self_kv``: a function of the (normed) input giving this layer's self-attention keys/values."""
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

    # -- shared pieces ------------------------------------------------------------------------

    def _embed(self, tokens: jax.Array, offset: Any, drop: _DropoutKeys) -> jax.Array:
        x = self.embed_tokens(tokens) * math.sqrt(self.cfg.d_model)
        x = x + sinusoidal_positions(tokens.shape[1], self.cfg.d_model, offset).astype(x.dtype)
        return drop(x, self.cfg.dropout)

    def _output_logits(self, x: jax.Array) -> jax.Array:
        if self.cfg.normalize_before:
            x = self.decoder_layer_norm(x)
        return self.embed_tokens.attend(x).astype(jnp.float32)  # the tied output projection

    # -- encoder ------------------------------------------------------------------------------

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

    # -- decoder, whole sequence --------------------------------------------------------------

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

    # -- decoder, one token at a time ---------------------------------------------------------

    def init_cache(self, encoded: jax.Array, src: jax.Array, max_length: int) -> dict[str, Any]:
        """The decoding cache for ``max_length`` target positions of a batch of sources.

        ``self_k``/``self_v`` ``(B, layers, max_length, heads, head_dim)`` fill up as tokens are
        decoded; ``cross_k``/``cross_v`` hold every layer's projection of the encoder states.
        Every leaf has the batch first, so that beam search can reorder the rows.
        """
        batch, heads, head_dim = encoded.shape[0], self.cfg.num_heads, self.cfg.d_model // self.cfg.num_heads
        cross = [layer.encoder_attn.keys_values(encoded) for layer in self.decoder_layers]
        empty = jnp.zeros((batch, len(self.decoder_layers), max_length, heads, head_dim),
                          encoded.dtype)
        return {"self_k": empty, "self_v": empty,
                "cross_k": jnp.stack([k for k, _ in cross], axis=1),
                "cross_v": jnp.stack([v for _, v in cross], axis=1),
                "src_mask": src != self.cfg.pad_id}

    def decode_step(self, tokens: jax.Array, position: Any,
                    cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        """``tokens (B,)`` at target ``position`` -> next-token logits ``(B, vocab)`` and the new cache."""
        drop = _DropoutKeys(None)
        max_length = cache["self_k"].shape[2]
        self_mask = (jnp.arange(max_length) <= position)[None, None, None, :]
        cross_mask = cache["src_mask"][:, None, None, :]
        x = self._embed(tokens[:, None], position, drop)
        new_k, new_v = [], []
        for index, layer in enumerate(self.decoder_layers):
            def cached_kv(h, index=index, layer=layer):
                keys, values = layer.self_attn.keys_values(h)  # (B, 1, heads, head_dim)
                at = (0, position, 0, 0)
                keys = jax.lax.dynamic_update_slice(cache["self_k"][:, index], keys.astype(
                    cache["self_k"].dtype), at)
                values = jax.lax.dynamic_update_slice(cache["self_v"][:, index], values.astype(
                    cache["self_v"].dtype), at)
                new_k.append(keys)
                new_v.append(values)
                return keys, values

            x = layer(x, cached_kv, self_mask, (cache["cross_k"][:, index], cache["cross_v"][:, index]),
                      cross_mask, drop)
        cache = {**cache, "self_k": jnp.stack(new_k, axis=1), "self_v": jnp.stack(new_v, axis=1)}
        return self._output_logits(x)[:, 0], cache


def count_parameters(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
