"""Beam search over any incremental decoder (jit-compatible, fixed shapes).

A decoder is ``step_fn(tokens (N,), position, state) -> (log_probs (N, vocab), state)``, ``state``
any pytree with the ``N`` rows first (beam search reorders them). A finished hypothesis scores
``log P / length ** length_penalty`` (fairseq's ``--lenpen``; ``length`` counts the ``eos``);
every hypothesis ends with ``eos`` at ``max_length``; the search stops once no live one can
still beat the finished ones (its log-probability only falls).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]]
NEG_INF = -1.0e9  # finite, so that arithmetic on "impossible" scores stays NaN-free


def beam_search(step_fn: StepFn, state: Any, batch_size: int, *, beam_size: int, max_length: int,
                bos_id: int, eos_id: int, length_penalty: float = 0.6,
                pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """The best finished hypothesis per sentence: ``tokens (batch, max_length)`` (``eos``, then
    ``pad_id``) and its score. ``state`` is the decoder's for ``batch_size`` rows (repeated here
    for the ``beam_size`` beams); fairseq's WMT runs use beam 4, length penalty 0.6."""
    if beam_size < 1 or max_length < 1:
        raise ValueError(f"beam_size and max_length must be at least 1, got {beam_size}, "
                         f"{max_length}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0 (the early stop relies on it), got "
                         f"{length_penalty}")
    k, rows = beam_size, batch_size * beam_size
    state = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), state)
    alive_seqs = jnp.full((batch_size, k, max_length), pad_id, jnp.int32)
    # Only the first beam is live at the start, so the first step does not pick k copies.
    alive_log_probs = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch_size, 1))
    finished_seqs = jnp.full((batch_size, k, max_length), pad_id, jnp.int32)
    finished_scores = jnp.full((batch_size, k), NEG_INF, jnp.float32)
    previous = jnp.full((rows,), bos_id, jnp.int32)

    def not_done(carry):
        position, _, _, alive_log_probs, _, finished_scores, _ = carry
        best_possible = alive_log_probs[:, 0] / (max_length ** length_penalty)
        can_improve = jnp.any(best_possible > finished_scores[:, -1])
        return (position < max_length) & can_improve

    def body(carry):
        (position, previous, alive_seqs, alive_log_probs, finished_seqs, finished_scores,
         state) = carry
        log_probs, state = step_fn(previous, position, state)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.astype(jnp.float32).reshape(batch_size, k, vocab)
        # At the last position every hypothesis ends with eos.
        is_eos_column = jnp.arange(vocab) == eos_id
        log_probs = jnp.where((position == max_length - 1) & ~is_eos_column, NEG_INF, log_probs)
        candidates = (alive_log_probs[:, :, None] + log_probs).reshape(batch_size, k * vocab)
        top_scores, top_index = jax.lax.top_k(candidates, 2 * k)
        top_beam, top_token = top_index // vocab, top_index % vocab
        top_seqs = jnp.take_along_axis(alive_seqs, top_beam[:, :, None], axis=1)
        top_seqs = top_seqs.at[:, :, position].set(top_token)
        ends = top_token == eos_id

        # Finished: merge the new eos-terminated candidates into the k best so far.
        normalized = top_scores / ((position + 1.0) ** length_penalty)
        new_finished = jnp.where(ends & (top_scores > NEG_INF / 2), normalized, NEG_INF)
        merged_scores = jnp.concatenate([finished_scores, new_finished], axis=1)
        merged_seqs = jnp.concatenate([finished_seqs, top_seqs], axis=1)
        finished_scores, keep = jax.lax.top_k(merged_scores, k)
        finished_seqs = jnp.take_along_axis(merged_seqs, keep[:, :, None], axis=1)

        # Alive: the k best candidates that did not end.
        alive_scores, keep = jax.lax.top_k(jnp.where(ends, NEG_INF, top_scores), k)
        alive_seqs = jnp.take_along_axis(top_seqs, keep[:, :, None], axis=1)
        source_beam = jnp.take_along_axis(top_beam, keep, axis=1)
        source_rows = (jnp.arange(batch_size)[:, None] * k + source_beam).reshape(rows)
        state = jax.tree.map(lambda x: jnp.take(x, source_rows, axis=0), state)
        previous = jnp.take_along_axis(top_token, keep, axis=1).reshape(rows)
        return (position + 1, previous, alive_seqs, alive_scores, finished_seqs, finished_scores,
                state)

    carry = (jnp.int32(0), previous, alive_seqs, alive_log_probs, finished_seqs, finished_scores,
             state)
    carry = jax.lax.while_loop(not_done, body, carry)
    finished_seqs, finished_scores = carry[4], carry[5]
    return finished_seqs[:, 0], finished_scores[:, 0]
