"""Configurations of the BERT question-answering recipe: SQuAD v1.1 (BERT-Large), the built-in
pydoc task (the default) and smoke runs. A flat dataclass, so that every field can be set from the
command line (``--set name=value``) and is written verbatim into the run directory. No jax import
(``--help`` stays fast).
"""

from __future__ import annotations

import dataclasses

from recipes.engine.workflow import WorkflowConfig


@dataclasses.dataclass(frozen=True)
class QAConfig(WorkflowConfig):
    """Everything a BERT question-answering run needs (every field settable with ``--set``)."""

    # Model: a named size (bert.SIZES), or the checkpoint's own config with `checkpoint`.
    size: str = "large"
    hidden_size: int = -1  # > 0: override the size's (built-in task)
    num_layers: int = -1
    num_heads: int = -1
    intermediate_size: int = -1
    dropout: float = -1.0  # >= 0: override hidden and attention dropout
    initializer_range: float = -1.0  # > 0: std of the initial weights (BERT: 0.02)

    # Data. SQuAD JSON files, or the built-in pydoc task when both are None.
    train_file: str | None = None
    predict_file: str | None = None
    checkpoint: str | None = None  # Hugging Face pre-trained BERT directory
    vocab_size: int = 4000  # built-in task: WordPiece vocabulary trained on the text
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    n_best: int = 20
    max_answer_length: int = 30
    max_train_examples: int = -1  # > 0: the first questions only (smoke runs)
    max_eval_examples: int = -1

    # Masked-LM pre-training (built-in task only).
    pretrain_steps: int = 0
    pretrain_batch_size: int = 64
    pretrain_learning_rate: float = 1e-3
    max_predictions: int = 20

    # Fine-tuning, the same schedule for the dense and the masked phase (Google's SQuAD recipe
    # for BERT-Large: batch 24, lr 3e-5, 2 epochs, 10% warmup; AdamW weight decay 0.01).
    batch_size: int = 24
    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    num_epochs: float = 2.0

    # Bookkeeping.
    eval_batch_size: int = 64
    log_every_steps: int = 50

    @property
    def builtin(self) -> bool:
        return self.train_file is None and self.predict_file is None


def squad_config() -> QAConfig:
    """BERT-Large on SQuAD v1.1 (needs --train-file, --predict-file and --checkpoint)."""
    return QAConfig()


def builtin_config() -> QAConfig:
    """The default: a 2-layer, 64-wide BERT on the pydoc task, about 6 minutes on 2 cores.

    Fresh questions every step (``qa_data.ClozeStream``), so a fixed step count, not epochs.
    float32: bfloat16 is no faster on the CPU, and the probes that chose these settings used it.
    """
    return QAConfig(
        size="tiny", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
        dropout=0.0, compute_dtype="float32", max_seq_length=64, doc_stride=16,
        max_query_length=32, pretrain_steps=1000, pretrain_batch_size=32,
        pretrain_learning_rate=1e-3, batch_size=64, learning_rate=2e-3, num_train_steps=2000,
        eval_batch_size=128, log_every_steps=50, checkpoint_every_steps=500)


def smoke_config(base: QAConfig) -> QAConfig:
    """A tiny model and a few steps that run every code path (bf16 compute, as at full scale)."""
    return base.replace(
        compute_dtype="bfloat16",
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=1000,
        max_seq_length=64, doc_stride=24, max_query_length=24, pretrain_steps=4 if base.builtin else 0,
        pretrain_batch_size=8, batch_size=8, eval_batch_size=16, num_train_steps=4,
        max_train_examples=64, max_eval_examples=24, log_every_steps=2, checkpoint_every_steps=4,
        control=True, progress_bar=False)
