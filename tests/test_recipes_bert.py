"""Tests of the BERT question-answering recipe (recipes/bert_large_squad.py, recipes/text/qa_task.py, recipes/text/bert.py).

References are independent of the code under test: the parameter count from BERT's architecture
written out by hand, a NumPy BERT forward pass written here from the Hugging Face layout, the
SQuAD v1.1 metric on cases worked by hand, windows on a hand-made vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparse_jax

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from recipes.engine import workflow  # noqa: E402
from recipes.text import bert, qa_data, qa_task, squad  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Architecture: parameter count and pruning plan
# ---------------------------------------------------------------------------------------------


def bert_parameter_formula(vocab, hidden, layers, ffn, positions=512, types=2) -> int:
    """BertModel (with its pooler, no task head), counted from the architecture."""
    embeddings = (vocab + positions + types) * hidden + 2 * hidden  # 3 tables + LayerNorm
    attention = 4 * (hidden * hidden + hidden) + 2 * hidden  # q, k, v, out + LayerNorm
    feed_forward = (hidden * ffn + ffn) + (ffn * hidden + hidden) + 2 * hidden
    pooler = hidden * hidden + hidden
    return embeddings + layers * (attention + feed_forward) + pooler


def abstract_params(config: bert.BertConfig) -> dict:
    model = nnx.eval_shape(lambda: bert.BertForQuestionAnswering(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def large_params():
    return abstract_params(bert.SIZES["large"])  # shapes only, no memory


@pytest.mark.slow
def test_large_parameter_count_matches_the_architecture(large_params):
    # Published sizes: bert-large-uncased 335,141,888; bert-base-uncased 109,482,240.
    assert bert_parameter_formula(30522, 1024, 24, 4096) == 335_141_888
    assert bert_parameter_formula(30522, 768, 12, 3072) == 109_482_240
    qa_head = 1024 * 2 + 2
    assert bert.num_parameters(large_params) - qa_head == 335_141_888
    # The formula and the model agree on other shapes too (a small, odd-sized one).
    config = bert.BertConfig(vocab_size=101, hidden_size=24, num_layers=3, num_heads=2,
                             intermediate_size=40, max_position_embeddings=33, type_vocab_size=3)
    assert bert.num_parameters(abstract_params(config)) - (24 * 2 + 2) == bert_parameter_formula(
        101, 24, 3, 40, positions=33, types=3)


def test_pruning_rules_large_prune_every_encoder_linear_along_its_input(large_params):
    plans = sparse_jax.plan_tree(large_params, rules=bert.PRUNING_RULES)
    pruned = {p.path: p for p in plans if p.pruned}
    expected = {f"bert/encoder/layers/{i}/{name}/kernel" for i in range(24)
                for name in ("query", "key", "value", "attention_output", "intermediate", "output")}
    assert set(pruned) == expected
    assert all(p.axis == 0 for p in pruned.values())  # (in, out) kernels: the input dimension
    assert pruned["bert/encoder/layers/3/output/kernel"].shape == (4096, 1024)
    skipped = {p.path: p.reason for p in plans if not p.pruned}
    for path, word in [("bert/embeddings/word_embeddings/embedding", "embeddings"),
                       ("bert/embeddings/layer_norm/scale", "layer_norm"),
                       ("bert/encoder/layers/0/attention_layer_norm/scale", "layer_norm"),
                       ("bert/pooler/kernel", "pooler"), ("qa_outputs/kernel", "qa_outputs")]:
        assert word in skipped[path], (path, skipped[path])


# ---------------------------------------------------------------------------------------------
# Hugging Face import
# ---------------------------------------------------------------------------------------------

TINY = bert.BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2,
                       intermediate_size=32, max_position_embeddings=24, type_vocab_size=2)


def hf_state_dict(config: bert.BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random BertForQuestionAnswering state dict with Hugging Face's names and layouts."""
    rng = np.random.default_rng(seed)
    h, f = config.hidden_size, config.intermediate_size
    state = {}

    def add(name, *shape, scale=0.3):
        state[name] = (scale * rng.standard_normal(shape)).astype(np.float32)

    add("bert.embeddings.word_embeddings.weight", config.vocab_size, h)
    add("bert.embeddings.position_embeddings.weight", config.max_position_embeddings, h)
    add("bert.embeddings.token_type_embeddings.weight", config.type_vocab_size, h)
    add("bert.embeddings.LayerNorm.weight", h)
    add("bert.embeddings.LayerNorm.bias", h)
    for i in range(config.num_layers):
        p = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            add(p + name + ".weight", h, h)  # (out, in)
            add(p + name + ".bias", h)
        add(p + "attention.output.LayerNorm.weight", h)
        add(p + "attention.output.LayerNorm.bias", h)
        add(p + "intermediate.dense.weight", f, h)
        add(p + "intermediate.dense.bias", f)
        add(p + "output.dense.weight", h, f)
        add(p + "output.dense.bias", h)
        add(p + "output.LayerNorm.weight", h)
        add(p + "output.LayerNorm.bias", h)
    add("bert.pooler.dense.weight", h, h)
    add("bert.pooler.dense.bias", h)
    add("qa_outputs.weight", 2, h)
    add("qa_outputs.bias", 2)
    return state


def numpy_bert_qa(state, config, input_ids, token_type_ids, attention_mask):
    """BERT's forward pass in float64 NumPy, straight from the Hugging Face state dict."""
    from math import erf

    s = {k: v.astype(np.float64) for k, v in state.items()}
    erf_v = np.vectorize(erf)

    def linear(x, name):
        return x @ s[name + ".weight"].T + s[name + ".bias"]

    def layer_norm(x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + config.layer_norm_eps) * s[name + ".weight"] + s[name + ".bias"]

    batch, length = input_ids.shape
    x = (s["bert.embeddings.word_embeddings.weight"][input_ids]
         + s["bert.embeddings.position_embeddings.weight"][np.arange(length)][None]
         + s["bert.embeddings.token_type_embeddings.weight"][token_type_ids])
    x = layer_norm(x, "bert.embeddings.LayerNorm")
    heads, d = config.num_heads, config.hidden_size // config.num_heads
    for i in range(config.num_layers):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (linear(x, p + f"attention.self.{n}").reshape(batch, length, heads, d)
                   for n in ("query", "key", "value"))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        scores = scores + np.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, -1)
        x = layer_norm(x + linear(context, p + "attention.output.dense"),
                       p + "attention.output.LayerNorm")
        inner = linear(x, p + "intermediate.dense")
        inner = 0.5 * inner * (1 + erf_v(inner / math.sqrt(2)))
        x = layer_norm(x + linear(inner, p + "output.dense"), p + "output.LayerNorm")
    logits = linear(x, "qa_outputs")
    return logits[..., 0], logits[..., 1]


def write_hf_directory(path, config, state):
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "bert", "vocab_size": config.vocab_size,
                   "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
                   "num_attention_heads": config.num_heads,
                   "intermediate_size": config.intermediate_size, "hidden_act": "gelu",
                   "max_position_embeddings": config.max_position_embeddings,
                   "type_vocab_size": config.type_vocab_size, "layer_norm_eps": 1e-12}, f)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                          + [f"w{i}" for i in range(config.vocab_size - 5)]) + "\n")
    save_file(state, os.path.join(path, "model.safetensors"))


def _inputs(config, batch=2, length=12, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32)
    types = (np.arange(length)[None] >= length // 2).astype(np.int32).repeat(batch, 0)
    mask = np.ones((batch, length), np.int32)
    mask[1, -3:] = 0  # padding in the second row
    return ids, types, mask


def test_hf_import_round_trips_and_gives_the_reference_logits(tmp_path):
    state = hf_state_dict(TINY)
    write_hf_directory(tmp_path / "ckpt", TINY, state)
    config, loaded, vocab = bert.load_hf_checkpoint(str(tmp_path / "ckpt"))
    assert config == TINY.replace(hidden_dropout=0.1, attention_dropout=0.1)
    assert os.path.basename(vocab) == "vocab.txt"
    model = bert.BertForQuestionAnswering(config, rngs=nnx.Rngs(0))
    graphdef, like = nnx.split(model, nnx.Param)
    params, notes = bert.params_from_hf(loaded, nnx.to_pure_dict(like))
    assert notes == []
    # Linear weights are transposed to (in, out); everything else copied.
    np.testing.assert_array_equal(params["bert"]["encoder"]["layers"][1]["intermediate"]["kernel"],
                                  state["bert.encoder.layer.1.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(params["bert"]["embeddings"]["layer_norm"]["scale"],
                                  state["bert.embeddings.LayerNorm.weight"])
    back = bert.params_to_hf(params)
    assert sorted(back) == sorted(state)
    for name in state:
        np.testing.assert_array_equal(back[name], state[name], err_msg=name)

    ids, types, mask = _inputs(config)
    forward = jax.jit(lambda p, *inputs: nnx.merge(graphdef, p)(*inputs))  # one compile
    start, end = forward(params, ids, types, mask)
    ref_start, ref_end = numpy_bert_qa(state, config, ids, types, mask)
    valid = mask > 0
    np.testing.assert_allclose(np.asarray(start)[valid], ref_start[valid], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(end)[valid], ref_end[valid], atol=2e-4, rtol=1e-4)
    assert np.all(np.asarray(start)[~valid] < -1e8)  # padding is never an answer boundary


def test_hf_import_accepts_bertmodel_names_and_reports_problems():
    state = hf_state_dict(TINY)
    # A BertModel checkpoint (no "bert." prefix, TF-style gamma/beta, no QA head, an MLM head).
    renamed = {}
    for name, value in state.items():
        if name.startswith("qa_outputs"):
            continue
        name = name[len("bert."):].replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta")
        renamed[name] = value
    renamed["cls.predictions.bias"] = np.zeros(TINY.vocab_size, np.float32)
    like = nnx.to_pure_dict(nnx.state(bert.BertForQuestionAnswering(TINY, rngs=nnx.Rngs(3)),
                                      nnx.Param))
    params, notes = bert.params_from_hf(renamed, like)
    assert any("qa_outputs" in n for n in notes) and any("cls.predictions" in n for n in notes)
    np.testing.assert_array_equal(params["qa_outputs"]["kernel"], like["qa_outputs"]["kernel"])
    np.testing.assert_array_equal(params["bert"]["encoder"]["layers"][0]["output_layer_norm"]["bias"],
                                  state["bert.encoder.layer.0.output.LayerNorm.bias"])
    missing = dict(state)
    del missing["bert.encoder.layer.1.output.dense.weight"]
    with pytest.raises(KeyError, match="layer.1.output.dense.weight"):
        bert.params_from_hf(missing, like)
    wrong = dict(state)
    wrong["bert.encoder.layer.0.attention.self.key.weight"] = np.zeros((16, 8), np.float32)
    with pytest.raises(ValueError, match="attention.self.key.weight"):
        bert.params_from_hf(wrong, like)


def test_transformers_gives_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.BertConfig(
        vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size,
        num_hidden_layers=TINY.num_layers, num_attention_heads=TINY.num_heads,
        intermediate_size=TINY.intermediate_size,
        max_position_embeddings=TINY.max_position_embeddings)
    torch.manual_seed(0)
    reference = transformers.BertForQuestionAnswering(hf_config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    with open(tmp_path / "vocab.txt", "w") as f:
        f.write("\n".join(f"t{i}" for i in range(TINY.vocab_size)))
    config, state, _ = bert.load_hf_checkpoint(str(tmp_path))
    model = bert.BertForQuestionAnswering(config, rngs=nnx.Rngs(0))
    graphdef, like = nnx.split(model, nnx.Param)
    params, _ = bert.params_from_hf(state, nnx.to_pure_dict(like))
    ids, types, mask = _inputs(config)
    start, end = nnx.merge(graphdef, params)(ids, types, mask)
    with torch.no_grad():
        out = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                        token_type_ids=torch.tensor(types, dtype=torch.long),
                        attention_mask=torch.tensor(mask, dtype=torch.long))
    valid = mask > 0
    np.testing.assert_allclose(np.asarray(start)[valid], out.start_logits.numpy()[valid], atol=1e-4)
    np.testing.assert_allclose(np.asarray(end)[valid], out.end_logits.numpy()[valid], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The SQuAD v1.1 metric
# ---------------------------------------------------------------------------------------------


def test_metric_on_hand_worked_cases():
    assert squad.normalize_answer("  The  Cat's,  hat!") == "cats hat"
    assert squad.normalize_answer("An apple a day") == "apple day"
    assert squad.exact_match_score("Paris.", "paris") == 1.0
    assert squad.exact_match_score("in Paris", "Paris") == 0.0
    # pred {cat, sat}, ref {cat, sat, down}: precision 1, recall 2/3 -> F1 0.8
    assert squad.f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # multiplicity: pred x y y, ref y y y z: overlap 2, P 2/3, R 1/2 -> F1 4/7
    assert squad.f1_score("x y y", "y y y z") == pytest.approx(4 / 7)
    assert squad.f1_score("dog", "cat") == 0.0
    assert squad.f1_score("the", "cat") == 0.0  # nothing left after normalisation

    def example(qid, *answers):
        return squad.Example(qid, "?", "", tuple(squad.Answer(a, 0) for a in answers))

    examples = [example("q1", "Denver Broncos", "Broncos"), example("q2", "1990"),
                example("q3", "x"), example("q4", "Carolina Panthers")]
    predictions = {"q1": "the Denver Broncos", "q2": "in 1990", "q4": "Panthers"}
    # q1: EM 1, F1 1; q2: EM 0, F1 2/3; q3: no prediction, 0; q4: EM 0, F1 2/3 (P 1, R 1/2).
    scores = squad.squad_v11_metric(examples, predictions)
    assert scores["exact_match"] == pytest.approx(100 * 1 / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 2 / 3) / 4)


def test_load_squad_json_reads_and_validates(tmp_path):
    context = "Super Bowl 50 was won by the Denver Broncos."
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "a", "question": "Who won?", "answers": [
            {"text": "Denver Broncos", "answer_start": 29},
            {"text": "the Denver Broncos", "answer_start": 25}]}]}]}]}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    (example,) = squad.load_squad_json(str(path))
    assert example.answers[1] == squad.Answer("the Denver Broncos", 25)
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 28
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not at character 28"):
        squad.load_squad_json(str(path))


# ---------------------------------------------------------------------------------------------
# Feature windows and span decoding
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """WordPiece on a hand-made vocabulary: w0..w39 whole, "playing" as play + ##ing."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "q", "play", "##ing", ","]
    path.write_text("\n".join(words + [f"w{i}" for i in range(40)]) + "\n")
    return squad.bert_tokenizer(str(path))


def test_windows_with_doc_stride_map_answers_back_to_the_characters(word_tokenizer):
    words = [f"w{i}" for i in range(40)]
    words[21] = "playing,"  # tokens: ... w20 play ##ing , w22 ... (43 context tokens)
    context = " ".join(words)
    answer_start = context.index("w20")
    answer = squad.Answer("w20 playing", answer_start)
    example = squad.Example("e", "q", context, (answer,))
    # 20 tokens per window: [CLS] q [SEP] + 16 context tokens + [SEP]; windows start every 6.
    assert squad.window_starts(43, 16, 6) == [0, 6, 12, 18, 24, 30]
    features = squad.make_features([example], word_tokenizer, max_seq_length=20, doc_stride=6,
                                   max_query_length=4)
    assert len(features) == 6
    assert features.input_ids.shape == (6, 20)
    # The answer is context tokens 20..22 (w20 play ##ing): wholly inside the windows that start
    # at 6 (6..21? no: ends at 21), 12 (12..27) and 18 (18..33).
    expected = {0: None, 1: None, 2: (20 - 12 + 3, 22 - 12 + 3), 3: (20 - 18 + 3, 22 - 18 + 3),
                4: None, 5: None}
    for i, span in expected.items():
        got = (features.start_positions[i], features.end_positions[i])
        assert got == ((0, 0) if span is None else span), i
        if span is not None:
            s, e = span
            chars = features.token_char_spans[i][s][0], features.token_char_spans[i][e][1]
            assert context[chars[0]:chars[1]] == "w20 playing"
    # Token 20 has the most context (min(left, right) = 8 > 2) in the window starting at 12.
    assert [features.token_is_max_context[i][20 - start + 3] if start <= 20 < start + 16 else None
            for i, start in enumerate([0, 6, 12, 18, 24, 30])] == [None, False, True, False, None, None]
    # Question, separator and padding tokens have no characters; types mark the context.
    assert features.token_char_spans[0][:3] == [None, None, None]
    assert list(features.token_type_ids[0][:4]) == [0, 0, 0, 1]
    # Decoding: logits peaked on the answer in window 2 give its characters back.
    start_logits = np.zeros(features.input_ids.shape, np.float32)
    end_logits = np.zeros_like(start_logits)
    start_logits[2, 20 - 12 + 3] = 10
    end_logits[2, 22 - 12 + 3] = 10
    best, nbest = squad.decode_predictions([example], features, start_logits, end_logits)
    assert best == {"e": "w20 playing,"[:len("w20 playing")]}
    assert nbest["e"][0].start_char == answer_start


def test_decoding_respects_max_context_length_and_order(word_tokenizer):
    context = " ".join(f"w{i}" for i in range(40))
    example = squad.Example("e", "q", context, (squad.Answer("w1", 3),))
    features = squad.make_features([example], word_tokenizer, max_seq_length=20, doc_stride=6,
                                   max_query_length=4)
    start = np.full(features.input_ids.shape, -100.0, np.float32)
    end = np.full_like(start, -100.0)
    # Window 1 (context 6..21) strongly prefers starting at token 20, which has more context in
    # window 2: not allowed there. An end before the start and spans longer than 5 neither.
    start[1, 20 - 6 + 3] = 50
    end[1, 21 - 6 + 3] = 50
    start[0, 3 + 9] = 40  # w9 ...
    end[0, 3 + 7] = 40  # ... w7 ends before it (and w2..w7 is 6 tokens)
    start[0, 3 + 2] = 20  # w2 ...
    end[0, 3 + 15] = 30  # ... to w15: 14 tokens (and w9..w15: 7)
    end[0, 3 + 5] = 5  # w2..w5: 4 tokens, allowed
    best, nbest = squad.decode_predictions([example], features, start, end, n_best=20,
                                           max_answer_length=5)
    assert best["e"] == "w2 w3 w4 w5"
    scores = [c.score for c in nbest["e"]]
    assert scores == sorted(scores, reverse=True) and len(nbest["e"]) <= 20


def _check_cloze(example):
    (answer,) = example.answers
    assert example.context[answer.start:answer.start + len(answer.text)] == answer.text
    assert " what " in f" {example.question} " and example.question.endswith("?")
    assert answer.text.isalpha() and len(answer.text) >= 4
    # The question is the passage around the answer with the answer replaced by "what".
    left = example.question.split(" what ")[0].split()
    before = example.context[:answer.start].split()
    assert before[len(before) - len(left):] == left


def test_builtin_task_held_out_questions_are_on_unseen_real_passages():
    stream, held_out, text = qa_data.builtin_task(seed=0)
    assert len(held_out) > 300
    for example in held_out[::10]:
        _check_cloze(example)
        assert len(example.context.split()) <= 1.5 * qa_data.PASSAGE_WORDS
    held_topics = {e.qas_id.rsplit("-", 3)[0] for e in held_out}
    train_topics, eval_topics = qa_data.split_topics(qa_data.topic_paragraphs())
    assert held_topics <= set(eval_topics) and not held_topics & set(train_topics)
    assert not {e.context for e in held_out} & set(text)  # pre-training text: training topics
    assert set(stream.words) == {w for line in text for w in line.split()}


def test_cloze_stream_makes_fresh_reproducible_questions_from_training_words():
    stream, held_out, text = qa_data.builtin_task(seed=0)
    words = set(stream.words)
    first = stream.examples(step=3, count=40, seed=0)
    assert len(first) == 40 and first == stream.examples(step=3, count=40, seed=0)
    for example in first:
        _check_cloze(example)
        passage = example.context.split()
        assert stream.min_words <= len(passage) <= stream.max_words
        assert all(w in words or w[:1].lower() + w[1:] in words for w in passage[1:-1])
    others = stream.examples(step=4, count=40, seed=0) + stream.examples(step=3, count=40, seed=1)
    assert not {e.context for e in first} & {e.context for e in others}
    with pytest.raises(ValueError, match="min_words"):
        qa_data.ClozeStream(["word"] * 10, min_words=3)


def test_stream_batches_are_windows_that_hold_their_answer(tmp_path):
    words = ["apple", "banana", "cherry", "damson", "elder", "fig,", "grape", "hazel", "iris",
             "juniper", "kiwi.", "lemon", "mango", "nectar", "olive", "peach", "quince", "rowan"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "?", ",", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab + [w.strip(",.") for w in words]) + "\n")
    tokenizer = squad.bert_tokenizer(str(tmp_path / "vocab.txt"))
    task = qa_task.QAData("t", None, [], None, None, tokenizer, str(tmp_path / "vocab.txt"), None,
                           qa_data.ClozeStream(words, min_words=15, max_words=25))
    # 32 tokens: questions cut to 12, so a passage of up to 28 tokens needs 2-3 windows.
    config = qa_task.builtin_config().replace(batch_size=16, max_seq_length=32,
                                                   doc_stride=8, max_query_length=12)
    batch = qa_task.stream_batch(task, config, step=5, seed=0)
    assert all(v.shape == (16, 32) for k, v in batch.items() if k.endswith("_ids"))
    examples = task.train_stream.examples(5, 16, 0)
    start, end = batch["start_positions"], batch["end_positions"]
    assert np.all(start > 0) and np.all(start == end)  # every word is one token here
    answers = [tokenizer.token_to_id(e.answers[0].text.lower()) for e in examples]
    found = batch["input_ids"][np.arange(16), start]
    assert set(found.tolist()) <= set(answers)
    sep = np.argmax(batch["input_ids"] == tokenizer.token_to_id("[SEP]"), axis=1)
    assert np.all(start > sep) and np.all(batch["token_type_ids"][np.arange(16), start] == 1)
    np.testing.assert_array_equal(batch["input_ids"],
                                  qa_task.stream_batch(task, config, 5, 0)["input_ids"])


def test_builtin_vocabulary_is_the_same_in_fresh_processes(tmp_path):
    # tokenizers seeds its hash maps anew in every process: only fresh processes can show a tie
    # broken differently (before the fix, two runs differed by dozens of tokens).
    script = ("import sys; from recipes.text import qa_data; "
              "qa_data.train_wordpiece_vocab(qa_data.builtin_task(0)[2], sys.argv[1], 1000)")
    paths = [tmp_path / f"vocab{i}.txt" for i in range(2)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, check=True,
                       capture_output=True)
    first, second = (p.read_text(encoding="utf-8").splitlines() for p in paths)
    assert first == second
    assert len(first) == 1000 and first[:5] == list(qa_data.SPECIAL_TOKENS)
    assert first[5:] == sorted(set(first[5:])) and any(len(t) > 4 for t in first)


def test_mlm_masking_follows_bert(word_tokenizer):
    rows = np.array([[2] + list(range(9, 40)) + [3] + [0] * 4] * 50, np.int32)  # 33 real tokens
    out = qa_data.mask_tokens(rows, np.random.default_rng(0), vocab_size=49, mask_id=4,
                              special_ids=(0, 1, 2, 3, 4), pad_id=0, max_predictions=8)
    counts = out["masked_weights"].sum(1)
    assert np.all(counts == round(31 * 0.15))  # 15% of the 31 maskable tokens
    pos, ids = out["masked_positions"], out["masked_ids"]
    for b in range(len(rows)):
        chosen = pos[b][out["masked_weights"][b] > 0]
        assert np.all((chosen >= 1) & (chosen <= 31))  # never [CLS], [SEP] or padding
        np.testing.assert_array_equal(ids[b][:len(chosen)], rows[b][chosen])
    changed = out["input_ids"] != rows
    assert changed.sum() <= out["masked_weights"].sum()
    replaced_by_mask = (out["input_ids"] == 4).sum() / out["masked_weights"].sum()
    assert 0.7 < replaced_by_mask < 0.9  # 80% [MASK]
    np.testing.assert_array_equal(out["attention_mask"], (rows != 0).astype(np.int32))


# ---------------------------------------------------------------------------------------------
# The command line and the workflow
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_help_gives_the_full_scale_commands():
    out = subprocess.run([sys.executable, os.path.join(REPO, "recipes", "bert_large_squad.py"),
                          "--help"], capture_output=True, text=True, check=True).stdout
    for needle in ("--train-file", "dev-v1.1.json", "--checkpoint", "--devices 8", "91.9",
                   "384", "doc stride 128", "--resume", "--smoke", "--init-from"):
        assert needle in out, needle


def test_bad_command_lines_are_refused():
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import bert_large_squad as entry

    with pytest.raises(SystemExit, match="go together"):
        entry.main(["--train-file", "train.json"])
    with pytest.raises(SystemExit, match="needs --checkpoint"):
        entry.main(["--train-file", "a.json", "--predict-file", "b.json"])
    with pytest.raises(SystemExit, match="unknown config field"):
        entry.main(["--smoke", "--set", "no_such_field=1"])
    with pytest.raises(SystemExit, match="no epochs"):
        entry.main(["--smoke", "--epochs", "2"])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        bert.load_hf_checkpoint(REPO)


def _smoke(workdir, *extra):
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import bert_large_squad as entry

    # 2 of the 8 test devices: data parallel, and fast to compile.
    return entry.main(["--smoke", "--devices", "2", "--workdir", str(workdir), *extra])


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    export = importlib.util.find_spec("jax2onnx") is not None
    onnx_path = tmp_path / "model.onnx"
    results = _smoke(tmp_path, *(["--export-onnx", str(onnx_path)] if export else []))
    assert results["exactly_nm_sparse"] is True
    assert results["steps"] == {"pretrain": 4, "dense": 4, "retrain": 4, "control": 4}
    assert results["devices"] == 2
    for key in ("dense", "one_shot", "sparse", "control"):
        assert 0.0 <= results[key] <= 100.0
        assert 0.0 <= results["exact_match"][key] <= results[key] + 1e-9
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["metric"] == "f1" and on_disk["sparse"] == results["sparse"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {"pretrain", "dense", "one_shot", "retrain",
                                             "control"}
    assert (tmp_path / "curves.png").stat().st_size > 0
    if export:  # the six encoder Linears 2:4 along K where TensorRT looks; the span head dense
        import onnxruntime
        from sparse_jax import inspect as sparse_inspect

        checks = sparse_inspect.inspect_onnx(onnx_path)
        assert sorted(c.shape for c in checks if c.is_24) == sorted(
            [(32, 32)] * 4 + [(32, 64), (64, 32)])
        assert [c.shape for c in checks if not c.is_24] == [(32, 2)]
        ids = np.full((1, 64), 5, np.int32)
        start, end = onnxruntime.InferenceSession(str(onnx_path)).run(None, {
            "input_ids": ids, "token_type_ids": np.zeros_like(ids),
            "attention_mask": np.ones_like(ids)})
        assert start.shape == end.shape == (1, 64) and np.isfinite(start).all()
    report = (tmp_path / "sparsity_report.txt").read_text()
    assert "qa_outputs/kernel" in report and "pooler" in report
    # The exported final model is a Hugging Face directory: it loads back, exactly 2:4.
    config, state, _ = bert.load_hf_checkpoint(str(tmp_path / "sparse_model"))
    for i in range(config.num_layers):
        for name in ("attention.self.query", "attention.output.dense", "intermediate.dense",
                     "output.dense"):
            weight = state[f"bert.encoder.layer.{i}.{name}.weight"]  # (out, in)
            assert sparse_jax.is_nm_sparse(jnp.asarray(weight), 2, 4, axis=1), name
    assert not sparse_jax.is_nm_sparse(jnp.asarray(state["qa_outputs.weight"]), 2, 4, axis=1)


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(tmp_path):

    uninterrupted = _smoke(tmp_path / "a")  # each run trains its own (the same) vocabulary
    with pytest.raises(workflow.Interrupted):
        _smoke(tmp_path / "b", "--set", "interrupt_after_steps=7")  # inside the dense phase
    with pytest.raises(FileExistsError, match="--resume"):
        _smoke(tmp_path / "b")
    resumed = _smoke(tmp_path / "b", "--resume")
    for key in ("dense", "one_shot", "sparse", "exact_match"):
        assert resumed[key] == uninterrupted[key], key
