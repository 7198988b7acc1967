"""SQuAD v1.1: examples, doc-stride feature windows, n-best span decoding, the official metric.

Windows are ``[CLS] question [SEP] context window [SEP]`` (BERT's reference: 384 tokens, stride
128); every context token keeps its character span, so a predicted span maps back to the exact
characters of the context.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import string
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset in the context


@dataclasses.dataclass(frozen=True)
class Example:
    """One question about one context, with its reference answers (several in SQuAD's dev set)."""

    qas_id: str
    question: str
    context: str
    answers: tuple[Answer, ...]


def load_squad_json(path: str) -> list[Example]:
    """Examples of a SQuAD v1.1 JSON file (``{"data": [{"paragraphs": [{"context", "qas"}]}]}``)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "data" not in data:
        raise ValueError(f"{path}: not a SQuAD JSON file (expected a top-level 'data' list)")
    examples = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = tuple(Answer(a["text"], int(a["answer_start"])) for a in qa["answers"])
                for answer in answers:
                    if context[answer.start:answer.start + len(answer.text)] != answer.text:
                        raise ValueError(f"{path}: question {qa['id']}: answer {answer.text!r} is "
                                         f"not at character {answer.start} of its context")
                examples.append(Example(qa["id"], qa["question"], context, answers))
    if not examples:
        raise ValueError(f"{path}: no questions found")
    return examples


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall, tokens counted with multiplicity."""
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(reference).split()
    common = collections.Counter(predicted) & collections.Counter(expected)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_v11_metric(examples: Sequence[Example], predictions: dict[str, str]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in percent, each question scored by its best reference answer
    (0 without a prediction, as in the official script)."""
    if not examples:
        raise ValueError("no examples to score")
    exact, f1 = 0.0, 0.0
    for example in examples:
        if not example.answers:
            raise ValueError(f"question {example.qas_id} has no reference answer")
        prediction = predictions.get(example.qas_id)
        if prediction is None:
            continue
        exact += max(exact_match_score(prediction, a.text) for a in example.answers)
        f1 += max(f1_score(prediction, a.text) for a in example.answers)
    return {"exact_match": 100.0 * exact / len(examples), "f1": 100.0 * f1 / len(examples)}


@dataclasses.dataclass
class Features:
    """Model inputs of all windows (``[num_windows, max_seq_length]``) and their maps.

    ``token_char_spans[i][t]``: the context characters of token ``t`` of window ``i`` (``None``
    outside the context); ``token_is_max_context[i][t]``: whether window ``i`` gives that token
    the most context. ``start/end_positions``: the answer's tokens, or 0 (``[CLS]``) if it is not
    wholly inside the window.
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    start_positions: np.ndarray
    end_positions: np.ndarray
    example_index: np.ndarray  # the window's example, an index into the examples list
    token_char_spans: list[list[tuple[int, int] | None]]
    token_is_max_context: list[list[bool]]

    def __len__(self) -> int:
        return len(self.input_ids)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("input_ids", "token_type_ids", "attention_mask",
                                              "start_positions", "end_positions")}


def window_starts(num_tokens: int, window: int, doc_stride: int) -> list[int]:
    """First context token of each window: 0, stride, 2 stride, ... until the end is covered."""
    if window <= 0 or doc_stride <= 0:
        raise ValueError(f"window {window} and doc_stride {doc_stride} must be positive")
    starts = [0]
    while starts[-1] + window < num_tokens:
        starts.append(starts[-1] + doc_stride)
    return starts


def _max_context_window(starts: list[int], window: int, num_tokens: int, token: int) -> int:
    # Score = min(left context, right context) + 0.01 * window length (BERT's reference rule).
    best, best_score = 0, None
    for i, start in enumerate(starts):
        end = min(start + window, num_tokens) - 1
        if not start <= token <= end:
            continue
        score = min(token - start, end - token) + 0.01 * (end - start + 1)
        if best_score is None or score > best_score:
            best, best_score = i, score
    return best


def make_features(examples: Sequence[Example], tokenizer, max_seq_length: int = 384,
                  doc_stride: int = 128, max_query_length: int = 64) -> Features:
    """Tokenises (``bert_tokenizer``) and windows ``examples`` (see the module docstring)."""
    if doc_stride > max_seq_length - max_query_length - 3:
        raise ValueError(f"doc_stride {doc_stride} leaves gaps: a window holds at most "
                         f"{max_seq_length - max_query_length - 3} context tokens")
    cls_id, sep_id, pad_id = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    if None in (cls_id, sep_id, pad_id):
        raise ValueError("the vocabulary lacks [CLS], [SEP] or [PAD]")
    columns = collections.defaultdict(list)
    spans_all, max_context_all = [], []
    questions = tokenizer.encode_batch([e.question for e in examples], add_special_tokens=False)
    contexts = tokenizer.encode_batch([e.context for e in examples], add_special_tokens=False)
    for index, (example, question, context) in enumerate(zip(examples, questions, contexts)):
        query_ids = question.ids[:max_query_length]
        context_ids, offsets = context.ids, context.offsets
        window = max_seq_length - len(query_ids) - 3
        # The answer's first and last context token (the tokens its characters overlap).
        answer_tokens = None
        if example.answers:
            a = example.answers[0]
            a_start, a_end = a.start, a.start + len(a.text)
            covered = [t for t, (s, e) in enumerate(offsets) if s < a_end and e > a_start]
            if covered:
                answer_tokens = (covered[0], covered[-1])
        starts = window_starts(len(context_ids), window, doc_stride)
        for start in starts:
            stop = min(start + window, len(context_ids))
            prefix = [cls_id, *query_ids, sep_id]
            ids = prefix + context_ids[start:stop] + [sep_id]
            types = [0] * len(prefix) + [1] * (stop - start + 1)
            spans = [None] * len(prefix) + [tuple(offsets[t]) for t in range(start, stop)] + [None]
            is_max = [False] * len(prefix) + [
                _max_context_window(starts, window, len(context_ids), t) == starts.index(start)
                for t in range(start, stop)] + [False]
            first, last = 0, 0
            if answer_tokens and start <= answer_tokens[0] and answer_tokens[1] < stop:
                first = answer_tokens[0] - start + len(prefix)
                last = answer_tokens[1] - start + len(prefix)
            padding = max_seq_length - len(ids)
            columns["input_ids"].append(ids + [pad_id] * padding)
            columns["token_type_ids"].append(types + [0] * padding)
            columns["attention_mask"].append([1] * len(ids) + [0] * padding)
            columns["start_positions"].append(first)
            columns["end_positions"].append(last)
            columns["example_index"].append(index)
            spans_all.append(spans + [None] * padding)
            max_context_all.append(is_max + [False] * padding)
    as_array = {k: np.asarray(v, dtype=np.int32) for k, v in columns.items()}
    return Features(**as_array, token_char_spans=spans_all, token_is_max_context=max_context_all)


@dataclasses.dataclass(frozen=True)
class Candidate:
    text: str
    score: float  # start logit + end logit
    start_char: int
    end_char: int


def decode_predictions(examples: Sequence[Example], features: Features, start_logits: np.ndarray,
                       end_logits: np.ndarray, n_best: int = 20, max_answer_length: int = 30
                       ) -> tuple[dict[str, str], dict[str, list[Candidate]]]:
    """Best answer text per question, and its ``n_best`` candidates (best first): spans of at
    most ``max_answer_length`` context tokens among each window's ``n_best`` start and end logits,
    starting where the window gives the token the most context, scored by start + end logit."""
    start_logits = np.asarray(start_logits, np.float32)
    end_logits = np.asarray(end_logits, np.float32)
    if start_logits.shape != features.input_ids.shape or end_logits.shape != start_logits.shape:
        raise ValueError(f"logits of shape {start_logits.shape} / {end_logits.shape} for "
                         f"features of shape {features.input_ids.shape}")
    best, nbest = {}, {}
    for example_index, example in enumerate(examples):
        candidates = []
        for i in np.flatnonzero(features.example_index == example_index):
            spans, is_max = features.token_char_spans[i], features.token_is_max_context[i]
            top_starts = np.argsort(-start_logits[i])[:n_best]
            top_ends = np.argsort(-end_logits[i])[:n_best]
            for s in top_starts:
                if spans[s] is None or not is_max[s]:
                    continue
                for e in top_ends:
                    if spans[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    start_char, end_char = spans[s][0], spans[e][1]
                    candidates.append(Candidate(example.context[start_char:end_char],
                                                float(start_logits[i, s] + end_logits[i, e]),
                                                start_char, end_char))
        # The same characters can come from two windows; keep the best-scored copy.
        unique = {}
        for c in sorted(candidates, key=lambda c: -c.score):
            unique.setdefault((c.start_char, c.end_char), c)
        unique = list(unique.values())
        nbest[example.qas_id] = unique[:n_best]
        best[example.qas_id] = unique[0].text if unique else ""
    return best, nbest


def bert_tokenizer(vocab_path: str):
    """A WordPiece ``tokenizers.Tokenizer`` from a BERT ``vocab.txt`` (BERT's normaliser, no
    special tokens added by ``encode``)."""
    import os

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    if not os.path.exists(vocab_path):
        raise FileNotFoundError(f"{vocab_path}: no vocab.txt")
    tokenizer = Tokenizer(models.WordPiece.from_file(vocab_path, unk_token="[UNK]",
                                                     max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer
