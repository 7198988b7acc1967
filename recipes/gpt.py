"""2:4 sparse GPT: dense -> one-shot magnitude / Wanda / SparseGPT -> masked retraining -> perplexity.

With no argument, runs the whole workflow on text that ships with Python: a small GPT (GPT-2's
layout: 4 layers, d 128, 4 heads, 128 positions) trained on the standard library's own source
files with a 2,048-token byte-level BPE, held-out modules for validation; then one-shot 2:4 by
magnitude, Wanda and SparseGPT from 128 calibration windows, a short masked retraining of the best
one, and the held-out perplexity of each. With ``--init-from`` a Hugging Face GPT-2
``model.safetensors`` and ``--data-dir`` WikiText-2, the published GPT-2 evaluation.
"""

EPILOG = """\
GPT-2 (124M) on WikiText-2, one GPU:
  python recipes/gpt.py --init-from /models/gpt2 --data-dir /data/wikitext-2-raw \\
      --workdir runs/gpt2_wikitext2
  /models/gpt2 is a Hugging Face GPT-2 directory (model.safetensors, config.json, tokenizer.json;
  gpt2-medium/-large/-xl load the same way). /data/wikitext-2-raw
  holds wiki.train.raw, wiki.valid.raw, wiki.test.raw (wikitext-2-raw-v1). Perplexity of
  wiki.test.raw in non-overlapping 1,024-token windows (stride = window), as published for GPT-2;
  128 calibration windows of 1,024 tokens from wiki.train.raw; retraining: 1,000 steps of 8
  windows, AdamW lr 5e-5, bf16 compute.
  Llama-architecture checkpoints are not supported.

Continue a killed run:   the same command with --resume (same --workdir)
One method only:         --methods sparsegpt (comma-separated: magnitude,wanda,sparsegpt)
Every code path, fast:   python recipes/gpt.py --smoke
Outputs (in --workdir):  results.json (one_shot_perplexity per method), metrics.jsonl,
                         curves.png, sparsity_report.txt, tokenizer.json,
                         sparse_model.safetensors (Hugging Face GPT-2 names),
                         checkpoints/{dense,retrain,control}/<step>/
A fair comparison:       --control also trains the dense model for the retraining steps
"""

if __name__ == "__main__":
    import _repo_root  # noqa: F401  (puts the repository root on sys.path)
    from recipes.text import gpt_task

    gpt_task.main("gpt", __doc__, EPILOG)
