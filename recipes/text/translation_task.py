"""Translation (fairseq's Transformer on WMT14 EN-DE, or the built-in pydoc/ROT13 task) as a task.

fairseq's schedule: Adam (0.9, 0.98), inverse-square-root learning rate after a linear warm-up,
label smoothing 0.1. The headline is sacreBLEU (13a, detokenised, case-sensitive) of beam search
(beam 4, length penalty 0.6) on the test set, as NVIDIA's DeepLearningExamples report it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recipes.engine import checkpointing, cli, workflow
from recipes.engine.workflow import WorkflowConfig
from recipes.text import beam_search, transformer, translation_data as td

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


@dataclasses.dataclass(frozen=True)
class TranslationConfig(WorkflowConfig):
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
    spm_model: str | None = None  # a sentencepiece .model; else <data_dir>/spm.model or train one
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
    # ``cooldown_fraction`` of each phase's steps, ending at ``cooldown_end`` of the phase, scale
    # the lr linearly down to ``cooldown_floor`` times fairseq's, held to the end (fraction 0:
    # fairseq's schedule unchanged), so that a short run ends on a plateau (Hägele et al. 2024).
    cooldown_fraction: float = 0.0
    cooldown_end: float = 1.0
    cooldown_floor: float = 0.0
    # Evaluation.
    beam_size: int = 4
    length_penalty: float = 0.6
    max_length_a: float = 1.2  # decode at most a * source length + b tokens
    max_length_b: int = 10
    eval_batch_size: int = 128  # sentences per beam-search batch
    max_eval_sentences: int = -1
    bleu_during_training: int = 0  # BLEU evaluations per phase besides the final one
    eval_every_steps: int = 1000  # validation loss
    # Bookkeeping.
    checkpoint_every_steps: int = 5000

    def model_config(self, vocab_size: int):
        overrides = {name: getattr(self, name) for name in
                     ("d_model", "ffn_dim", "num_heads", "encoder_layers", "decoder_layers",
                      "dropout") if getattr(self, name) is not None}
        return transformer.transformer_config(
            self.size, vocab_size, attention_dropout=self.attention_dropout,
            normalize_before=self.normalize_before, dtype=self.compute_dtype, **overrides)


def builtin_config() -> TranslationConfig:
    """The default: a base-shaped model scaled down to run every phase on 2 CPU cores in minutes."""
    return TranslationConfig(
        size="base", d_model=128, ffn_dim=256, num_heads=4, encoder_layers=2, decoder_layers=2,
        dropout=0.0, compute_dtype="float32", vocab_size=1000, buckets=(24, 48, 96),
        max_tokens=2048, learning_rate=3e-3, warmup_steps=100, num_train_steps=600, control=True,
        eval_batch_size=96, eval_every_steps=200, log_every_steps=25,
        checkpoint_every_steps=200, spm_train_sentences=100_000)


def converged_config(config: TranslationConfig) -> TranslationConfig:
    """``--preset converged``: 2.5 times the built-in steps per phase (the default's dense BLEU
    still rose by 10 in its control's extra 600 steps), a 400-step warm-up (a higher lr after
    it) and the cooldown over steps 35% .. 75% of each phase down to 5% of fairseq's lr, so that
    the last quarter runs at the final lr as the detection presets do (a cooldown over the last
    40% still raised BLEU by 1.1 there, 4.1 with this warm-up), BLEU over each phase's second
    half."""
    return config.replace(num_train_steps=1500, warmup_steps=400, cooldown_fraction=0.35,
                          cooldown_end=0.75, cooldown_floor=0.05, eval_every_steps=250,
                          control=True, plateau_evals=4)


def smoke_config(config: TranslationConfig) -> TranslationConfig:
    """A tiny model and a few steps of everything (all phases, checkpoints, BLEU, plot)."""
    return config.replace(
        size="base", d_model=32, ffn_dim=64, num_heads=2, encoder_layers=1, decoder_layers=1,
        dropout=0.1, compute_dtype="float32", vocab_size=300, buckets=(96,), max_tokens=1536,
        warmup_steps=4, num_train_steps=6, eval_every_steps=3, log_every_steps=2,
        checkpoint_every_steps=3, max_eval_sentences=16, eval_batch_size=16, max_train_pairs=300,
        max_length_a=0.0, max_length_b=12, spm_train_sentences=10_000, progress_bar=False)


def inverse_sqrt_schedule(config: TranslationConfig):
    """fairseq's inverse_sqrt: a linear warm-up to ``learning_rate``, then ``lr * sqrt(warmup /
    update)``; fairseq numbers optax's update count 0 as update 1. With ``cooldown_fraction``
    f > 0 and ``cooldown_end`` e, the lr of count c is scaled from 1 at (e - f) * num_train_steps
    linearly down to ``cooldown_floor`` at e * num_train_steps, and by the floor after it."""

    def schedule(count):
        update = jnp.asarray(count, jnp.float32) + 1.0
        warmup = max(config.warmup_steps, 1)
        ramp = (config.warmup_init_lr
                + (config.learning_rate - config.warmup_init_lr) * update / warmup)
        decay = config.learning_rate * jnp.sqrt(warmup / update)
        return jnp.where(update < warmup, ramp, decay)

    if config.cooldown_fraction <= 0:  # fairseq's schedule, bit for bit
        return schedule
    if not config.cooldown_fraction <= config.cooldown_end <= 1:
        raise ValueError(f"cooldown_fraction {config.cooldown_fraction}, cooldown_end "
                         f"{config.cooldown_end}: expected 0 < fraction <= end <= 1")
    if not 0 <= config.cooldown_floor < 1:
        raise ValueError(f"cooldown_floor {config.cooldown_floor}: expected 0 .. 1 (exclusive)")
    end = config.cooldown_end * config.num_train_steps
    length = config.cooldown_fraction * config.num_train_steps
    floor = config.cooldown_floor

    def with_cooldown(count):
        remaining = jnp.clip((end - jnp.asarray(count, jnp.float32)) / length, 0.0, 1.0)
        return schedule(count) * (floor + (1.0 - floor) * remaining)

    return with_cooldown


def create_optimizer(config: TranslationConfig):
    adam = optax.adam(inverse_sqrt_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                      eps=config.adam_eps)
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), adam)
    return adam


def label_smoothed_loss(logits, targets, smoothing: float, pad_id: int):
    """Sums over non-pad tokens of the label-smoothed loss and of the NLL, and their count
    (``smoothing`` spread over the whole vocabulary: fairseq's, up to its eps / (V - 1))."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    uniform = -jnp.mean(log_probs, axis=-1)
    loss = (1.0 - smoothing) * nll + smoothing * uniform
    weights = (targets != pad_id).astype(jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(nll * weights), jnp.sum(weights)


def make_train_step(graphdef, tx, mesh, config: TranslationConfig, pad_id: int) -> Callable:
    """A jitted ``(state, batch, step) -> (state, metrics)`` (``workflow.jit_train_step``); the
    loss is per target token."""
    base_key = jax.random.key(config.seed)

    def loss_fn(params, state, batch, step):
        dropout_rng = jax.random.fold_in(base_key, step)
        logits = nnx.merge(graphdef, params)(batch["src"], batch["tgt_in"], dropout_rng=dropout_rng)
        loss, nll, count = label_smoothed_loss(logits, batch["tgt_out"], config.label_smoothing,
                                               pad_id)
        count = jnp.maximum(count, 1.0)
        return loss / count, ({"nll": nll / count, "tokens": count}, {})

    return workflow.jit_train_step(loss_fn, tx, mesh, num_args=1)


def make_loss_step(graphdef, mesh, config: TranslationConfig, pad_id: int) -> Callable:
    """A jitted ``(params, batch) -> (summed nll, token count)`` without dropout."""
    def loss_step(params, batch):
        logits = nnx.merge(graphdef, params)(batch["src"], batch["tgt_in"])
        _, nll, count = label_smoothed_loss(logits, batch["tgt_out"], 0.0, pad_id)
        return nll, count

    return jax.jit(loss_step, in_shardings=workflow.shardings(mesh))


def make_translate_fn(graphdef, config: TranslationConfig) -> Callable:
    """A jitted ``(params, src (B, S)) -> tokens (B, max_length)``: beam search with a KV cache."""

    @functools.partial(jax.jit, static_argnames=("max_length",))
    def translate(params, src, max_length):
        model = nnx.merge(graphdef, params)
        cache = model.init_cache(model.encode(src), src, max_length)

        def step(tokens, position, cache):
            logits, cache = model.decode_step(tokens, position, cache)
            return jax.nn.log_softmax(logits, axis=-1), cache

        tokens, _ = beam_search.beam_search(
            step, cache, src.shape[0], beam_size=config.beam_size, max_length=max_length,
            bos_id=td.BOS_ID, eos_id=td.EOS_ID, pad_id=td.PAD_ID,
            length_penalty=config.length_penalty)
        return tokens

    return translate


def strip_special(tokens: np.ndarray, eos_id: int, pad_id: int) -> list[int]:
    """The tokens before the first ``eos`` (pads removed)."""
    tokens = tokens.tolist()
    end = tokens.index(eos_id) if eos_id in tokens else len(tokens)
    return [token for token in tokens[:end] if token != pad_id]


def corpus_bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (13a tokenisation, case-sensitive) and its signature."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return float(score.score), str(metric.get_signature())


@dataclasses.dataclass
class Data:
    processor: Any
    train: Any  # TokenizedPairs
    valid: Any
    test: Any
    name: str


def prepare_data(config: TranslationConfig, workdir: str, log: Callable = print) -> Data:
    """Reads (or builds) the corpus, loads or trains the joint sentencepiece model, tokenises."""
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
        if jax.process_index() == 0:
            with open(saved, "wb") as f:
                f.write(model)
        log(f"sentencepiece: joint BPE of {processor.get_piece_size()} pieces trained on both "
            f"sides of the training text in {time.time() - started:.1f} s -> {saved}")
    special = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
    if special != (td.PAD_ID, td.UNK_ID, td.BOS_ID, td.EOS_ID):
        raise ValueError(f"the sentencepiece model's pad/unk/bos/eos ids are {special}; this "
                         "recipe needs them 0/1/2/3 (train it with pad_id=0 unk_id=1 bos_id=2 "
                         "eos_id=3)")
    splits = {split: td.tokenize_pairs(processor, *texts[split]) for split in td.SPLITS}
    return Data(processor, splits["train"], splits["valid"], splits["test"], name)


def validation_loss(loss_step, params, pairs, config: TranslationConfig, mesh) -> float:
    """Mean per-token NLL of the reference translations (teacher forcing, no dropout)."""
    rows = max(mesh.size, config.eval_batch_size - config.eval_batch_size % mesh.size)
    total, count = 0.0, 0.0
    for _, batch in td.eval_batches(pairs, config.buckets, rows):
        nll, tokens = jax.device_get(loss_step(params, workflow.shard_batch(batch, mesh)))
        total, count = total + float(nll), count + float(tokens)
    return total / max(count, 1.0)


def translate_and_score(translate, params, data: Data, config: TranslationConfig
                        ) -> dict[str, Any]:
    """Beam-search translations of the test set, detokenised by sentencepiece, and their BLEU."""
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


def export_onnx(model_cfg, params, length: int, path: str) -> None:
    """The teacher-forced forward pass as float32 ONNX: inputs ``src_tokens``,
    ``prev_output_tokens`` (int32 ``[1, length]``), output the logits; beam search stays out."""
    import sparse_jax.export  # needs the export extra (jax2onnx)

    float32_cfg = dataclasses.replace(model_cfg, dtype="float32")
    graphdef, _ = nnx.split(transformer.Transformer(float32_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    model = nnx.merge(graphdef, jax.device_get(params))
    example = jax.ShapeDtypeStruct((1, length), np.int32)
    sparse_jax.export.to_onnx(model, [example, example], path,
                              input_names=["src_tokens", "prev_output_tokens"])


class TranslationTask(workflow.Task):
    """WMT14-style parallel text or the built-in pydoc/ROT13 task; test BLEU is the headline."""

    metric = headline = "bleu"
    label = "BLEU"
    percent = False
    outputs = ("spm.model", "translations.txt")
    pruning_rules = PRUNING_RULES
    skip_explanations = SKIP_EXPLANATIONS
    config_name = "recipes/text/translation_task.py TranslationConfig"
    set_example = "--set beam_size=5 --set dropout=0.1"
    control_help = "on by default for the built-in task, off for WMT"
    options = (
        ("--data-dir", "data_dir", None, "folder with train/valid/test.{en,de} plain-text "
         "parallel files (and optionally spm.model); selects the full recipe. Without it: the "
         "built-in pydoc task"),
        ("--init-from", "init_from", None, "a finished run directory (or its checkpoints/dense/"
         "<step>) whose dense model replaces dense training"),
        ("--size", "size", ("big", "base"), "fairseq's model size (full recipe: big)"),
        ("--max-tokens", "max_tokens", int, "tokens per global batch, split over all devices "
         "(full recipe: 28672 = 3584 x 8)"),
        ("--steps", "num_train_steps", int, "steps of each phase (dense and retrain)"),
        ("--lr", "learning_rate", float, "peak learning rate after the warm-up"),
        cli.workers_option(),
        cli.export_option("the final 2:4 model (teacher-forced forward, float32)"),
    )

    @staticmethod
    def configs(args: argparse.Namespace, model: str) -> TranslationConfig:
        # The defaults are Table 2's: the big Transformer on WMT14 EN-DE (fairseq, 8 GPUs).
        config = TranslationConfig() if args.data_dir else builtin_config()
        return config.replace(data_dir=args.data_dir)

    smoke_config = staticmethod(smoke_config)
    converged_config = staticmethod(converged_config)

    @staticmethod
    def dataset_of(args: argparse.Namespace) -> str:
        return "wmt14" if args.data_dir else "pydoc"

    def setup(self) -> dict[str, Any]:
        config, mesh, wf = self.config, self.wf.mesh, self.wf
        data = self.data = prepare_data(config, self.workdir, log=wf.print)
        self.dataset_name = data.name
        vocab_size = data.processor.get_piece_size()
        self.model_cfg = model_cfg = config.model_config(vocab_size)
        self.graphdef, params = nnx.split(
            transformer.Transformer(model_cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)
        self.loss_step = make_loss_step(self.graphdef, mesh, config, td.PAD_ID)
        self.translate = make_translate_fn(self.graphdef, config)
        self.schedule = inverse_sqrt_schedule(config)
        self.steps = config.num_train_steps
        self.bleu_steps = {round(self.steps * (i + 1) / (config.bleu_during_training + 1))
                           for i in range(config.bleu_during_training)}
        num_params = sum(int(x.size) for x in jax.tree.leaves(params))
        wf.print(f"{config.model} ({config.size}-shaped: {model_cfg.encoder_layers}+"
                 f"{model_cfg.decoder_layers} layers, d_model {model_cfg.d_model}, FFN "
                 f"{model_cfg.ffn_dim}, {model_cfg.num_heads} heads, "
                 f"{'pre' if model_cfg.normalize_before else 'post'}-norm, shared embeddings): "
                 f"{num_params:,} parameters, vocabulary {vocab_size:,}")
        wf.print(f"{data.name}: {len(data.train):,} train / {len(data.valid):,} valid / "
                 f"{len(data.test):,} test pairs; {mesh.size} {mesh.devices.flat[0].platform} "
                 f"device(s), ~{config.max_tokens:,} tokens per batch, {self.steps} steps per "
                 f"phase, peak lr {config.learning_rate:g} after {config.warmup_steps} warm-up "
                 f"steps, compute {config.compute_dtype}")
        return {"params": nnx.to_pure_dict(params)}

    def optimizer(self, params):
        return create_optimizer(self.config)

    def train_step(self, tx):
        step_fn = make_train_step(self.graphdef, tx, self.wf.mesh, self.config, td.PAD_ID)
        return lambda state, batch, step, phase: step_fn(state, batch, np.int32(step))

    def train_batches(self, phase: str, seed: int):
        source = td.TokenBatchSource(self.data.train, self.config.buckets, self.config.max_tokens,
                                     seed, num_epochs=1,
                                     rows_multiple_of=self.wf.mesh.size // jax.process_count(),
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
        source.num_epochs = -(-self.steps // source.per_epoch)  # enough epochs for the phase
        return td.train_iterator(source, self.config.num_workers)

    def train_record(self, fetched: list[dict], step: int) -> dict[str, Any]:
        tokens = sum(float(m["tokens"]) for m in fetched)
        loss, nll = (sum(float(m[k]) * float(m["tokens"]) for m in fetched) / max(tokens, 1.0)
                     for k in ("loss", "nll"))
        return {"loss": loss, "nll": nll, "metric": None, "lr": float(self.schedule(step - 1)),
                "tokens": tokens}

    def validation_loss(self, params) -> float:
        return validation_loss(self.loss_step, params, self.data.valid, self.config, self.wf.mesh)

    def eval_during(self, state, phase: str, step: int):
        if step % self.config.eval_every_steps and step != self.steps:
            return None, None
        valid_nll = self.validation_loss(state["params"])
        record = {"split": "valid", "loss": valid_nll, "metric": None}
        if step in self.bleu_steps or step == self.steps:
            scored = translate_and_score(self.translate, state["params"], self.data, self.config)
            record["metric"] = scored["bleu"]
            if step == self.steps:
                return record, {**scored, "valid_nll": valid_nll}
        return record, None

    def evaluate(self, state: dict[str, Any], phase: str) -> dict[str, Any]:
        scored = translate_and_score(self.translate, state["params"], self.data, self.config)
        return {**scored, "valid_nll": self.validation_loss(state["params"])}

    def eval_record(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"split": "valid", "loss": result["valid_nll"], "metric": result["bleu"]}

    def load_dense(self, source: str, state: dict[str, Any]):
        return checkpointing.load_dense_state(source, {"params": state["params"]})

    def extra_results(self, evals):
        config = self.config
        return {"bleu_signature": evals["sparse"]["signature"], "beam_size": config.beam_size,
                "length_penalty": config.length_penalty, "max_tokens": config.max_tokens,
                "test_sentences": len(self.data.test)}

    def table_note(self, results):
        return (f"sacreBLEU {results['bleu_signature']}, beam {results['beam_size']}, length "
                f"penalty {results['length_penalty']}, {results['test_sentences']} test sentences, "
                f"~{results['max_tokens']} tokens a batch")

    def write_outputs(self, state, evals) -> None:
        test = self.data.test
        with open(os.path.join(self.workdir, "translations.txt"), "w") as f:
            for source, reference, hypothesis in zip(test.source_text, test.target_text,
                                                     evals["sparse"]["hypotheses"]):
                f.write(f"SRC {source}\nREF {reference}\nHYP {hypothesis}\n\n")

    def export_onnx(self, state, path: str) -> None:
        export_onnx(self.model_cfg, state["params"], max(self.config.buckets), path)


def train_and_evaluate(config: TranslationConfig, workdir: str, **kwargs) -> dict[str, Any]:
    """The workflow with this task (``workflow.train_and_evaluate``)."""
    return workflow.train_and_evaluate(TranslationTask, config, workdir, **kwargs)


def main(model: str, description: str, epilog: str, argv: list[str] | None = None) -> dict:
    return cli.main(TranslationTask, model, description, epilog, argv)
