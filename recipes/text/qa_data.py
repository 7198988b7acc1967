"""The built-in task: cloze questions on Python's documentation (``pydoc_data.topics``).

Passages: prose paragraphs of the topics, cut at sentence ends into at most ``PASSAGE_WORDS``
words. A question is a sentence of the passage with one content word replaced by ``"what"``, cut
to ``QUESTION_WORDS`` words on each side (*"The first item provided by the what is then assigned
to the target?"* -> ``iterator``); the answer is that word in the passage. Held-out questions are
on real passages of every ``EVAL_EVERY``-th topic; training questions are made fresh every step on
passages of random words from the training topics' running text (``ClozeStream``: on real ones a
small model learns to recognise sentences, not to match question and passage; recipes/README.md).
The WordPiece vocabulary and the masked-LM pre-training use the training topics' real text.
"""

from __future__ import annotations

import os
import re

import numpy as np

from recipes.text.squad import Answer, Example

EVAL_EVERY = 6
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
QUESTION_WORDS = 6
PASSAGE_WORDS = 25
STOP_WORDS = frozenset("""
about above after again against also among another because been before being below between both
cannot could does doing down during each either else every from further have having here into
itself just like more most much must neither never none only other otherwise over same should
since some such than that their them then there these they this those through thus under until
upon very were what when where whether which while will with within without would your
""".split())


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_WORD = re.compile(r"\S+")


def topic_paragraphs() -> dict[str, list[str]]:
    """``{topic: [paragraph, ...]}``: prose of ``pydoc_data.topics``, one line per paragraph."""
    from pydoc_data.topics import topics

    result = {}
    for name in sorted(topics):
        paragraphs = []
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.split("\n")
            # Code, grammar and tables are indented; headings are underlined with * = - ~.
            if any(line.startswith("   ") for line in lines):
                continue
            lines = [line for line in lines if not re.fullmatch(r"[*=\-~^]{3,}\s*", line)]
            text = " ".join(" ".join(lines).split())
            if len(text.split()) >= 12 and not text.endswith(":"):
                paragraphs.append(text)
        if paragraphs:
            result[name] = [p for paragraph in paragraphs for p in passages(paragraph)]
    return result


def passages(paragraph: str, max_words: int = PASSAGE_WORDS) -> list[str]:
    """A paragraph cut at sentence ends into passages of at most ``max_words`` words. A longer
    sentence stays whole unless it exceeds ``1.5 * max_words`` words: then it is dropped (some
    pydoc paragraphs have no sentence breaks; their windows would mostly miss the answer)."""
    result, current = [], []
    for sentence in _SENTENCE_END.split(paragraph):
        if current and len(" ".join(current + [sentence]).split()) > max_words:
            result.append(" ".join(current))
            current = []
        current.append(sentence)
    if current:
        result.append(" ".join(current))
    return [p for p in result if len(p.split()) <= 1.5 * max_words]


def split_topics(paragraphs: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    names = sorted(paragraphs)
    held_out = [n for i, n in enumerate(names) if i % EVAL_EVERY == EVAL_EVERY - 1]
    return [n for n in names if n not in held_out], held_out


def cloze_examples(topic: str, paragraphs: list[str], rng: np.random.Generator,
                   per_sentence: int = 1) -> list[Example]:
    """Cloze questions (see the module docstring) for every usable sentence of ``paragraphs``."""
    examples = []
    for p_index, context in enumerate(paragraphs):
        sentence_start = 0
        for sentence in _SENTENCE_END.split(context):
            offset = context.index(sentence, sentence_start)
            sentence_start = offset + len(sentence)
            words = [(m.start(), m.group()) for m in _WORD.finditer(sentence)]
            if len(words) < 6:
                continue
            candidates = [i for i, (_, w) in enumerate(words[1:], 1)
                          if re.fullmatch(r"[A-Za-z]{4,}", w) and w.lower() not in STOP_WORDS]
            if not candidates:
                continue
            chosen = rng.choice(candidates, size=min(per_sentence, len(candidates)), replace=False)
            for k, i in enumerate(sorted(int(c) for c in chosen)):
                left = [w for _, w in words[max(0, i - QUESTION_WORDS):i]]
                right = [w for _, w in words[i + 1:i + 1 + QUESTION_WORDS]]
                question = " ".join(left + ["what"] + right).rstrip(".,;:!?") + "?"
                start, answer = offset + words[i][0], words[i][1]
                examples.append(Example(f"{topic}-{p_index}-{start}-{k}", question, context,
                                        (Answer(answer, start),)))
    return examples


class ClozeStream:
    """Fresh training questions for every step: cloze questions (see the module docstring) on
    passages of ``min_words`` to ``max_words`` words drawn at random, with replacement, from
    ``words`` (running text, punctuation kept). ``examples(step, count, seed)`` depends only on
    its arguments, so a resumed run sees the same questions."""

    def __init__(self, words: list[str], min_words: int = 15, max_words: int = PASSAGE_WORDS):
        if not words or min_words < 6 or max_words < min_words:
            raise ValueError(f"ClozeStream: {len(words)} words, min_words {min_words}, max_words "
                             f"{max_words}; expected words, 6 <= min_words <= max_words")
        self.words = np.asarray(words, dtype=object)
        self.min_words, self.max_words = min_words, max_words

    def passage(self, rng: np.random.Generator) -> str:
        count = int(rng.integers(self.min_words, self.max_words + 1))
        words = self.words[rng.integers(len(self.words), size=count)].tolist()
        words[0] = words[0][:1].upper() + words[0][1:]
        return " ".join(words).rstrip(".,;:") + "."

    def examples(self, step: int, count: int, seed: int = 0) -> list[Example]:
        rng = np.random.default_rng([seed, 11, step])
        result = []
        while len(result) < count:
            # One question per sentence; keep one of them per passage.
            questions = cloze_examples(f"random-{seed}-{step}-{len(result)}",
                                       [self.passage(rng)], rng)
            if questions:
                result.append(questions[int(rng.integers(len(questions)))])
        return result


def builtin_task(seed: int = 0, max_eval_questions: int = 500
                 ) -> tuple[ClozeStream, list[Example], list[str]]:
    """``(training question stream, held-out examples, pre-training text lines)``."""
    paragraphs = topic_paragraphs()
    train_topics, eval_topics = split_topics(paragraphs)
    # Some paragraphs appear under several topics: keep the held-out ones unseen in training.
    seen = {p for t in train_topics for p in paragraphs[t]}
    held_paragraphs = {t: [p for p in paragraphs[t] if p not in seen] for t in eval_topics}
    rng = np.random.default_rng(seed)
    held_out = [e for t in eval_topics
                for e in cloze_examples(t, held_paragraphs[t], rng, per_sentence=3)]
    if max_eval_questions > 0 and len(held_out) > max_eval_questions:
        keep = np.sort(np.random.default_rng(seed + 1).choice(len(held_out), max_eval_questions,
                                                              replace=False))
        held_out = [held_out[i] for i in keep]
    text = [p for t in train_topics for p in paragraphs[t]]
    return ClozeStream([w for line in text for w in line.split()]), held_out, text


def train_wordpiece_vocab(lines: list[str], path: str, vocab_size: int = 4000) -> str:
    """Trains a lower-cased BERT WordPiece vocabulary on ``lines``; writes ``path`` (vocab.txt).

    The same lines give the same file in every process (tests/test_recipes_bert.py checks it).
    """
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(lowercase=True)
    # The trainer numbers each "##c" (c after a word's first letter) when it first meets it in a
    # randomly seeded hash map, and breaks ties between equally frequent merges by those numbers.
    # Special tokens are numbered first, in order: listing every "##c", sorted, fixes them all.
    words = (w for line in lines for w, _ in
             tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(line)))
    continuations = sorted({"##" + c for w in words for c in w[1:]})
    tokenizer.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[*SPECIAL_TOKENS, *continuations])
    # WordPiece does not depend on the ids: a canonical order (specials, then sorted) is tidier.
    tokens = sorted(t for t in tokenizer.get_vocab() if t not in SPECIAL_TOKENS)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join([*SPECIAL_TOKENS, *tokens]) + "\n")
    return path


def mlm_sequences(lines: list[str], tokenizer, max_seq_length: int) -> np.ndarray:
    """The text as consecutive ``[CLS] tokens [SEP]`` rows of ``max_seq_length`` (padded)."""
    cls_id, sep_id, pad_id = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    ids = [i for enc in tokenizer.encode_batch(lines, add_special_tokens=False) for i in enc.ids]
    body = max_seq_length - 2
    rows = []
    for start in range(0, len(ids), body):
        chunk = [cls_id, *ids[start:start + body], sep_id]
        rows.append(chunk + [pad_id] * (max_seq_length - len(chunk)))
    return np.asarray(rows, np.int32)


def mask_tokens(rows: np.ndarray, rng: np.random.Generator, vocab_size: int, mask_id: int,
                special_ids: tuple[int, ...], pad_id: int, max_predictions: int,
                mask_rate: float = 0.15) -> dict[str, np.ndarray]:
    """BERT's masking: 15% of the tokens are predicted; of those 80% become [MASK], 10% a random
    token, 10% stay. Model inputs and ``masked_positions``, ``masked_ids``, ``masked_weights``."""
    batch, length = rows.shape
    input_ids = rows.copy()
    positions = np.zeros((batch, max_predictions), np.int32)
    targets = np.zeros((batch, max_predictions), np.int32)
    weights = np.zeros((batch, max_predictions), np.float32)
    for b in range(batch):
        candidates = np.flatnonzero(~np.isin(rows[b], special_ids))
        count = min(max_predictions, max(1, int(round(len(candidates) * mask_rate))))
        chosen = np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False))
        for k, t in enumerate(chosen):
            positions[b, k], targets[b, k], weights[b, k] = t, rows[b, t], 1.0
            draw = rng.random()
            if draw < 0.8:
                input_ids[b, t] = mask_id
            elif draw < 0.9:
                input_ids[b, t] = rng.integers(len(special_ids), vocab_size)
    return {"input_ids": input_ids, "token_type_ids": np.zeros_like(rows),
            "attention_mask": (rows != pad_id).astype(np.int32), "masked_positions": positions,
            "masked_ids": targets, "masked_weights": weights}
