"""Tests of the Transformer translation recipe (recipes/transformer_wmt.py, issue 8).

References are independent of the code under test: the parameter count of fairseq's big model
derived from its architecture by hand, an exhaustive search over all sequences for beam search,
the whole-sequence decoder for the cached one, BLEU computed from its definition with NumPy,
NumPy checks of the 2:4 pattern.
"""

import collections
import importlib.util
import itertools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import sparse_jax  # noqa: E402
from recipes.engine import workflow  # noqa: E402
from recipes.text import beam_search, transformer, translation_task  # noqa: E402
from recipes.text import translation_data as td  # noqa: E402


@nnx.jit
def forward(model, src, prev, dropout_rng=None):
    return model(src, prev, dropout_rng=dropout_rng)


def tiny_config(**overrides):
    return transformer.TransformerConfig(**{
        "vocab_size": 40, "d_model": 16, "ffn_dim": 32, "num_heads": 4, "encoder_layers": 2,
        "decoder_layers": 2, "dropout": 0.0, **overrides})


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def fairseq_parameter_count(vocab, d, ffn, enc_layers, dec_layers, pre_norm=False):
    """Parameters of fairseq's TransformerModel with --share-all-embeddings, from its modules.

    Attention: 4 Linear(d, d) with bias. FFN: Linear(d, ffn) + Linear(ffn, d). LayerNorm: 2d.
    Encoder layer: attention, FFN, 2 LayerNorms; decoder layer: 2 attentions, FFN, 3 LayerNorms.
    One embedding table (vocab x d) serves encoder, decoder and output projection; sinusoidal
    positions have no parameters; pre-norm adds one final LayerNorm per stack.
    """
    attention = 4 * (d * d + d)
    feed_forward = (d * ffn + ffn) + (ffn * d + d)
    layer_norm = 2 * d
    encoder_layer = attention + feed_forward + 2 * layer_norm
    decoder_layer = 2 * attention + feed_forward + 3 * layer_norm
    final_norms = 2 * layer_norm if pre_norm else 0
    return vocab * d + enc_layers * encoder_layer + dec_layers * decoder_layer + final_norms


def model_parameter_count(config):
    abstract = nnx.eval_shape(lambda: transformer.Transformer(config, rngs=nnx.Rngs(0)))
    return transformer.count_parameters(abstract)


def test_big_model_parameter_count_is_fairseqs():
    expected = fairseq_parameter_count(32768, 1024, 4096, 6, 6)
    # Worked out: 33,554,432 embedding + 6 x 12,596,224 encoder + 6 x 16,796,672 decoder.
    assert expected == 33_554_432 + 6 * 12_596_224 + 6 * 16_796_672 == 209_911_808  # "about 210M"
    assert model_parameter_count(transformer.transformer_config("big", 32768)) == expected


@pytest.mark.slow
def test_base_and_pre_norm_parameter_counts():
    assert (model_parameter_count(transformer.transformer_config("base", 32768))
            == fairseq_parameter_count(32768, 512, 2048, 6, 6))
    config = tiny_config(normalize_before=True, encoder_layers=3)
    assert model_parameter_count(config) == fairseq_parameter_count(40, 16, 32, 3, 2, pre_norm=True)


def test_bad_model_configs_are_rejected():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        tiny_config(num_heads=3)
    with pytest.raises(ValueError, match="unknown model size"):
        transformer.transformer_config("huge", 100)


@pytest.mark.slow
@pytest.mark.parametrize("normalize_before", [False, True])
def test_cached_decoding_equals_full_recomputation(normalize_before):
    config = tiny_config(normalize_before=normalize_before)
    model = transformer.Transformer(config, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    src = rng.integers(4, config.vocab_size, (3, 7)).astype(np.int32)
    src[0, 4:] = config.pad_id  # a padded source: its pads must not be attended to
    prev = rng.integers(4, config.vocab_size, (3, 6)).astype(np.int32)
    full = forward(model, jnp.asarray(src), jnp.asarray(prev))

    cache = nnx.jit(lambda m, s: m.init_cache(m.encode(s), s, max_length=9))(model, jnp.asarray(src))
    step = nnx.jit(lambda m, tokens, position, cache: m.decode_step(tokens, position, cache))
    stepwise = []
    for position in range(prev.shape[1]):
        logits, cache = step(model, jnp.asarray(prev[:, position]), position, cache)
        stepwise.append(logits)
    np.testing.assert_allclose(np.stack(stepwise, axis=1), full, rtol=1e-5, atol=1e-5)
    # The padded source row must give the same logits as the same source without padding.
    alone = forward(model, jnp.asarray(src[:1, :4]), jnp.asarray(prev[:1]))
    np.testing.assert_allclose(alone, full[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_dropout_is_active_only_with_a_key():
    model = transformer.Transformer(tiny_config(dropout=0.3, encoder_layers=1, decoder_layers=1),
                                    rngs=nnx.Rngs(0))
    src, prev = jnp.full((2, 5), 7), jnp.full((2, 4), 9)
    np.testing.assert_array_equal(forward(model, src, prev), forward(model, src, prev))
    assert not np.allclose(forward(model, src, prev, jax.random.key(0)), forward(model, src, prev))


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------

BOS, EOS, PAD = 2, 3, 0


def markov_step_fn(table):
    """A decoder whose next-token distribution depends only on the previous token."""
    log_table = jnp.log(jnp.asarray(table, jnp.float32))

    def step(tokens, position, state):
        return log_table[tokens], state

    return step


def exhaustive_best(table, max_length, length_penalty):
    """The best eos-terminated sequence of at most ``max_length`` tokens, by enumeration."""
    vocab = len(table)
    content = [t for t in range(vocab) if t not in (BOS, EOS, PAD)]
    best, best_score = None, -math.inf
    for length in range(1, max_length + 1):  # tokens including eos
        for body in itertools.product(content, repeat=length - 1):
            sequence = (*body, EOS)
            log_p, previous = 0.0, BOS
            for token in sequence:
                log_p += math.log(table[previous][token]) if table[previous][token] > 0 else -math.inf
                previous = token
            score = log_p / length ** length_penalty
            if score > best_score:
                best, best_score = sequence, score
    return best, best_score


def known_answer_table():
    """From bos, token 4 is likeliest (0.5) but is followed by a flat spread; token 5 (0.4) is
    almost surely followed by eos. Greedy: 4, 4, 4, (forced) eos; the best sentence: [5, eos]."""
    table = np.full((7, 7), 1e-6)
    table[BOS, [4, 5, 6, EOS]] = [0.5, 0.4, 0.05, 0.05]
    table[4, [4, 5, 6, EOS]] = [0.3, 0.25, 0.25, 0.2]
    table[5, [EOS, 4]] = [0.9, 0.1]
    table[6, [EOS, 6]] = [0.5, 0.5]
    return table / table.sum(axis=1, keepdims=True)


def greedy(step, state, batch_size, max_length):
    """The likeliest token at every step (eos forced last), pads after eos; summed log-probs."""
    tokens = jnp.full((batch_size,), BOS, jnp.int32)
    out = np.full((batch_size, max_length), PAD)
    score, done = np.zeros(batch_size), np.zeros(batch_size, bool)
    for position in range(max_length):
        log_probs, state = step(tokens, position, state)
        log_probs = np.asarray(log_probs, np.float64)
        tokens = np.argmax(log_probs, -1) if position < max_length - 1 else np.full(batch_size, EOS)
        score += np.where(done, 0.0, log_probs[np.arange(batch_size), tokens])
        out[:, position] = np.where(done, PAD, tokens)
        done |= tokens == EOS
        tokens = jnp.asarray(tokens, jnp.int32)
    return out, score


def test_beam_search_finds_the_best_sentence_that_greedy_misses():
    table = known_answer_table()
    step = markov_step_fn(table)
    greedy_tokens, greedy_score = greedy(step, None, 1, max_length=4)
    beam, score = jax.jit(lambda: beam_search.beam_search(
        step, None, 1, beam_size=4, max_length=4, bos_id=BOS, eos_id=EOS, pad_id=PAD,
        length_penalty=0.6))()
    assert greedy_tokens[0].tolist() == [4, 4, 4, EOS]  # greedy follows the locally best token
    expected, expected_score = exhaustive_best(table, 4, 0.6)
    assert expected == (5, EOS)
    assert beam[0].tolist() == [5, EOS, PAD, PAD]
    np.testing.assert_allclose(score[0], expected_score, rtol=1e-5)
    assert expected_score > greedy_score[0] / 4 ** 0.6  # greedy's is 4 tokens long


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0])
def test_wide_beam_search_is_exhaustive_on_random_markov_models(length_penalty):
    # 3 content tokens, at most 3 tokens: 9 prefixes of length 2, so a beam of 9 never prunes.
    rng = np.random.default_rng(int(10 * length_penalty))
    for batch in range(3):
        table = rng.dirichlet(np.full(7, 0.5), size=7)
        table[:, [BOS, PAD]] = 0.0  # never generated
        table[:, 1] = 0.0
        table /= table.sum(axis=1, keepdims=True)
        tokens, score = beam_search.beam_search(
            markov_step_fn(np.maximum(table, 1e-30)), None, 1, beam_size=9, max_length=3,
            bos_id=BOS, eos_id=EOS, pad_id=PAD, length_penalty=length_penalty)
        expected, expected_score = exhaustive_best(table, 3, length_penalty)
        found = tuple(t for t in tokens[0].tolist() if t != PAD)
        assert found == expected
        np.testing.assert_allclose(score[0], expected_score, rtol=1e-4)


@pytest.mark.slow
def test_beam_of_one_without_length_penalty_is_greedy_on_a_transformer():
    config = tiny_config(encoder_layers=1, decoder_layers=1)
    model = transformer.Transformer(config, rngs=nnx.Rngs(3))
    src = jnp.asarray(np.random.default_rng(1).integers(4, 40, (5, 6)), jnp.int32)

    def step(tokens, position, cache):
        logits, cache = model.decode_step(tokens, position, cache)
        return jax.nn.log_softmax(logits), cache

    cache = model.init_cache(model.encode(src), src, 8)
    greedy_tokens, greedy_score = greedy(step, cache, 5, max_length=8)
    beam, score = beam_search.beam_search(step, cache, 5, beam_size=1, max_length=8, bos_id=BOS,
                                          eos_id=EOS, length_penalty=0.0)
    np.testing.assert_array_equal(beam, greedy_tokens)
    np.testing.assert_allclose(score, greedy_score, rtol=1e-5)


def test_beam_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="beam_size"):
        beam_search.beam_search(markov_step_fn(known_answer_table()), None, 1, beam_size=0,
                                max_length=4, bos_id=BOS, eos_id=EOS)


# ---------------------------------------------------------------------------------------------
# BLEU, loss, schedule
# ---------------------------------------------------------------------------------------------


def reference_bleu(hypotheses, references, max_order=4):
    """Papineni et al.'s corpus BLEU on whitespace tokens (no smoothing needed below)."""
    matches, totals = np.zeros(max_order), np.zeros(max_order)
    hyp_length = ref_length = 0
    for hyp, ref in zip(hypotheses, references):
        hyp, ref = hyp.split(), ref.split()
        hyp_length, ref_length = hyp_length + len(hyp), ref_length + len(ref)
        for n in range(1, max_order + 1):
            hyp_ngrams = collections.Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            ref_ngrams = collections.Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum(min(c, ref_ngrams[g]) for g, c in hyp_ngrams.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    brevity = 1.0 if hyp_length > ref_length else math.exp(1 - ref_length / hyp_length)
    return 100 * brevity * math.exp(np.mean(np.log(matches / totals)))


def test_sacrebleu_score_of_a_fixed_pair_matches_the_definition():
    # Lower-case words without punctuation: sacreBLEU's 13a tokeniser leaves them as they are.
    hypotheses = ["the cat sat on the mat today", "a quick brown dog jumps over the lazy fox"]
    references = ["the cat sat on the red mat today", "the quick brown dog jumps over the lazy fox"]
    bleu, signature = translation_task.corpus_bleu(hypotheses, references)
    # By hand: 1-grams 15/16, 2-grams 12/14, 3-grams 9/12, 4-grams 7/10; lengths 16 vs 17.
    by_hand = 100 * math.exp(1 - 17 / 16) * (15 / 16 * 12 / 14 * 9 / 12 * 7 / 10) ** 0.25
    assert bleu == pytest.approx(reference_bleu(hypotheses, references), abs=1e-9)
    assert bleu == pytest.approx(by_hand, abs=1e-9)
    assert "tok:13a" in signature and "case:mixed" in signature
    assert translation_task.corpus_bleu(references, references)[0] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="hypotheses for"):
        translation_task.corpus_bleu(hypotheses, references[:1])


def test_label_smoothed_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.array([[1, 4, 0], [2, 0, 0]], np.int32)  # 0 = pad
    loss, nll, count = translation_task.label_smoothed_loss(jnp.asarray(logits),
                                                         jnp.asarray(targets), 0.1, 0)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected_loss = expected_nll = 0.0
    for b, t in itertools.product(range(2), range(3)):
        if targets[b, t]:
            smoothed = np.full(5, 0.1 / 5)
            smoothed[targets[b, t]] += 0.9
            expected_loss -= float(smoothed @ log_probs[b, t])
            expected_nll -= float(log_probs[b, t, targets[b, t]])
    assert count == 3
    np.testing.assert_allclose([loss, nll], [expected_loss, expected_nll], rtol=1e-5)


def test_inverse_sqrt_schedule_values():
    config = translation_task.TranslationConfig(learning_rate=1e-3, warmup_steps=4000,
                                             warmup_init_lr=1e-7)
    schedule = translation_task.inverse_sqrt_schedule(config)
    # optax counts from 0; fairseq's update number is count + 1.
    np.testing.assert_allclose(schedule(1999), 1e-7 + (1e-3 - 1e-7) * 0.5, rtol=1e-5)
    np.testing.assert_allclose(schedule(3999), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(schedule(16000 - 1), 0.5e-3, rtol=1e-6)  # sqrt(4000 / 16000)


# ---------------------------------------------------------------------------------------------
# Pruning rules
# ---------------------------------------------------------------------------------------------


def test_pruning_rules_on_the_big_model():
    abstract = nnx.eval_shape(lambda: transformer.Transformer(
        transformer.transformer_config("big", 32768), rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    plans = {p.path: p for p in sparse_jax.plan_tree(params, rules=translation_task.PRUNING_RULES)}
    pruned = {path for path, p in plans.items() if p.pruned}
    # 6 encoder layers x (4 attention + 2 FFN) + 6 decoder layers x (8 attention + 2 FFN).
    assert len(pruned) == 6 * 6 + 6 * 10
    assert all(path.endswith("/kernel") and plans[path].axis == 0 for path in pruned)
    assert plans["encoder_layers/0/ffn/fc2/kernel"].shape == (4096, 1024)  # (in, out)
    embedding = plans["embed_tokens/embedding"]
    assert not embedding.pruned and "embed_tokens" in embedding.reason
    kernels = [path for path in plans if path.endswith("kernel")]
    assert sorted(kernels) == sorted(pruned)


def test_pruned_projections_are_2_4_along_their_input_dimension():
    model = transformer.Transformer(tiny_config(), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    pruned, masks = sparse_jax.prune(params, rules=translation_task.PRUNING_RULES)
    kernel = np.asarray(pruned["decoder_layers"][1]["encoder_attn"]["v_proj"]["kernel"])
    original = np.asarray(params["decoder_layers"][1]["encoder_attn"]["v_proj"]["kernel"])
    groups = kernel.reshape(4, 4, -1)  # (in / 4, 4, out): groups of 4 consecutive inputs
    assert np.all((groups != 0).sum(axis=1) == 2)
    # The kept two are the two largest magnitudes of each group.
    kept = np.sort(np.abs(groups), axis=1)[:, 2:]
    np.testing.assert_array_equal(kept, np.sort(np.abs(original.reshape(4, 4, -1)), axis=1)[:, 2:])
    np.testing.assert_array_equal(pruned["embed_tokens"]["embedding"],
                                  params["embed_tokens"]["embedding"])
    assert masks["embed_tokens"]["embedding"] is None


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_builtin_target_language_by_hand():
    # ROT13: each letter moves 13 places (a<->n, b<->o, ...); everything else stays.
    assert td.to_target_language("the quick brown fox jumps") == "gur dhvpx oebja sbk whzcf"
    assert td.to_target_language("Hello, world! 42") == "Uryyb, jbeyq! 42"
    assert td.to_target_language(td.to_target_language("Zebra ‘x’")) == "Zebra ‘x’"


def test_builtin_corpus_splits_are_disjoint_and_real_text():
    corpus = td.builtin_corpus()
    sets = {name: set(src) for name, (src, _) in corpus.items()}
    assert len(sets["train"]) > 1500 and len(sets["test"]) > 200
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["valid"])
    source, target = corpus["test"]
    assert all(td.to_target_language(s) == t for s, t in zip(source, target))


def test_token_batches_cover_each_pair_once_per_epoch_and_resume():
    corpus = td.builtin_corpus()
    processor = td.load_sentencepiece(td.train_sentencepiece(
        corpus["train"][0][:300] + corpus["train"][1][:300], 200))
    pairs = td.tokenize_pairs(processor, corpus["train"][0][:300], corpus["train"][1][:300])
    source = td.TokenBatchSource(pairs, (16, 32, 64, 256), max_tokens=512, seed=0, num_epochs=2,
                                 rows_multiple_of=2)
    seen = []
    for index in range(source.per_epoch):
        size, indices = source.epoch_batches(0)[index]
        batch = source[index]
        rows = batch["src"].shape[0]
        assert batch["src"].shape[1] == size and rows * size <= 512 and rows % 2 == 0
        for row, i in enumerate(indices):
            n = len(pairs.target[i])
            assert batch["tgt_in"][row, 0] == td.BOS_ID and batch["tgt_out"][row, n] == td.EOS_ID
            np.testing.assert_array_equal(batch["tgt_in"][row, 1:n + 1], batch["tgt_out"][row, :n])
        seen += list(indices)
    assert len(seen) + source.num_dropped == len(pairs) and len(set(seen)) == len(seen)
    # Epochs are shuffled differently; a restored iterator continues where it stopped.
    assert [list(b[1]) for b in source.epoch_batches(0)] != [list(b[1]) for b in source.epoch_batches(1)]
    iterator = td.train_iterator(source)
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = next(iterator)
    resumed = td.train_iterator(source)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["src"], expected["src"])


def test_missing_or_misaligned_data_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.en"):
        td.read_parallel(str(tmp_path), "train")
    (tmp_path / "train.en").write_text("a\nb\n")
    (tmp_path / "train.de").write_text("a\n")
    with pytest.raises(ValueError, match="aligned line by line"):
        td.read_parallel(str(tmp_path), "train")


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path, capsys):
    workdir = tmp_path / "run"
    export = importlib.util.find_spec("jax2onnx") is not None
    onnx_path = tmp_path / "model.onnx"
    results = translation_task.main("transformer_wmt", "", "", [
        "--smoke", "--workdir", str(workdir), *(["--export-onnx", str(onnx_path)] if export else [])])
    saved = json.loads((workdir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("model", "dataset", "metric", "dense", "one_shot", "sparse", "control", "steps",
                "seconds", "devices", "jax"):
        assert key in saved
    assert saved["metric"] == "bleu" and saved["exactly_nm_sparse"] is True
    assert saved["steps"] == {"dense": 6, "retrain": 6, "control": 6}  # control: built-in default
    assert all(0.0 <= saved[k] <= 100.0 for k in ("dense", "one_shot", "sparse", "control"))
    for name in ("metrics.jsonl", "curves.png", "sparsity_report.txt", "spm.model",
                 "translations.txt", "config.json"):
        assert (workdir / name).exists(), name
    assert sorted(os.listdir(workdir / "checkpoints")) == ["control", "dense", "retrain"]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {"dense", "one_shot", "retrain", "control"}
    control_bleu = [r["metric"] for r in records
                    if r["phase"] == "control" and r["metric"] is not None]
    assert control_bleu[-1] == saved["control"]
    report = (workdir / "sparsity_report.txt").read_text()
    assert "embed_tokens/embedding" in report and "every pruned leaf 2:4: yes" in report
    printed = capsys.readouterr().out
    assert "| transformer_wmt | pydoc_rot13 |" in printed
    assert "kept dense: embed_tokens/embedding" in printed and "tied output projection" in printed
    if export:  # the 16 projections are Gemms, 2:4 along K where TensorRT looks (the tied output
        # projection becomes an Einsum with the embedding, which the inspector does not list)
        import onnxruntime
        from sparse_jax import inspect as sparse_inspect

        checks = sparse_inspect.inspect_onnx(onnx_path)
        assert len(checks) == 16 and all(c.is_24 and c.op == "Gemm" for c in checks)
        assert sorted({c.shape for c in checks}) == [(32, 32), (32, 64), (64, 32)]
        tokens = np.full((1, 96), 7, np.int32)
        (logits,) = onnxruntime.InferenceSession(str(onnx_path)).run(None, {
            "src_tokens": tokens, "prev_output_tokens": tokens})
        assert logits.shape == (1, 96, 300) and np.isfinite(logits).all()


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
    config = translation_task.smoke_config(translation_task.builtin_config())
    whole = translation_task.train_and_evaluate(config, str(tmp_path / "whole"))
    interrupted = config.replace(interrupt_after_steps=8)  # in the middle of retraining
    with pytest.raises(workflow.Interrupted):
        translation_task.train_and_evaluate(interrupted, str(tmp_path / "resumed"))
    resumed = translation_task.train_and_evaluate(config, str(tmp_path / "resumed"), resume=True)
    for key in ("dense", "one_shot", "sparse", "control"):
        assert resumed[key] == whole[key]
    metrics = lambda run: [json.loads(line) for line in
                           (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    strip = lambda records: [{k: v for k, v in r.items()} for r in records]
    assert strip(metrics("resumed")) == strip(metrics("whole"))
