"""Parallel text, a joint sentencepiece BPE model, and length-bucketed token batches (grain).

Full scale (``--data-dir``): ``{train,valid,test}.{en,de}`` plain-text files, one sentence per
line, aligned by line (and optionally ``spm.model``). Built in: English prose of
``pydoc_data.topics`` "translated" into its ROT13 cipher (``"Hello, world!"`` -> ``"Uryyb,
jbeyq!"``), a made-up target language (recipes/README.md). Pieces: ``pad`` 0, ``unk`` 1, ``bos``
2, ``eos`` 3. Training batches hold about ``max_tokens`` tokens: each pair goes to the smallest
length bucket that holds it; buckets and batches are shuffled anew each epoch.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import os
import re
import textwrap
from collections.abc import Iterator, Sequence

import numpy as np

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPLITS = ("train", "valid", "test")


def builtin_sentences(min_words: int = 3, max_words: int = 40) -> list[str]:
    """Unique English prose sentences of ``pydoc_data.topics`` (no code blocks or grammar)."""
    import pydoc_data.topics

    sentences, seen = [], set()
    for topic in sorted(pydoc_data.topics.topics):
        for block in re.split(r"\n\s*\n", pydoc_data.topics.topics[topic]):
            block = textwrap.dedent(block)
            lines = block.split("\n")
            # Indented lines are code or tables; '>>>' and '::=' mark examples and grammar.
            if (any(line.startswith(" ") for line in lines) or ">>>" in block or "::=" in block
                    or block.startswith("*")):
                continue
            paragraph = " ".join(line.strip() for line in lines)
            for sentence in re.split(r"(?<=[.!?:])\s+(?=[A-Z\"(‘])", paragraph):
                if min_words <= len(sentence.split()) <= max_words and sentence not in seen:
                    seen.add(sentence)
                    sentences.append(sentence)
    return sentences


def to_target_language(sentence: str) -> str:
    """The built-in "translation": ROT13 on every ASCII letter (spaces and punctuation kept)."""
    return codecs.encode(sentence, "rot13")


def _split_of(sentence: str, num_buckets: int = 100) -> int:
    return int(hashlib.sha256(sentence.encode()).hexdigest(), 16) % num_buckets


def builtin_corpus(test_percent: int = 12, valid_percent: int = 5, max_words: int = 25,
                   num_windows: int = 0, seed: int = 0) -> dict[str, tuple[list[str], list[str]]]:
    """``{"train" | "valid" | "test": (english, target)}``, split by a hash of each sentence;
    ``num_windows`` extra training pairs are spans of 3 to ``max_words`` running words (so that a
    small corpus teaches the word-by-word mapping rather than its sentences by heart)."""
    splits = {name: ([], []) for name in SPLITS}
    for sentence in builtin_sentences(max_words=max_words):
        bucket = _split_of(sentence)
        name = ("test" if bucket < test_percent else
                "valid" if bucket < test_percent + valid_percent else "train")
        splits[name][0].append(sentence)
        splits[name][1].append(to_target_language(sentence))
    words = " ".join(splits["train"][0]).split()
    rng = np.random.default_rng(seed)
    for _ in range(num_windows):
        length = int(rng.integers(3, max_words + 1))
        start = int(rng.integers(0, len(words) - length))
        window = " ".join(words[start:start + length])
        splits["train"][0].append(window)
        splits["train"][1].append(to_target_language(window))
    return splits


def read_parallel(data_dir: str, split: str, source_lang: str = "en", target_lang: str = "de",
                  max_pairs: int = -1) -> tuple[list[str], list[str]]:
    """``<data_dir>/<split>.<lang>`` for both languages, checked to have equally many lines."""
    paths = [os.path.join(data_dir, f"{split}.{lang}") for lang in (source_lang, target_lang)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"--data-dir {data_dir!r}: missing {', '.join(missing)}; expected plain-text "
            f"parallel files {{train,valid,test}}.{{{source_lang},{target_lang}}}, one sentence "
            "per line (see --help)")
    sides = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        sides.append(lines if max_pairs < 0 else lines[:max_pairs])
    if len(sides[0]) != len(sides[1]):
        raise ValueError(f"{paths[0]} has {len(sides[0])} lines but {paths[1]} has "
                         f"{len(sides[1])}; parallel files must be aligned line by line")
    return sides[0], sides[1]


def train_sentencepiece(texts: Sequence[str], vocab_size: int, *, max_sentences: int = 10_000_000,
                        num_threads: int = 1) -> bytes:
    """A joint BPE model trained on ``texts``; returns the serialized model."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, pad_id=PAD_ID, unk_id=UNK_ID,
        bos_id=BOS_ID, eos_id=EOS_ID, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
        num_threads=num_threads, minloglevel=2)
    return model.getvalue()


def load_sentencepiece(model: bytes | str):
    """A ``SentencePieceProcessor`` from serialized bytes or a ``.model`` path."""
    import sentencepiece as spm

    if isinstance(model, str):
        return spm.SentencePieceProcessor(model_file=model)
    return spm.SentencePieceProcessor(model_proto=model)


@dataclasses.dataclass
class TokenizedPairs:
    """Pieces of each pair (no special tokens), and the texts they came from."""

    source: list[np.ndarray]
    target: list[np.ndarray]
    source_text: list[str]
    target_text: list[str]

    def __len__(self) -> int:
        return len(self.source)


def tokenize_pairs(processor, source: Sequence[str], target: Sequence[str]) -> TokenizedPairs:
    encode = lambda texts: [np.asarray(ids, np.int32) for ids in processor.encode(list(texts))]
    return TokenizedPairs(encode(source), encode(target), list(source), list(target))


def bucket_of(length: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds ``length`` tokens, or None if none does."""
    return next((size for size in buckets if length <= size), None)


def _example_length(pairs: TokenizedPairs, i: int) -> int:
    # Source + eos; decoder input bos + target (the output target + eos has the same length).
    return max(len(pairs.source[i]), len(pairs.target[i])) + 1


def make_batch(pairs: TokenizedPairs, indices: Sequence[int], rows: int,
               length: int) -> dict[str, np.ndarray]:
    """``src``, ``tgt_in`` (``bos`` + target), ``tgt_out`` (target + ``eos``), padded."""
    batch = {name: np.full((rows, length), PAD_ID, np.int32) for name in ("src", "tgt_in",
                                                                          "tgt_out")}
    for row, i in enumerate(indices):
        src, tgt = pairs.source[i], pairs.target[i]
        batch["src"][row, :len(src) + 1] = np.append(src, EOS_ID)
        batch["tgt_in"][row, :len(tgt) + 1] = np.insert(tgt, 0, BOS_ID)
        batch["tgt_out"][row, :len(tgt) + 1] = np.append(tgt, EOS_ID)
    return batch


class TokenBatchSource:
    """Random access to the token batches of ``num_epochs`` epochs (a grain data source): index
    ``i`` is batch ``i % per_epoch`` of epoch ``i // per_epoch``, each epoch shuffled by ``seed``
    and the epoch, so the index alone is the iterator state. Pairs longer than the largest bucket
    are left out (``num_dropped``)."""

    def __init__(self, pairs: TokenizedPairs, buckets: Sequence[int], max_tokens: int, seed: int,
                 num_epochs: int, rows_multiple_of: int = 1, process_index: int = 0,
                 process_count: int = 1):
        if not buckets or list(buckets) != sorted(buckets):
            raise ValueError(f"buckets must be increasing lengths, got {buckets}")
        self.pairs, self.seed, self.num_epochs = pairs, seed, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.by_bucket: dict[int, list[int]] = {size: [] for size in buckets}
        self.num_dropped = 0
        for i in range(len(pairs)):
            size = bucket_of(_example_length(pairs, i), buckets)
            if size is None:
                self.num_dropped += 1
            else:
                self.by_bucket[size].append(i)
        multiple = rows_multiple_of * process_count
        rows = {size: max(max_tokens // size, 1) for size in buckets}
        self.rows = {size: max(multiple, n - n % multiple) for size, n in rows.items()}
        self.per_epoch = sum(-(-len(ix) // self.rows[size]) for size, ix in self.by_bucket.items())
        if self.per_epoch == 0:
            raise ValueError("no training pair fits the length buckets "
                             f"{list(buckets)} (longest allowed: {buckets[-1]} tokens)")
        self._epoch_cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None

    def __len__(self) -> int:
        return self.per_epoch * self.num_epochs

    def epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """``(bucket, example indices)`` of every batch of ``epoch``, in the epoch's order."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            for size, indices in self.by_bucket.items():
                order = rng.permutation(np.asarray(indices, np.int64))
                rows = self.rows[size]
                batches += [(size, order[i:i + rows]) for i in range(0, len(order), rows)]
            order = rng.permutation(len(batches))
            self._epoch_cache = (epoch, [batches[i] for i in order])
        return self._epoch_cache[1]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        epoch, position = divmod(int(index), self.per_epoch)
        size, indices = self.epoch_batches(epoch)[position]
        rows = self.rows[size]
        batch = make_batch(self.pairs, indices, rows, size)
        # This process's contiguous share of the global batch's rows.
        share = rows // self.process_count
        return {k: v[self.process_index * share:(self.process_index + 1) * share]
                for k, v in batch.items()}


def train_iterator(source: TokenBatchSource, num_workers: int = 0):
    """A checkpointable grain iterator over ``source`` (``get_state`` / ``set_state``)."""
    import grain

    dataset = grain.MapDataset.source(source).to_iter_dataset()
    if num_workers > 0:
        from recipes.vision import input_pipeline

        dataset = dataset.mp_prefetch(input_pipeline._multiprocessing_options(num_workers))
    return iter(dataset)


def eval_batches(pairs: TokenizedPairs, buckets: Sequence[int], batch_size: int
                 ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Every pair once, sorted by length, in ``(indices, batch)`` of ``batch_size`` rows (index
    -1: padding rows). Pairs longer than the largest bucket are truncated to it, not dropped."""
    lengths = [_example_length(pairs, i) for i in range(len(pairs))]
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        size = bucket_of(max(lengths[i] for i in chunk), buckets) or buckets[-1]
        truncated = TokenizedPairs([pairs.source[i][:size - 1] for i in chunk],
                                   [pairs.target[i][:size - 1] for i in chunk], [], [])
        batch = make_batch(truncated, range(len(chunk)), batch_size, size)
        indices = np.full((batch_size,), -1, np.int64)
        indices[:len(chunk)] = chunk
        yield indices, batch
