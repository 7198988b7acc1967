"""2:4 sparse Transformer (fairseq's big WMT14 EN-DE model): dense -> prune -> retrain -> BLEU.

With no argument, runs the whole workflow on a built-in task that needs no download: English
sentences of the Python documentation shipped with Python (``pydoc_data.topics``), "translated"
into a made-up target language: the same sentences with every letter ROT13-enciphered
("Hello, world!" -> "Uryyb, jbeyq!"), with a base-shaped Transformer scaled down (2+2 layers,
d_model 128) to finish in minutes on a CPU. It is a letter cipher of English, not German: its
BLEU only compares the dense, one-shot 2:4 and retrained 2:4 models (and the dense control) with
each other. With ``--data-dir``, runs the real WMT14 English-German recipe (Table 2 of NVIDIA's
"Accelerating Sparse Deep Neural Networks": BLEU 28.2 dense, 28.5 2:4 sparse).
"""

EPILOG = """\
Table 2 (Transformer big on WMT14 EN-DE: dense 28.2 / 2:4 sparse 28.5 BLEU) on one host, 8 GPUs:
  python recipes/transformer_wmt.py --data-dir /data/wmt14_en_de --workdir runs/transformer_wmt14 \\
      --devices 8 --max-tokens 28672 --steps 300000 --workers 8
  /data/wmt14_en_de holds plain-text parallel files, one sentence per line, aligned by line:
    train.en train.de   WMT14 EN-DE training data (~4.5M pairs, e.g. from fairseq's
                        examples/translation/prepare-wmt14en2de.sh before its BPE step, or
                        NVIDIA DeepLearningExamples' data script), untokenised text
    valid.en valid.de   newstest2013 (validation loss)
    test.en  test.de    newstest2014 (BLEU; sacrebleu -t wmt14/full -l en-de --echo src/ref)
    spm.model           optional: a joint sentencepiece model; otherwise a 32,768-piece joint BPE
                        model is trained on train.{en,de} and saved as <workdir>/spm.model
  fairseq's transformer_vaswani_wmt_en_de_big: 6+6 layers, d_model 1024, FFN 4096, 16 heads,
  post-norm, dropout 0.3, shared embeddings (209,911,808 parameters at 32,768 pieces). Each phase
  (dense, then masked retraining from the one-shot 2:4 model) runs the same schedule: Adam betas
  (0.9, 0.98), eps 1e-8, inverse-sqrt lr, peak 1e-3 after 4,000 warm-up steps, label smoothing
  0.1, ~28.7k tokens per step in bf16 with f32 weights (fairseq used 8 x 3584 tokens with
  --update-freq 16; use --max-tokens 458752 and fewer steps to match its 460k-token batches
  where memory allows). BLEU: beam 4, length penalty 0.6, max length 1.2 * source + 10, sacreBLEU
  (13a, detokenised) on newstest2014. Expected: about 28 BLEU dense and 2:4 sparse (Table 2).

Start from a finished dense run instead of training (skips the dense phase):
  python recipes/transformer_wmt.py --data-dir /data/wmt14_en_de --init-from runs/transformer_wmt14
Continue a killed run:   the same command with --resume (same --workdir)
Several hosts:           the same command with --distributed on every host (SLURM, MPI:
                         detected; elsewhere add --coordinator-address HOST:PORT
                         --num-processes N --process-id I)
The base model:          --size base (transformer_wmt_en_de: d_model 512, FFN 2048, 8 heads)
Every code path, fast:   python recipes/transformer_wmt.py --smoke
Outputs (in --workdir):  results.json, metrics.jsonl, curves.png, sparsity_report.txt,
                         translations.txt, spm.model, checkpoints/{dense,retrain,control}/<step>/
A fair comparison:       --control also trains the dense model for the retraining steps
                         (on by default for the built-in task)
"""

if __name__ == "__main__":
    import _repo_root  # noqa: F401  (puts the repository root on sys.path)
    from recipes.text import translation_task

    translation_task.main("transformer_wmt", __doc__, EPILOG)
