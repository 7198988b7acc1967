"""Language-model text: the standard library's own sources (built-in) or WikiText-2 raw files.

Built-in: the top-level ``*.py`` modules of ``sysconfig.get_paths()["stdlib"]`` in sorted order;
every ``VALID_EVERY``-th module (the 1st, 11th, ...) is held out for validation, the rest train
a byte-level BPE (`train_bpe`) and the model. Full scale: ``wiki.{train,valid,test}.raw`` of
WikiText-2 (raw), tokenised with GPT-2's own tokenizer, evaluated as published for GPT-2:
non-overlapping 1,024-token windows of the test file (stride = window), every token but each
window's first predicted (`eval_windows`).
"""

from __future__ import annotations

import glob
import os
import sysconfig

import numpy as np

VALID_EVERY = 10
END_OF_TEXT = "<|endoftext|>"


def stdlib_modules(max_bytes: int = -1) -> dict[str, list[str]]:
    """``{"train": [source, ...], "valid": [...]}`` from the standard library's modules."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if not files:
        raise FileNotFoundError(f"no *.py files in {sysconfig.get_paths()['stdlib']}")
    splits: dict[str, list[str]] = {"train": [], "valid": []}
    for index, path in enumerate(files):
        with open(path, encoding="utf-8", errors="replace") as f:
            splits["valid" if index % VALID_EVERY == 0 else "train"].append(f.read())
    if max_bytes > 0:  # smoke runs: the first max_bytes characters of each split
        splits = {split: ["".join(texts)[:max_bytes]] for split, texts in splits.items()}
    return splits


def wikitext2(data_dir: str) -> dict[str, list[str]]:
    """``{"train", "valid", "test"}``: each WikiText-2 raw file's text as one document."""
    splits = {}
    for split in ("train", "valid", "test"):
        path = os.path.join(data_dir, f"wiki.{split}.raw")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data-dir {data_dir}: no wiki.{split}.raw (WikiText-2 raw, "
                                    "e.g. wikitext-2-raw-v1.zip unpacked)")
        with open(path, encoding="utf-8") as f:
            splits[split] = [f.read()]
    return splits


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE (``tokenizers``) on ``texts``, with ``<|endoftext|>`` as id 0.

    Deterministic (the same vocabulary in fresh processes, tested): the 256 byte symbols are
    given up front and the trainer breaks ties between equally frequent pairs by their ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str):
    """A ``tokenizer.json`` (a file, or a directory holding one, as Hugging Face's GPT-2)."""
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"tokenizer {path!r}: no such file (expected a tokenizer.json)")
    return Tokenizer.from_file(file)


def encode(tokenizer, texts: list[str]) -> np.ndarray:
    """One int32 token stream: each text's ids followed by ``<|endoftext|>`` (if in the vocabulary)."""
    end = tokenizer.token_to_id(END_OF_TEXT)
    ids = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        if end is not None and len(texts) > 1:
            ids.append(end)
    return np.asarray(ids, np.int32)


def random_windows(stream: np.ndarray, count: int, length: int, seed) -> np.ndarray:
    """``count`` windows of ``length`` tokens at uniformly random starts (``seed``: a NumPy seed)."""
    if len(stream) <= length:
        raise ValueError(f"the token stream ({len(stream)} tokens) is shorter than a window "
                         f"of {length}")
    starts = np.random.default_rng(seed).integers(0, len(stream) - length, count)
    return np.stack([stream[s:s + length] for s in starts])


def eval_windows(stream: np.ndarray, length: int, max_windows: int = -1) -> np.ndarray:
    """The stream cut into non-overlapping windows of ``length`` (the remainder dropped)."""
    count = len(stream) // length
    if max_windows > 0:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"the evaluation stream ({len(stream)} tokens) is shorter than one "
                         f"window of {length}")
    return stream[:count * length].reshape(count, length)
