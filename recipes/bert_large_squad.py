"""2:4 sparse BERT on extractive question answering: dense fine-tune -> prune -> masked fine-tune.

With no argument, runs the whole workflow on a question-answering task built from Python's own
documentation (``pydoc_data.topics``, shipped with CPython): a WordPiece vocabulary trained on
the text, a 4-layer BERT pre-trained briefly by masked LM on it, fine-tuned on cloze questions
(a sentence of the passage with one word replaced by "what"; the answer is that word), pruned,
and fine-tuned again with the 2:4 mask, all in a few minutes on a CPU. With ``--train-file``,
``--predict-file`` and ``--checkpoint`` it runs BERT-Large on SQuAD v1.1 (Table 2 of NVIDIA's
"Accelerating Sparse Deep Neural Networks": F1 91.9 dense / 91.9 2:4 sparse).
"""

import os
import sys

# `python recipes/bert_large_squad.py` puts recipes/ on sys.path; the shared code is in `recipes`.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(1, _REPO_ROOT)

EPILOG = """\
Table 2 (BERT-Large, SQuAD v1.1: F1 91.9 dense / 91.9 2:4 sparse) on one host with 8 GPUs:
  python recipes/bert_large_squad.py \\
      --train-file /data/squad/train-v1.1.json --predict-file /data/squad/dev-v1.1.json \\
      --checkpoint /models/bert-large-uncased --workdir runs/bert_large_squad \\
      --devices 8 --batch-size 24 --epochs 2 --lr 3e-5
  /models/bert-large-uncased is a Hugging Face directory (config.json, vocab.txt and
  model.safetensors or pytorch_model.bin; the latter needs torch), e.g. bert-large-uncased
  (335,141,888 parameters) or bert-large-uncased-whole-word-masking. Windows of 384 tokens with
  doc stride 128 and questions cut to 64 tokens; AdamW lr 3e-5, 10% linear warmup then linear
  decay, weight decay 0.01 (not on biases and LayerNorms), batch 24 (3 per GPU), 2 epochs, bf16
  compute with float32 weights. Then 2:4 pruning of every encoder Linear (q, k, v, attention
  output, intermediate, output) along its input dimension, one-shot evaluation, and the same 2
  epochs again with sparse_jax.masked(optax.adamw(...)). Answers: 20-best start/end logits, at
  most 30 tokens, scored by the official v1.1 F1 / exact match on dev-v1.1.json. Expected:
  F1 about 91 dense (bert-large-uncased-whole-word-masking: 93), 2:4 sparse within a point.

Start from a fine-tuned model instead (skips dense fine-tuning):
  --init-from /models/bert-large-uncased-whole-word-masking-finetuned-squad  (Hugging Face)
  --init-from runs/bert_large_squad                                           (a finished run)

Continue a killed run:   the same command with --resume (same --workdir)
Several hosts:           the same command with --distributed on every host (SLURM, MPI:
                         detected; elsewhere add --coordinator-address HOST:PORT
                         --num-processes N --process-id I)
Every code path, fast:   python recipes/bert_large_squad.py --smoke
Outputs (in --workdir):  results.json, metrics.jsonl, curves.png, sparsity_report.txt,
                         checkpoints/{pretrain,dense,retrain,control}/<step>/,
                         sparse_model/ (the final 2:4 model as a Hugging Face
                         BertForQuestionAnswering directory)
"""


def main(argv: list[str] | None = None) -> dict:
    from recipes.text import qa_task

    return qa_task.main("bert_large_squad", __doc__, EPILOG, argv)


if __name__ == "__main__":
    main()
