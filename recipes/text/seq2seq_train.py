"""The 2:4 workflow for translation: dense -> prune -> retrain, scored with sacreBLEU.

``train_and_evaluate(config, workdir)`` runs, as one resumable job:

1. **dense**: the Transformer trained with fairseq's schedule (Adam betas (0.9, 0.98),
   inverse-square-root learning rate after a linear warm-up, label-smoothed cross-entropy 0.1),
   or loaded from a finished run (``init_from``);
2. **prune**: ``sparse_jax.prune`` with `PRUNING_RULES`: the q/k/v/output projections of every
   attention and both feed-forward matrices keep the 2 largest of every 4 weights along their
   input axis; the shared embedding (which is also the tied output projection) stays dense. The
   pruned model is scored as is (one-shot);
3. **retrain**: the same schedule again (warm-up included), from the pruned weights with a fresh
   Adam wrapped in ``sparse_jax.masked``, so that every step keeps the weights exactly 2:4;
4. optionally **control** (``control``, on for the built-in task): the dense model trained the same
   way for as many more steps without a mask, so that sparse and dense compare at equal steps.

BLEU is sacreBLEU's corpus BLEU (13a tokenisation of the detokenised output, case-sensitive; the
signature is printed and saved) of beam search (beam 4, length penalty 0.6) on the test set, the
score NVIDIA's DeepLearningExamples report for this model. (fairseq's papers quote tokenised
BLEU with compound splitting, which reads about 1 BLEU higher on newstest2014.)

Training is data parallel over ``train.create_mesh`` (batch rows split along ``"data"``); the
run directory gets ``results.json``, ``metrics.jsonl``, ``curves.png``, ``sparsity_report.txt``,
``config.json``, ``spm.model``, ``translations.txt`` and ``checkpoints/{dense,retrain}/<step>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from recipes.engine import cli

# Which leaves 2:4 pruning touches, first match wins (see sparse_jax.plan_tree). Forcing axis 0
# (the input axis of an (in, out) kernel) makes a renamed or reshaped projection fail loudly.
PRUNING_RULES = (
    (r"embed_tokens/embedding$", "skip"),  # shared input embeddings = the tied output projection
    (r"(self_attn|encoder_attn)/(q_proj|k_proj|v_proj|out_proj)/kernel$", 0),
    (r"ffn/(fc1|fc2)/kernel$", 0),
)
SKIP_EXPLANATIONS = {
    "embed_tokens/embedding": "embedding lookup shared by encoder, decoder and the tied output "
                              "projection (kept dense, as in NVIDIA's recipe)",
}
PHASES = ("dense", "retrain", "control")


@dataclasses.dataclass(frozen=True)
class TranslationConfig:
    """Everything a run depends on (``--set FIELD=VALUE`` overrides any field)."""

    model: str = "transformer_wmt"
    size: str = "big"  # fairseq's transformer_vaswani_wmt_en_de_big; "base" = transformer_wmt_en_de
    # Model overrides (None: the size's value).
    d_model: int | None = None
    ffn_dim: int | None = None
    num_heads: int | None = None
    encoder_layers: int | None = None
    decoder_layers: int | None = None
    dropout: float | None = None
    attention_dropout: float = 0.0
    normalize_before: bool = False
    compute_dtype: str = "bfloat16"
    # Data.
    data_dir: str | None = None
    source_lang: str = "en"
    target_lang: str = "de"
    spm_model: str | None = None  # a sentencepiece .model; default <data_dir>/spm.model or train one
    vocab_size: int = 32768
    spm_train_sentences: int = 10_000_000
    max_train_pairs: int = -1
    buckets: tuple[int, ...] = (16, 24, 32, 48, 64, 96, 128, 256)
    max_tokens: int = 3584 * 8  # tokens per global batch (fairseq --max-tokens 3584, 8 GPUs)
    num_workers: int = 0
    builtin_max_words: int = 25  # built-in task: longest sentence, in words
    builtin_windows: int = 6000  # built-in task: extra training spans of running text
    # Schedule (fairseq: --optimizer adam --adam-betas (0.9,0.98) --lr-scheduler inverse_sqrt).
    learning_rate: float = 1e-3
    warmup_steps: int = 4000
    warmup_init_lr: float = 1e-7
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    num_train_steps: int = 300_000  # per phase
    control: bool = False  # also train the dense model for the retraining steps (fair comparison)
    export_onnx: str | None = None  # also write the final 2:4 model to this ONNX file
    # Evaluation.
    beam_size: int = 4
    length_penalty: float = 0.6
    max_length_a: float = 1.2  # decode at most a * source length + b tokens
    max_length_b: int = 10
    eval_batch_size: int = 128  # sentences per beam-search batch
    max_eval_sentences: int = -1
    bleu_during_training: int = 0  # BLEU evaluations per phase besides the final one
    eval_every_steps: int = 1000  # validation loss
    log_every_steps: int = 100
    # Bookkeeping.
    checkpoint_every_steps: int = 5000
    max_checkpoints_to_keep: int = 2
    seed: int = 0
    devices: int = -1
    init_from: str | None = None  # a run directory whose dense checkpoint replaces dense training
    progress_bar: bool = True
    distributed: bool = False
    interrupt_after_steps: int = 0  # tests: simulate a killed run
    sparsity_n: int = 2
    sparsity_m: int = 4

    def replace(self, **changes) -> "TranslationConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def model_config(self, vocab_size: int):
        from recipes.text import transformer

        overrides = {name: getattr(self, name) for name in
                     ("d_model", "ffn_dim", "num_heads", "encoder_layers", "decoder_layers",
                      "dropout") if getattr(self, name) is not None}
        return transformer.transformer_config(
            self.size, vocab_size, attention_dropout=self.attention_dropout,
            normalize_before=self.normalize_before, dtype=self.compute_dtype, **overrides)


def wmt14_config() -> TranslationConfig:
    """Table 2: the big Transformer on WMT14 EN-DE (fairseq's scaling-NMT settings, 8 GPUs)."""
    return TranslationConfig()


def builtin_config() -> TranslationConfig:
    """The default: a base-shaped model scaled down to run all three steps on 2 CPU cores in minutes."""
    return TranslationConfig(
        size="base", d_model=128, ffn_dim=256, num_heads=4, encoder_layers=2, decoder_layers=2,
        dropout=0.0, compute_dtype="float32", vocab_size=1000, buckets=(24, 48, 96),
        max_tokens=2048, learning_rate=3e-3, warmup_steps=100, num_train_steps=600, control=True,
        eval_batch_size=96, eval_every_steps=200, log_every_steps=25,
        checkpoint_every_steps=200, spm_train_sentences=100_000)


def smoke_config(config: TranslationConfig) -> TranslationConfig:
    """A tiny model and a few steps of everything (all phases, checkpoints, BLEU, plot)."""
    return config.replace(
        size="base", d_model=32, ffn_dim=64, num_heads=2, encoder_layers=1, decoder_layers=1,
        dropout=0.1, compute_dtype="float32", vocab_size=300, buckets=(96,), max_tokens=1536,
        warmup_steps=4, num_train_steps=6, eval_every_steps=3, log_every_steps=2,
        checkpoint_every_steps=3, max_eval_sentences=16, eval_batch_size=16, max_train_pairs=300,
        max_length_a=0.0, max_length_b=12, spm_train_sentences=10_000, progress_bar=False)


# ---------------------------------------------------------------------------------------------
# Schedule, loss, steps
# ---------------------------------------------------------------------------------------------


def inverse_sqrt_schedule(config: TranslationConfig):
    """fairseq's inverse_sqrt: linear warm-up to ``learning_rate``, then ``lr * sqrt(warmup / step)``.

    ``step`` is optax's update count (0 for the first update, which fairseq numbers 1).
    """
    import jax.numpy as jnp

    def schedule(count):
        update = jnp.asarray(count, jnp.float32) + 1.0
        warmup = max(config.warmup_steps, 1)
        ramp = config.warmup_init_lr + (config.learning_rate - config.warmup_init_lr) * update / warmup
        decay = config.learning_rate * jnp.sqrt(warmup / update)
        return jnp.where(update < warmup, ramp, decay)

    return schedule


def create_optimizer(config: TranslationConfig):
    import optax

    adam = optax.adam(inverse_sqrt_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                      eps=config.adam_eps)
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), adam)
    return adam


def label_smoothed_loss(logits, targets, smoothing: float, pad_id: int):
    """Sums over non-pad tokens of the label-smoothed loss and of the plain NLL, and the count.

    The smoothed target puts ``1 - smoothing`` on the reference token and spreads ``smoothing``
    uniformly over the vocabulary (fairseq's label_smoothed_cross_entropy, up to its eps/(V-1)).
    """
    import jax
    import jax.numpy as jnp

    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    uniform = -jnp.mean(log_probs, axis=-1)
    loss = (1.0 - smoothing) * nll + smoothing * uniform
    weights = (targets != pad_id).astype(jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(nll * weights), jnp.sum(weights)


def make_train_step(graphdef, tx, mesh, config: TranslationConfig, pad_id: int) -> Callable:
    """A jitted ``(state, batch, step) -> (state, metrics)``; the loss is per target token."""
    import jax
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    base_key = jax.random.key(config.seed)

    def train_step(state, batch, step):
        dropout_rng = jax.random.fold_in(base_key, step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            logits = model(batch["src"], batch["tgt_in"], dropout_rng=dropout_rng)
            loss, nll, count = label_smoothed_loss(logits, batch["tgt_out"],
                                                   config.label_smoothing, pad_id)
            count = jax.numpy.maximum(count, 1.0)
            return loss / count, (nll / count, count)

        (loss, (nll, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {**state, "params": params, "opt_state": opt_state}, {
            "loss": loss, "nll": nll, "tokens": count}

    return jax.jit(train_step, in_shardings=(replicated, data, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def make_loss_step(graphdef, mesh, config: TranslationConfig, pad_id: int) -> Callable:
    """A jitted ``(params, batch) -> (summed nll, token count)`` without dropout."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def loss_step(params, batch):
        logits = nnx.merge(graphdef, params)(batch["src"], batch["tgt_in"])
        _, nll, count = label_smoothed_loss(logits, batch["tgt_out"], 0.0, pad_id)
        return nll, count

    return jax.jit(loss_step, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))


def make_translate_fn(graphdef, config: TranslationConfig, ids: dict[str, int]) -> Callable:
    """A jitted ``(params, src (B, S)) -> tokens (B, max_length)``: beam search with a KV cache."""
    import jax
    from flax import nnx

    from recipes.text import beam_search

    @functools.partial(jax.jit, static_argnames=("max_length",))
    def translate(params, src, max_length):
        model = nnx.merge(graphdef, params)
        cache = model.init_cache(model.encode(src), src, max_length)

        def step(tokens, position, cache):
            logits, cache = model.decode_step(tokens, position, cache)
            return jax.nn.log_softmax(logits, axis=-1), cache

        tokens, _ = beam_search.beam_search(
            step, cache, src.shape[0], beam_size=config.beam_size, max_length=max_length,
            bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
            length_penalty=config.length_penalty)
        return tokens

    return translate


def strip_special(tokens: np.ndarray, eos_id: int, pad_id: int) -> list[int]:
    """The tokens before the first ``eos`` (pads removed)."""
    out = []
    for token in tokens.tolist():
        if token == eos_id:
            break
        if token != pad_id:
            out.append(token)
    return out


def corpus_bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (13a tokenisation, case-sensitive) and its signature."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return float(score.score), str(metric.get_signature())


# ---------------------------------------------------------------------------------------------
# Data and evaluation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    processor: Any
    train: Any  # TokenizedPairs
    valid: Any
    test: Any
    name: str


def prepare_data(config: TranslationConfig, workdir: str, log: Callable = print) -> Data:
    """Reads (or builds) the corpus, loads or trains the joint sentencepiece model, tokenises."""
    from recipes.text import translation_data as td

    if config.data_dir:
        texts = {split: td.read_parallel(config.data_dir, split, config.source_lang,
                                         config.target_lang,
                                         config.max_train_pairs if split == "train" else -1)
                 for split in td.SPLITS}
        name = f"wmt14_{config.source_lang}_{config.target_lang}"
    else:
        texts = td.builtin_corpus(max_words=config.builtin_max_words,
                                  num_windows=config.builtin_windows, seed=config.seed)
        if config.max_train_pairs >= 0:
            texts["train"] = tuple(side[:config.max_train_pairs] for side in texts["train"])
        name = "pydoc_rot13"
    if config.max_eval_sentences >= 0:
        for split in ("valid", "test"):
            texts[split] = tuple(side[:config.max_eval_sentences] for side in texts[split])
    saved = os.path.join(workdir, "spm.model")
    candidates = [config.spm_model, saved,
                  os.path.join(config.data_dir, "spm.model") if config.data_dir else None]
    existing = next((path for path in candidates if path and os.path.isfile(path)), None)
    if config.spm_model and existing != config.spm_model:
        raise FileNotFoundError(f"spm_model {config.spm_model!r} does not exist")
    if existing:
        processor = td.load_sentencepiece(existing)
        log(f"sentencepiece: {existing} ({processor.get_piece_size()} pieces)")
    else:
        started = time.time()
        model = td.train_sentencepiece(texts["train"][0] + texts["train"][1], config.vocab_size,
                                       max_sentences=config.spm_train_sentences,
                                       num_threads=os.cpu_count() or 1)
        processor = td.load_sentencepiece(model)
        if _is_main_process():
            with open(saved, "wb") as f:
                f.write(model)
        log(f"sentencepiece: joint BPE of {processor.get_piece_size()} pieces trained on both "
            f"sides of the training text in {time.time() - started:.1f} s -> {saved}")
    special = {"pad": processor.pad_id(), "unk": processor.unk_id(), "bos": processor.bos_id(),
               "eos": processor.eos_id()}
    expected = {"pad": td.PAD_ID, "unk": td.UNK_ID, "bos": td.BOS_ID, "eos": td.EOS_ID}
    if special != expected:
        raise ValueError(f"the sentencepiece model's special ids are {special}; this recipe needs "
                         f"{expected} (train it with pad_id=0 unk_id=1 bos_id=2 eos_id=3)")
    splits = {split: td.tokenize_pairs(processor, *texts[split]) for split in td.SPLITS}
    return Data(processor, splits["train"], splits["valid"], splits["test"], name)


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def validation_loss(loss_step, params, pairs, config: TranslationConfig, mesh) -> float:
    """Mean per-token NLL of the reference translations (teacher forcing, no dropout)."""
    import jax

    from recipes.vision import train as image_train
    from recipes.text import translation_data as td

    rows = max(mesh.size, config.eval_batch_size - config.eval_batch_size % mesh.size)
    total, count = 0.0, 0.0
    for _, batch in td.eval_batches(pairs, config.buckets, rows):
        nll, tokens = jax.device_get(loss_step(params, image_train.shard_batch(batch, mesh)))
        total, count = total + float(nll), count + float(tokens)
    return total / max(count, 1.0)


def translate_and_score(translate, params, data: Data, config: TranslationConfig
                        ) -> dict[str, Any]:
    """Beam-search translations of the test set, detokenised by sentencepiece, and their BLEU."""
    import jax

    from recipes.text import translation_data as td

    pairs = data.test
    hypotheses = [""] * len(pairs)
    for indices, batch in td.eval_batches(pairs, config.buckets, config.eval_batch_size):
        src_length = batch["src"].shape[1]
        max_length = max(2, int(config.max_length_a * src_length) + config.max_length_b)
        tokens = np.asarray(jax.device_get(translate(params, batch["src"], max_length=max_length)))
        for row, index in enumerate(indices):
            if index >= 0:
                ids = strip_special(tokens[row], td.EOS_ID, td.PAD_ID)
                hypotheses[index] = data.processor.decode(ids)
    bleu, signature = corpus_bleu(hypotheses, pairs.target_text)
    return {"bleu": bleu, "signature": signature, "hypotheses": hypotheses,
            "sentences": len(pairs)}


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workflow:
    config: TranslationConfig
    workdir: str
    mesh: Any
    data: Data
    graphdef: Any
    loss_step: Callable
    translate: Callable
    log: Any  # metrics.MetricsLog
    steps_done: int = 0
    final_hypotheses: dict = dataclasses.field(default_factory=dict)  # phase -> test translations

    def print(self, *args) -> None:
        if _is_main_process():
            print(*args, flush=True)

    def score(self, params) -> dict[str, Any]:
        return translate_and_score(self.translate, params, self.data, self.config)


class Interrupted(RuntimeError):
    """Raised when ``interrupt_after_steps`` simulates a killed run (tests)."""


def run_phase(wf: Workflow, phase: str, state: dict[str, Any], tx, data_seed: int,
              resume: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains ``state`` for ``num_train_steps``; logs, checkpoints, validates; BLEU at the end."""
    import jax

    from recipes.engine import checkpointing
    from recipes.vision import train as image_train
    from recipes.text import translation_data as td

    config, total_steps = wf.config, wf.config.num_train_steps
    source = td.TokenBatchSource(wf.data.train, config.buckets, config.max_tokens, data_seed,
                                 num_epochs=1, rows_multiple_of=wf.mesh.size // jax.process_count(),
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
    source.num_epochs = -(-total_steps // source.per_epoch)  # enough epochs for the phase
    iterator = td.train_iterator(source, config.num_workers)
    progress = {"phase": phase, "step": 0, "seconds": 0.0, "bleu": None, "valid_nll": None}
    ckpt, state, progress, done = checkpointing.open_phase(
        wf, phase, PHASES, state, progress, total_steps, resume, data_iterator=iterator,
        final_key="bleu")
    if done:
        return state, progress

    train_step = make_train_step(wf.graphdef, tx, wf.mesh, config, td.PAD_ID)
    schedule = inverse_sqrt_schedule(config)
    bleu_steps = {round(total_steps * (i + 1) / (config.bleu_during_training + 1))
                  for i in range(config.bleu_during_training)}
    step, started, pending = progress["step"], time.time() - progress["seconds"], []
    bar = image_train._progress_bar(total_steps, step, phase, config.progress_bar)
    postfix: dict[str, str] = {}

    def save(step: int) -> None:
        progress.update(step=step, seconds=time.time() - started, data_state=iterator.get_state())
        ckpt.save(step, state, progress)

    while step < total_steps:
        batch = image_train.shard_batch(next(iterator), wf.mesh)
        state, step_metrics = train_step(state, batch, np.int32(step))
        step += 1
        wf.steps_done += 1
        pending.append(step_metrics)
        bar.update(1)
        if step % config.log_every_steps == 0 or step == total_steps:
            fetched = jax.device_get(pending)
            pending = []
            tokens = sum(float(m["tokens"]) for m in fetched)
            loss = sum(float(m["loss"]) * float(m["tokens"]) for m in fetched) / max(tokens, 1.0)
            nll = sum(float(m["nll"]) * float(m["tokens"]) for m in fetched) / max(tokens, 1.0)
            if not np.isfinite(loss):
                raise FloatingPointError(f"[{phase}] loss became {loss} at step {step}")
            wf.log.write({"phase": phase, "step": step, "split": "train", "loss": loss,
                          "nll": nll, "metric": None, "lr": float(schedule(step - 1)),
                          "tokens": tokens})
            postfix.update(loss=f"{loss:.3f}")
            bar.set_postfix(**postfix)
        if step % config.eval_every_steps == 0 or step == total_steps:
            valid_nll = validation_loss(wf.loss_step, state["params"], wf.data.valid, config,
                                        wf.mesh)
            record = {"phase": phase, "step": step, "split": "valid", "loss": valid_nll,
                      "metric": None}
            if step in bleu_steps or step == total_steps:
                scored = wf.score(state["params"])
                record["metric"] = scored["bleu"]
                postfix["bleu"] = f"{scored['bleu']:.2f}"
                if step == total_steps:
                    wf.final_hypotheses[phase] = scored["hypotheses"]
                    progress.update(bleu=scored["bleu"], signature=scored["signature"],
                                    valid_nll=valid_nll)
            wf.log.write(record)
            postfix["valid"] = f"{valid_nll:.3f}"
            bar.set_postfix(**postfix)
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
            save(step)
        if 0 < config.interrupt_after_steps <= wf.steps_done and step < total_steps:
            bar.close()
            ckpt.close()
            raise Interrupted(f"[{phase}] stopped after {wf.steps_done} steps")
    bar.close()
    ckpt.close()
    return state, progress


def load_dense_params(source: str, like_params: dict) -> tuple[dict, str]:
    """The dense parameters of a finished run (its ``checkpoints/dense``) or of one step directory."""
    import re

    from recipes.engine import checkpointing

    source = os.path.abspath(source)
    if os.path.isdir(os.path.join(source, "checkpoints", "dense")):
        source = os.path.join(source, "checkpoints", "dense")
    step = None
    if re.fullmatch(r"\d+", os.path.basename(source)):
        source, step = os.path.dirname(source), int(os.path.basename(source))
    if not os.path.isdir(source):
        raise FileNotFoundError(f"init_from {source!r}: no such checkpoint directory")
    ckpt = checkpointing.PhaseCheckpoints(source)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"init_from {source!r}: no checkpoint steps found")
    import orbax.checkpoint as ocp

    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(checkpointing._abstract(like_params))))
    ckpt.close()
    return restored["params"], os.path.join(source, str(step))


def train_and_evaluate(config: TranslationConfig, workdir: str, *, resume: bool = False,
                       overwrite: bool = False) -> dict[str, Any]:
    """Runs dense -> prune (one-shot BLEU) -> masked retrain (-> dense control); returns what
    results.json holds."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import sparse_jax
    from recipes.engine import metrics
    from recipes.vision import train as image_train
    from recipes.text import transformer

    started = time.time()
    if config.distributed:
        jax.distributed.initialize()
    image_train.prepare_workdir(workdir, resume, overwrite,
                                image_train.RUN_OUTPUTS + ("spm.model", "translations.txt"))
    if _is_main_process():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())
    mesh = image_train.create_mesh(config.devices)
    if config.eval_batch_size % mesh.size:
        raise ValueError(f"eval_batch_size {config.eval_batch_size} must be a multiple of the "
                         f"{mesh.size} devices")
    data = prepare_data(config, workdir, log=lambda *a: print(*a, flush=True)
                        if _is_main_process() else None)
    vocab_size = data.processor.get_piece_size()
    model_cfg = config.model_config(vocab_size)
    model = transformer.Transformer(model_cfg, rngs=nnx.Rngs(config.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    log = metrics.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    ids = {"pad": data.processor.pad_id(), "bos": data.processor.bos_id(),
           "eos": data.processor.eos_id()}
    wf = Workflow(config, workdir, mesh, data, graphdef,
                  make_loss_step(graphdef, mesh, config, ids["pad"]),
                  make_translate_fn(graphdef, config, ids), log)
    num_params = sum(int(x.size) for x in jax.tree.leaves(params))
    wf.print(f"{config.model} ({config.size}-shaped: {model_cfg.encoder_layers}+"
             f"{model_cfg.decoder_layers} layers, d_model {model_cfg.d_model}, FFN "
             f"{model_cfg.ffn_dim}, {model_cfg.num_heads} heads, "
             f"{'pre' if model_cfg.normalize_before else 'post'}-norm, shared embeddings): "
             f"{num_params:,} parameters, vocabulary {vocab_size:,}")
    wf.print(f"{data.name}: {len(data.train):,} train / {len(data.valid):,} valid / "
             f"{len(data.test):,} test pairs; {mesh.size} {mesh.devices.flat[0].platform} "
             f"device(s), ~{config.max_tokens:,} tokens per batch, {config.num_train_steps} steps "
             f"per phase, peak lr {config.learning_rate:g} after {config.warmup_steps} warm-up "
             f"steps, compute {config.compute_dtype}")

    # 1. Dense.
    if config.init_from:
        params, where = load_dense_params(config.init_from, params)
        wf.print(f"[dense] loaded {where}")
        dense_params = jax.device_put(params)
        dense = wf.score(dense_params)
        dense.update(valid_nll=validation_loss(wf.loss_step, dense_params, data.valid, config,
                                               mesh))
        dense_steps, dense_seconds = 0, 0.0
    else:
        tx = create_optimizer(config)
        state = {"params": params, "opt_state": tx.init(params)}
        state, progress = run_phase(wf, "dense", state, tx, config.seed, resume)
        dense_params = state["params"]
        dense = {"bleu": progress["bleu"], "signature": progress["signature"],
                 "valid_nll": progress["valid_nll"]}
        dense_steps, dense_seconds = config.num_train_steps, progress["seconds"]
    wf.print(f"[dense] BLEU {dense['bleu']:.2f}")

    # 2. Prune 2:4 along each projection's input axis; score as is.
    prune = functools.partial(sparse_jax.prune, n=config.sparsity_n, m=config.sparsity_m,
                              rules=PRUNING_RULES)
    pruned_params, masks = jax.jit(prune)(dense_params)
    one_shot = wf.score(pruned_params)
    if not any(r["phase"] == "one_shot" for r in log.read()):  # a resumed run logged it already
        log.write({"phase": "one_shot", "step": 0, "split": "valid", "loss": validation_loss(
            wf.loss_step, pruned_params, data.valid, config, mesh), "metric": one_shot["bleu"]})
    wf.print(f"[prune] {config.sparsity_n}:{config.sparsity_m} one-shot BLEU {one_shot['bleu']:.2f}")

    # 3. Retrain with the mask fixed: the same schedule, a fresh optimizer.
    sparse_tx = sparse_jax.masked(create_optimizer(config), masks)
    # The train step donates its state: the checkpointed copy of the masks must be its own.
    state = {"params": pruned_params, "opt_state": sparse_tx.init(pruned_params),
             "masks": jax.tree.map(jnp.copy, masks)}
    state, progress = run_phase(wf, "retrain", state, sparse_tx, config.seed + 1, resume)
    final_params = state["params"]
    sparse = {"bleu": progress["bleu"], "signature": progress["signature"]}
    exactly_sparse = image_train.exactly_masked(final_params, masks)
    hypotheses = wf.final_hypotheses.get("retrain") or wf.score(final_params)["hypotheses"]
    wf.print(f"[retrain] BLEU {sparse['bleu']:.2f} (weights exactly {config.sparsity_n}:"
             f"{config.sparsity_m}: {exactly_sparse})")

    # 4. Control: the dense model trained for as many more steps, the same way (fresh optimizer,
    # the schedule again) but without a mask: sparse-vs-dense at the same number of steps.
    control = None
    if config.control:
        control_tx = create_optimizer(config)
        state = {"params": jax.tree.map(jnp.copy, dense_params),
                 "opt_state": control_tx.init(dense_params)}
        state, control_progress = run_phase(wf, "control", state, control_tx, config.seed + 2,
                                            resume)
        control = {"bleu": control_progress["bleu"], "seconds": control_progress["seconds"]}
        wf.print(f"[control] BLEU {control['bleu']:.2f} (dense, {config.num_train_steps} more "
                 "steps)")

    report = sparse_jax.sparsity_report(final_params, masks, config.sparsity_n, config.sparsity_m,
                                        rules=PRUNING_RULES)
    results = {
        "model": config.model,
        "dataset": data.name,
        "metric": "bleu",
        "dense": dense["bleu"],
        "one_shot": one_shot["bleu"],
        "sparse": sparse["bleu"],
        "control": control["bleu"] if control else None,
        "bleu_signature": sparse["signature"],
        "beam_size": config.beam_size,
        "length_penalty": config.length_penalty,
        "steps": {"dense": dense_steps, "retrain": config.num_train_steps,
                  "control": config.num_train_steps if control else None},
        "max_tokens": config.max_tokens,
        "num_params": num_params,
        "test_sentences": len(data.test),
        "exactly_nm_sparse": exactly_sparse,
        "training_seconds": round(dense_seconds + progress["seconds"]
                                  + (control["seconds"] if control else 0.0), 1),
        **image_train.run_facts(started, mesh),
    }
    image_train.write_run_outputs(workdir, results, report, lambda path: plot_curves(
        log.read(), path, f"{config.model} on {data.name}: dense -> 2:4 prune -> retrain"
        + (" (+ dense control)" if control else "")))
    if _is_main_process():
        with open(os.path.join(workdir, "translations.txt"), "w") as f:
            for source, reference, hypothesis in zip(data.test.source_text, data.test.target_text,
                                                     hypotheses):
                f.write(f"SRC {source}\nREF {reference}\nHYP {hypothesis}\n\n")
        if config.export_onnx:
            export_onnx(model_cfg, final_params, max(config.buckets), config.export_onnx)
            wf.print(f"wrote the 2:4 model as ONNX to {config.export_onnx} (check: "
                     f"sparse-jax-inspect {config.export_onnx})")
    wf.print("")
    wf.print(report_summary(report, os.path.join(workdir, "sparsity_report.txt")))
    wf.print("")
    wf.print(results_table(results))
    wf.print(f"\nwrote {workdir}/results.json, metrics.jsonl, curves.png, sparsity_report.txt, "
             f"translations.txt, spm.model, checkpoints/ (sparse model: checkpoints/retrain/"
             f"{config.num_train_steps})")
    return results


def export_onnx(model_cfg, params, length: int, path: str) -> None:
    """Writes the teacher-forced forward pass to ONNX: inputs ``src_tokens`` and
    ``prev_output_tokens`` (int32 ``[1, length]``, padded), output the next-token logits; float32
    (TensorRT picks its own precision). Beam search stays outside the graph."""
    import jax
    from flax import nnx

    import sparse_jax.export  # needs the export extra (jax2onnx)
    from recipes.text import transformer

    float32_cfg = dataclasses.replace(model_cfg, dtype="float32")
    graphdef, _ = nnx.split(transformer.Transformer(float32_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    model = nnx.merge(graphdef, jax.device_get(params))
    example = jax.ShapeDtypeStruct((1, length), np.int32)
    sparse_jax.export.to_onnx(model, [example, example], path,
                              input_names=["src_tokens", "prev_output_tokens"])


def report_summary(report, table_path: str) -> str:
    """What was pruned (and along which axis), and which matrices stayed dense and why."""
    pruned = [r for r in report.rows if r.pruned]
    dense_matrices = [r for r in report.rows if not r.pruned and len(r.shape) >= 2]
    small = [r for r in report.rows if not r.pruned and len(r.shape) < 2]
    axes = sorted({r.axis for r in pruned})
    lines = [f"sparsity report: {len(pruned)} projection kernels pruned to {report.n}:{report.m} "
             f"along axis {axes} (the input axis of (in, out) kernels), {len(dense_matrices)} "
             f"matrix kept dense, {len(small)} biases/LayerNorm parameters dense"]
    for r in dense_matrices:
        why = SKIP_EXPLANATIONS.get(r.path, r.reason)
        lines.append(f"  kept dense: {r.path} {'x'.join(map(str, r.shape))}: {why} ({r.reason})")
    lines.append("  " + str(report).splitlines()[-1])
    lines.append(f"  per-leaf table: {table_path}")
    return "\n".join(lines)


def results_table(results: dict[str, Any]) -> str:
    header = ("| model | dataset | dense BLEU | 2:4 one-shot | 2:4 retrained | dense control |\n"
              "|---|---|---|---|---|---|")
    control = "-" if results["control"] is None else f"{results['control']:.2f}"
    row = (f"| {results['model']} | {results['dataset']} | {results['dense']:.2f} | "
           f"{results['one_shot']:.2f} | {results['sparse']:.2f} | {control} |")
    steps = results["steps"]
    control_steps = f", control {steps['control']}" if steps["control"] else ""
    note = (f"sacreBLEU {results['bleu_signature']}, beam {results['beam_size']}, length penalty "
            f"{results['length_penalty']}, {results['test_sentences']} test sentences; steps: "
            f"dense {steps['dense']}, retrain {steps['retrain']}{control_steps} "
            f"(~{results['max_tokens']} tokens each); {results['seconds']:.0f} s on "
            f"{results['devices']} {results['platform']} device(s)")
    return "\n".join([header, row, note])


def plot_curves(records: list[dict[str, Any]], path: str, title: str) -> None:
    """Train / validation loss and test BLEU against the step; retraining continues the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dense": "tab:blue", "retrain": "tab:red", "control": "tab:gray"}
    dense_steps = max((r["step"] for r in records if r["phase"] == "dense"), default=0)
    offsets = {"dense": 0, "retrain": dense_steps, "control": dense_steps}
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4))
    for phase, color in colors.items():
        train = [r for r in records if r["phase"] == phase and r["split"] == "train"]
        valid = [r for r in records if r["phase"] == phase and r["split"] == "valid"]
        label = {"dense": "dense", "retrain": "2:4 sparse retraining",
                 "control": "dense control"}[phase]
        if train:
            ax_loss.plot([offsets[phase] + r["step"] for r in train], [r["loss"] for r in train],
                         color=color, lw=1, label=f"{label} (train, smoothed)")
        if valid:
            ax_loss.plot([offsets[phase] + r["step"] for r in valid], [r["loss"] for r in valid],
                         "o--", color=color, ms=3, lw=0.8, label=f"{label} (valid NLL)")
        scored = [r for r in valid if r.get("metric") is not None]
        if scored:
            ax_bleu.plot([offsets[phase] + r["step"] for r in scored],
                         [r["metric"] for r in scored], "o-", color=color, label=label)
            ax_bleu.annotate(f"{scored[-1]['metric']:.2f}", (offsets[phase] + scored[-1]["step"],
                             scored[-1]["metric"]), color=color, fontsize=8, xytext=(4, 2),
                             textcoords="offset points")
    one_shot = [r for r in records if r["phase"] == "one_shot"]
    if one_shot:
        ax_bleu.plot([dense_steps], [one_shot[-1]["metric"]], "x", color="black", ms=8, mew=2,
                     label="one-shot 2:4 (no retraining)")
    for ax in (ax_loss, ax_bleu):
        if dense_steps:
            ax.axvline(dense_steps, color="black", lw=0.6, ls=":")
        ax.legend(fontsize=8)
    ax_loss.set(xlabel="step", ylabel="loss per token", yscale="log", title="loss")
    ax_bleu.set(xlabel="step", ylabel="sacreBLEU", title="test BLEU (beam search)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser(description: str, epilog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder with train/valid/test.{en,de} plain-text "
                        "parallel files (and optionally spm.model); selects the full recipe. "
                        "Without it: the built-in pydoc task")
    parser.add_argument("--workdir", help="output directory (default runs/<model>_<dataset>)")
    parser.add_argument("--init-from", help="a finished run directory (or its checkpoints/dense/"
                        "<step>) whose dense model replaces dense training")
    parser.add_argument("--size", choices=("big", "base"), help="fairseq's model size (full "
                        "recipe: big)")
    parser.add_argument("--max-tokens", type=int, help="tokens per global batch, split over all "
                        "devices (full recipe: 28672 = 3584 x 8)")
    parser.add_argument("--steps", type=int, help="steps of each phase (dense and retrain)")
    parser.add_argument("--lr", type=float, help="peak learning rate after the warm-up")
    cli.add_device_arguments(
        parser, control_default="on by default for the built-in task, off for WMT",
        exported="the final 2:4 model (teacher-forced forward, float32)", workers_note="WMT: 8")
    cli.add_run_arguments(parser, "recipes/common/seq2seq_train.py TranslationConfig",
                          "--set beam_size=5 --set dropout=0.1")
    return parser


def config_from_args(args: argparse.Namespace, model: str) -> TranslationConfig:
    config = wmt14_config() if args.data_dir else builtin_config()
    config = config.replace(model=model, data_dir=args.data_dir)
    if args.smoke:
        config = smoke_config(config)
    overrides = {"init_from": args.init_from, "size": args.size, "max_tokens": args.max_tokens,
                 "num_train_steps": args.steps, "learning_rate": args.lr,
                 "devices": args.devices, "num_workers": args.workers, "control": args.control,
                 "export_onnx": args.export_onnx}
    return cli.apply_command_line(config, overrides, args)


def main(model: str, description: str, epilog: str, argv: list[str] | None = None) -> dict:
    args = build_parser(description, epilog).parse_args(argv)
    return cli.run(train_and_evaluate, config_from_args(args, model), args, model,
                   "wmt14" if args.data_dir else "pydoc")
