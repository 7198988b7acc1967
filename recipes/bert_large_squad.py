"""2:4 sparse BERT on extractive question answering: dense fine-tune -> prune -> masked fine-tune.

With no argument, runs the whole workflow on a question-answering task built from Python's own
documentation (``pydoc_data.topics``, shipped with CPython): a WordPiece vocabulary trained on
the text, a 4-layer BERT pre-trained briefly by masked LM on it, fine-tuned on cloze questions
(a sentence of the passage with one word replaced by "what"; the answer is that word), pruned,
and fine-tuned again with the 2:4 mask, all in a few minutes on a CPU. With ``--train-file``,
``--predict-file`` and ``--checkpoint`` it runs BERT-Large on SQuAD v1.1 (Table 2 of NVIDIA's
"Accelerating Sparse Deep Neural Networks": F1 91.9 dense / 91.9 2:4 sparse).
"""

import argparse
import os
import sys
import time

# `python recipes/bert_large_squad.py` puts recipes/ on sys.path; the shared code is
# `recipes.common`.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(1, _REPO_ROOT)

from recipes.engine import cli  # noqa: E402  (no jax: --help stays fast
from recipes.text import bert_configs

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
Several hosts:           the same command with --distributed on every host
Every code path, fast:   python recipes/bert_large_squad.py --smoke
Outputs (in --workdir):  results.json, metrics.jsonl, curves.png, sparsity_report.txt,
                         checkpoints/{pretrain,dense,retrain,control}/<step>/,
                         sparse_model/ (the final 2:4 model as a Hugging Face
                         BertForQuestionAnswering directory)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-file", help="SQuAD v1.1 train-v1.1.json (with --predict-file: "
                        "the full recipe; without: the built-in pydoc task)")
    parser.add_argument("--predict-file", help="SQuAD v1.1 dev-v1.1.json, scored by F1 / EM")
    parser.add_argument("--checkpoint", help="pre-trained Hugging Face BERT directory "
                        "(config.json, vocab.txt, model.safetensors or pytorch_model.bin)")
    parser.add_argument("--init-from", help="a fine-tuned model instead of dense fine-tuning: a "
                        "Hugging Face directory with the qa_outputs head, or a recipe run directory")
    parser.add_argument("--size", choices=["large", "base", "medium", "small", "mini", "tiny"],
                        help="architecture when no checkpoint gives one (default large)")
    parser.add_argument("--workdir", help="output directory (default runs/bert_<dataset>)")
    parser.add_argument("--batch-size", type=int, help="global batch, split over all devices")
    parser.add_argument("--epochs", type=float,
                        help="epochs of each fine-tuning phase (SQuAD; the built-in task makes "
                             "fresh questions every step: use --steps)")
    parser.add_argument("--steps", type=int, help="steps of each fine-tuning phase")
    parser.add_argument("--lr", type=float, help="peak AdamW learning rate")
    cli.add_device_arguments(
        parser, control_default="off by default", workers_note=None,
        exported="the final 2:4 model (float32, [1, max_seq_length] int32 inputs)")
    cli.add_run_arguments(parser, "recipes/text/bert_configs.py", "--set max_seq_length=512")
    return parser


def config_from_args(args: argparse.Namespace) -> bert_configs.QAConfig:
    if (args.train_file is None) != (args.predict_file is None):
        raise SystemExit("--train-file and --predict-file go together (SQuAD v1.1); give "
                         "neither for the built-in task")
    squad = args.train_file is not None
    config = bert_configs.squad_config() if squad else bert_configs.builtin_config()
    if squad and not (args.checkpoint or args.init_from):
        raise SystemExit("SQuAD needs --checkpoint DIR (a pre-trained Hugging Face BERT) or "
                         "--init-from DIR (a fine-tuned one)")
    if not squad and args.epochs is not None:
        raise SystemExit("--epochs: the built-in task makes fresh questions every step, so it "
                         "has no epochs; give --steps N")
    config = config.replace(train_file=args.train_file, predict_file=args.predict_file)
    if args.smoke:
        config = bert_configs.smoke_config(config)
    overrides = {"checkpoint": args.checkpoint, "init_from": args.init_from, "size": args.size,
                 "batch_size": args.batch_size, "num_epochs": args.epochs,
                 "num_train_steps": args.steps, "learning_rate": args.lr, "devices": args.devices,
                 "export_onnx": args.export_onnx, "control": args.control}
    return cli.apply_command_line(config, overrides, args)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    dataset = "squad" if args.train_file else "pydoc_qa"
    workdir = args.workdir or os.path.join(
        "runs", f"bert_{'large_' if args.train_file else ''}{dataset}{'_smoke' if args.smoke else ''}")
    from recipes.text import bert_train  # imported late: --help answers without jax

    started = time.time()
    results = bert_train.train_and_evaluate(config, workdir, resume=args.resume,
                                            overwrite=args.overwrite)
    print(f"total wall time {time.time() - started:.0f} s, CPU time {results['cpu_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
