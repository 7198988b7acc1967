"""Extractive question answering (BERT on SQuAD v1.1, or the built-in pydoc cloze task) as a task.

Fine-tuning: AdamW (no decay on biases and LayerNorms), linear warm-up and decay, the mean of the
start and end cross-entropies; headline: the official SQuAD v1.1 F1. The built-in task first
trains a WordPiece vocabulary and pre-trains a small BERT by masked LM on the text (``pretrain``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from recipes.engine import checkpointing, cli, workflow
from recipes.engine.workflow import WorkflowConfig
from recipes.text import bert, qa_data, squad


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


def builtin_config() -> QAConfig:
    """The default: a 2-layer, 64-wide BERT on the pydoc task, about 6 minutes on 2 cores: fresh
    questions every step, so steps, not epochs; float32 (bf16 is no faster on the CPU)."""
    return QAConfig(
        size="tiny", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
        dropout=0.0, compute_dtype="float32", max_seq_length=64, doc_stride=16,
        max_query_length=32, pretrain_steps=1000, pretrain_batch_size=32,
        pretrain_learning_rate=1e-3, batch_size=64, learning_rate=2e-3, num_train_steps=2000,
        eval_batch_size=128, log_every_steps=50, checkpoint_every_steps=500, control=True)


def converged_config(config: QAConfig) -> QAConfig:
    """``--preset converged``: twice the built-in fine-tuning steps per phase (its dense F1
    still rose by 22 in the control's extra 2,000; 3,000 rose 2.4 over the last quarter, 5,000
    took 26 minutes), F1 over each phase's second half."""
    return config.replace(num_train_steps=4000, control=True, plateau_evals=4)


def smoke_config(base: QAConfig) -> QAConfig:
    """A tiny model and a few steps that run every code path (bf16 compute, as at full scale)."""
    return base.replace(
        compute_dtype="bfloat16",
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=1000,
        max_seq_length=64, doc_stride=24, max_query_length=24,
        pretrain_steps=4 if base.builtin else 0, pretrain_batch_size=8, batch_size=8,
        eval_batch_size=16, num_train_steps=4,
        max_train_examples=64, max_eval_examples=24, log_every_steps=2, checkpoint_every_steps=4,
        control=True, progress_bar=False)


def model_config(config: QAConfig, base: bert.BertConfig | None = None) -> bert.BertConfig:
    if base is None:
        if config.size not in bert.SIZES:
            raise ValueError(f"unknown size {config.size!r}; expected one of {sorted(bert.SIZES)}")
        base = bert.SIZES[config.size]
    overrides = {"hidden_size": config.hidden_size, "num_layers": config.num_layers,
                 "num_heads": config.num_heads, "intermediate_size": config.intermediate_size}
    base = base.replace(**{k: v for k, v in overrides.items() if v > 0})
    if config.initializer_range > 0:
        base = base.replace(initializer_range=config.initializer_range)
    if config.dropout >= 0:
        base = base.replace(hidden_dropout=config.dropout, attention_dropout=config.dropout)
    return base


def init_rngs(seed: int) -> nnx.Rngs:
    # RBG keys initialise large models much faster on the CPU than threefry.
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


@dataclasses.dataclass
class QAData:
    name: str
    train_examples: list[squad.Example] | None  # SQuAD: a fixed training set
    eval_examples: list[squad.Example]
    train_features: squad.Features | None
    eval_features: squad.Features
    tokenizer: Any
    vocab_path: str
    pretrain_text: list[str] | None  # built-in task only
    train_stream: qa_data.ClozeStream | None = None  # built-in task: fresh questions every step


def load_task(config: QAConfig, workdir: str, vocab_path: str | None) -> QAData:
    """SQuAD JSON files, or the built-in pydoc task (training its vocabulary into ``workdir``)."""
    stream = None
    if config.builtin:
        stream, held_out, text = qa_data.builtin_task(config.seed)
        train = None
        vocab_path = os.path.join(workdir, "vocab.txt")
        if not os.path.exists(vocab_path):  # a resumed run keeps its vocabulary
            qa_data.train_wordpiece_vocab(text, vocab_path, config.vocab_size)
        name = "pydoc_cloze_qa"
    else:
        for flag, path in (("--train-file", config.train_file),
                           ("--predict-file", config.predict_file)):
            if path is None or not os.path.exists(path):
                raise FileNotFoundError(f"{flag} {path}: no such SQuAD v1.1 JSON file")
        if vocab_path is None:
            raise ValueError("SQuAD needs --checkpoint (a Hugging Face BERT directory with "
                             "vocab.txt) or --init-from a fine-tuned one")
        train, held_out, text = (squad.load_squad_json(config.train_file),
                                 squad.load_squad_json(config.predict_file), None)
        name = "squad_v1.1"
    if config.max_train_examples > 0 and train is not None:
        train = train[:config.max_train_examples]
    if config.max_eval_examples > 0:
        held_out = held_out[:config.max_eval_examples]
    tokenizer = squad.bert_tokenizer(vocab_path)
    window = dict(max_seq_length=config.max_seq_length, doc_stride=config.doc_stride,
                  max_query_length=config.max_query_length)
    return QAData(name, train, held_out,
                None if train is None else squad.make_features(train, tokenizer, **window),
                squad.make_features(held_out, tokenizer, **window), tokenizer, vocab_path, text,
                stream)


def stream_batch(task: QAData, config: QAConfig, step: int, seed: int) -> dict[str, np.ndarray]:
    """``config.batch_size`` windows of fresh built-in questions, each window holding its answer
    (every question has at least one: the windows cover the whole passage)."""
    examples = task.train_stream.examples(step, config.batch_size, seed)
    arrays = squad.make_features(examples, task.tokenizer, max_seq_length=config.max_seq_length,
                                 doc_stride=config.doc_stride,
                                 max_query_length=config.max_query_length).arrays()
    rows = np.flatnonzero(arrays["start_positions"] > 0)[:config.batch_size]
    if len(rows) < config.batch_size:
        raise ValueError(f"max_seq_length {config.max_seq_length} with max_query_length "
                         f"{config.max_query_length}: only {len(rows)} of {config.batch_size} "
                         "questions have a window holding their answer; raise max_seq_length")
    return {k: arrays[k][rows] for k in ("input_ids", "token_type_ids", "attention_mask",
                                         "start_positions", "end_positions")}


def learning_rate_schedule(peak: float, total_steps: int, warmup_fraction: float) -> optax.Schedule:
    """Linear warmup to ``peak`` over ``warmup_fraction`` of the steps, then linear decay to 0."""
    warmup = max(1, int(round(warmup_fraction * total_steps)))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup))],
                                [warmup])


def _decay_mask(params):
    # BERT's AdamW: no weight decay on biases and LayerNorm parameters.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, "key", None) in ("bias", "scale") for k in path), params)


def create_optimizer(learning_rate: float, weight_decay: float, total_steps: int,
                     warmup_fraction: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(learning_rate_schedule(learning_rate, total_steps, warmup_fraction),
                    b1=0.9, b2=0.999, eps=1e-6, weight_decay=weight_decay, mask=_decay_mask))


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _make_train_step(graphdef, tx, mesh: Mesh, loss_and_accuracy: Callable) -> Callable:
    """``(state, batch, rng) -> (state, metrics)`` minimising ``loss_and_accuracy(model, batch,
    rng) -> (loss, accuracy)`` (``workflow.jit_train_step``)."""

    def loss_fn(params, state, batch, rng):
        loss, accuracy = loss_and_accuracy(nnx.merge(graphdef, params), batch, rng)
        return loss, ({"accuracy": accuracy}, {})

    return workflow.jit_train_step(loss_fn, tx, mesh, num_args=1)


def span_loss(model, batch, rng):
    """Mean of the start and end cross-entropies, and the share of exactly found spans."""
    start, end = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                       dropout_rng=rng)
    losses = (_cross_entropy(start, batch["start_positions"])
              + _cross_entropy(end, batch["end_positions"])) / 2
    hits = ((jnp.argmax(start, -1) == batch["start_positions"])
            & (jnp.argmax(end, -1) == batch["end_positions"]))
    return jnp.mean(losses), jnp.mean(hits)


def masked_lm_loss(model, batch, rng):
    """Mean cross-entropy and accuracy over the masked positions."""
    logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                   batch["masked_positions"], dropout_rng=rng)
    weights = batch["masked_weights"]
    losses = _cross_entropy(logits, batch["masked_ids"])
    hits = jnp.argmax(logits, -1) == batch["masked_ids"]
    total = jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.sum(losses * weights) / total, jnp.sum(hits * weights) / total


def make_logits_fn(graphdef, mesh: Mesh) -> Callable:
    replicated, data = workflow.shardings(mesh)

    def logits(params, batch):
        model = nnx.merge(graphdef, params)
        return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])

    return jax.jit(logits, in_shardings=(replicated, data), out_shardings=replicated)


def evaluate(logits_fn: Callable, params, task: QAData, config: QAConfig, mesh: Mesh) -> dict:
    """F1 / exact match of the held-out questions (windows -> logits -> n-best spans -> text)."""
    features, size = task.eval_features, config.eval_batch_size
    starts, ends = [], []
    for begin in range(0, len(features), size):
        rows = np.arange(begin, begin + size)
        rows[rows >= len(features)] = 0  # a full last batch; its padding rows are dropped below
        batch = {k: getattr(features, k)[rows]
                 for k in ("input_ids", "token_type_ids", "attention_mask")}
        start, end = jax.device_get(logits_fn(params, workflow.shard_batch(batch, mesh)))
        starts.append(start[:len(features) - begin])
        ends.append(end[:len(features) - begin])
    predictions, _ = squad.decode_predictions(task.eval_examples, features, np.concatenate(starts),
                                              np.concatenate(ends), config.n_best,
                                              config.max_answer_length)
    scores = squad.squad_v11_metric(task.eval_examples, predictions)
    return {**scores, "count": len(task.eval_examples)}


def _epoch_batch(arrays: dict[str, np.ndarray], batch_size: int, seed: int, step: int):
    """The ``step``-th training batch: a fresh permutation per epoch, so a resumed run needs
    only the step to continue with the same batches."""
    count = len(next(iter(arrays.values())))
    per_epoch = count // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {count} training rows")
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(count)
    rows = order[index * batch_size:(index + 1) * batch_size]
    return {k: v[rows] for k, v in arrays.items()}


def is_hf_checkpoint(path: str | None) -> bool:
    return bool(path) and os.path.exists(os.path.join(path, "config.json")) and any(
        os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "pytorch_model.bin"))


def _load_fine_tuned(source: str, like: dict) -> tuple[dict, str]:
    """A fine-tuned model: a Hugging Face directory with ``qa_outputs``, or a recipe run's dense
    checkpoint (a run directory or ``checkpoints/dense``)."""
    if is_hf_checkpoint(source):
        params, notes = bert.params_from_hf(bert.read_hf_state_dict(source), like)
        if any("qa_outputs" in n for n in notes if n.startswith("not in")):
            raise ValueError(f"--init-from {source}: no qa_outputs (span head); pass a fine-tuned "
                             "checkpoint, or a pre-trained one with --checkpoint")
        return params, f"Hugging Face checkpoint {source}"
    restored, where = checkpointing.load_dense_state(source, {"params": like})
    return restored["params"], where


def export_onnx(mcfg: bert.BertConfig, params, max_seq_length: int, path: str) -> None:
    """The span model as float32 ONNX: int32 ``[1, max_seq_length]`` inputs ``input_ids``,
    ``token_type_ids``, ``attention_mask``; outputs the start and end logits."""
    import sparse_jax.export  # needs the export extra (jax2onnx)

    graphdef, _ = nnx.split(bert.BertForQuestionAnswering(mcfg, jnp.float32, nnx.Rngs(0)),
                            nnx.Param)
    model = nnx.merge(graphdef, jax.device_get(params))
    example = jax.ShapeDtypeStruct((1, max_seq_length), jnp.int32)
    sparse_jax.export.to_onnx(model, [example] * 3, path,
                              input_names=["input_ids", "token_type_ids", "attention_mask"])


class QuestionAnsweringTask(workflow.Task):
    """SQuAD v1.1 JSON files with a Hugging Face BERT, or the built-in pydoc cloze task."""

    phases = ("pretrain", "dense", "retrain", "control")
    metric = headline = "f1"
    label = "F1"
    percent = False
    outputs = ("vocab.txt", "sparse_model")
    pruning_rules = bert.PRUNING_RULES
    config_name = "recipes/text/qa_task.py QAConfig"
    set_example = "--set max_seq_length=512"
    control_help = "on by default for the built-in task, off for SQuAD"
    options = (
        ("--train-file", "train_file", None, "SQuAD v1.1 train-v1.1.json (with --predict-file: "
         "the full recipe; without: the built-in pydoc task)"),
        ("--predict-file", "predict_file", None, "SQuAD v1.1 dev-v1.1.json, scored by F1 / EM"),
        ("--checkpoint", "checkpoint", None, "pre-trained Hugging Face BERT directory "
         "(config.json, vocab.txt, model.safetensors or pytorch_model.bin)"),
        ("--init-from", "init_from", None, "a fine-tuned model instead of dense fine-tuning: a "
         "Hugging Face directory with the qa_outputs head, or a recipe run directory"),
        ("--size", "size", ("large", "base", "medium", "small", "mini", "tiny"),
         "architecture when no checkpoint gives one (default large)"),
        ("--batch-size", "batch_size", int, "global batch, split over all devices"),
        ("--epochs", "num_epochs", float, "epochs of each fine-tuning phase (SQuAD; the built-in "
         "task makes fresh questions every step: use --steps)"),
        ("--steps", "num_train_steps", int, "steps of each fine-tuning phase"),
        ("--lr", "learning_rate", float, "peak AdamW learning rate"),
        cli.export_option("the final 2:4 model (float32, [1, max_seq_length] int32 inputs)"),
    )

    @staticmethod
    def configs(args: argparse.Namespace, model: str) -> QAConfig:
        if (args.train_file is None) != (args.predict_file is None):
            raise SystemExit("--train-file and --predict-file go together (SQuAD v1.1); give "
                             "neither for the built-in task")
        squad_run = args.train_file is not None
        if squad_run and not (args.checkpoint or args.init_from):
            raise SystemExit("SQuAD needs --checkpoint DIR (a pre-trained Hugging Face BERT) or "
                             "--init-from DIR (a fine-tuned one)")
        if not squad_run and args.epochs is not None:
            raise SystemExit("--epochs: the built-in task makes fresh questions every step, so it "
                             "has no epochs; give --steps N")
        config = QAConfig() if squad_run else builtin_config()  # QAConfig(): BERT-Large, SQuAD
        return config.replace(train_file=args.train_file, predict_file=args.predict_file)

    smoke_config = staticmethod(smoke_config)
    converged_config = staticmethod(converged_config)

    @staticmethod
    def dataset_of(args: argparse.Namespace) -> str:
        return "squad" if args.train_file else "pydoc_qa"

    def setup(self) -> dict[str, Any]:
        config, mesh, wf = self.config, self.wf.mesh, self.wf
        if config.builtin and config.pretrain_batch_size % mesh.size:
            raise ValueError(f"pretrain_batch_size {config.pretrain_batch_size} must be a "
                             f"multiple of the {mesh.size} devices")
        # The architecture: a Hugging Face checkpoint's config, or a named size.
        hf_dir = config.checkpoint or (config.init_from if is_hf_checkpoint(config.init_from)
                                       else None)
        hf_config, self.hf_state, vocab_path = None, None, None
        if hf_dir:
            hf_config, self.hf_state, vocab_path = bert.load_hf_checkpoint(hf_dir)
        self.hf_dir = hf_dir
        mcfg = model_config(config, hf_config)
        run_vocab = os.path.join(config.init_from or "", "vocab.txt")
        if config.builtin and config.init_from and os.path.isfile(run_vocab) and \
                not os.path.exists(os.path.join(self.workdir, "vocab.txt")):
            shutil.copy(run_vocab, self.workdir)  # a finished built-in run: its own vocabulary
        data = self.data = load_task(config, self.workdir, vocab_path)
        self.dataset_name = data.name
        if mcfg.vocab_size != data.tokenizer.get_vocab_size():
            if hf_dir:
                raise ValueError(f"{hf_dir}: config vocab_size {mcfg.vocab_size} but vocab.txt has "
                                 f"{data.tokenizer.get_vocab_size()} tokens")
            mcfg = mcfg.replace(vocab_size=data.tokenizer.get_vocab_size())
        if config.max_seq_length > mcfg.max_position_embeddings:
            raise ValueError(f"max_seq_length {config.max_seq_length} exceeds the model's "
                             f"{mcfg.max_position_embeddings} positions")
        self.mcfg = mcfg
        model = bert.BertForQuestionAnswering(mcfg, jnp.dtype(config.compute_dtype),
                                              init_rngs(config.seed + 1))
        self.graphdef, params = nnx.split(model, nnx.Param)
        params = nnx.to_pure_dict(params)
        self.model_name = (f"bert_{config.size}" if not config.builtin else
                           f"bert_{mcfg.num_layers}x{mcfg.hidden_size}")
        if config.num_train_steps > 0:
            self.steps = config.num_train_steps
        elif data.train_features is not None:
            self.steps = max(1, int(config.num_epochs * len(data.train_features)
                                    // config.batch_size))
        else:
            raise ValueError("the built-in task makes fresh questions every step, so epochs mean "
                             "nothing: set num_train_steps (--set num_train_steps=N)")
        wf.print(f"BERT {mcfg.num_layers} layers x {mcfg.hidden_size} ({mcfg.num_heads} heads, FFN "
                 f"{mcfg.intermediate_size}, vocab {mcfg.vocab_size}): "
                 f"{bert.num_parameters(params):,} parameters with the span head")
        if data.train_stream is not None:
            training = (f"fresh cloze questions on random-word passages every step ("
                        f"{self.steps * config.batch_size:,} per phase)")
        else:
            training = (f"{len(data.train_examples):,} training questions ("
                        f"{len(data.train_features):,} windows of {config.max_seq_length} tokens, "
                        f"stride {config.doc_stride})")
        wf.print(f"{data.name}: {training}, {len(data.eval_examples):,} held-out questions; "
                 f"{mesh.size} {mesh.devices.flat[0].platform} device(s), batch "
                 f"{config.batch_size}, {self.steps} steps per phase, lr "
                 f"{config.learning_rate:g}, compute {config.compute_dtype}")
        self.logits_fn = make_logits_fn(self.graphdef, mesh)
        if data.train_stream is None:
            self.train_arrays = data.train_features.arrays()
        return {"params": params}

    def pretrain(self, state: dict[str, Any], resume: bool) -> dict[str, Any]:
        """Masked-LM pre-training of a fresh BERT on the built-in text, or a Hugging Face
        checkpoint's encoder."""
        config, wf = self.config, self.wf
        self.extra_steps = {"pretrain": 0}
        params = state["params"]
        if config.builtin and config.pretrain_steps > 0 and not config.init_from:
            model = bert.BertForMaskedLM(self.mcfg, jnp.dtype(config.compute_dtype),
                                         init_rngs(config.seed))
            graphdef, mlm_params = nnx.split(model, nnx.Param)
            mlm_params = nnx.to_pure_dict(mlm_params)
            tx = create_optimizer(config.pretrain_learning_rate, 0.01, config.pretrain_steps, 0.1)
            tokenizer = self.data.tokenizer
            rows = qa_data.mlm_sequences(self.data.pretrain_text, tokenizer, config.max_seq_length)
            ids = {t: tokenizer.token_to_id(t) for t in qa_data.SPECIAL_TOKENS}

            def next_batch(step: int) -> dict:
                chosen = _epoch_batch({"rows": rows}, config.pretrain_batch_size, config.seed,
                                      step)["rows"]
                return qa_data.mask_tokens(
                    chosen, np.random.default_rng([config.seed, 7, step]),
                    tokenizer.get_vocab_size(), ids["[MASK]"], tuple(ids.values()), ids["[PAD]"],
                    config.max_predictions)

            wf.print(f"[pretrain] masked LM on {len(rows)} sequences of {config.max_seq_length} "
                     f"tokens, {config.pretrain_steps} steps of {config.pretrain_batch_size}")
            mlm_state = {"params": mlm_params, "opt_state": tx.init(mlm_params)}
            mlm_state, _ = workflow.run_phase(
                wf, "pretrain", mlm_state,
                self._with_rng(_make_train_step(graphdef, tx, wf.mesh, masked_lm_loss)),
                workflow.StepBatches(next_batch), config.pretrain_steps, None, resume)
            params["bert"] = mlm_state["params"]["bert"]
            self.extra_steps["pretrain"] = config.pretrain_steps
        elif self.hf_state is not None and not config.init_from:
            params, notes = bert.params_from_hf(self.hf_state, params)
            wf.print(f"[dense] pre-trained weights from {self.hf_dir}"
                     + "".join(f"; {n}" for n in notes))
        self.hf_state = None
        return {"params": params}

    def _with_rng(self, step_fn: Callable) -> Callable:
        def train_step(state, batch, step, phase):
            key = jax.random.key(self.config.seed + self.phases.index(phase))
            return step_fn(state, batch, jax.random.fold_in(key, step))

        return train_step

    def optimizer(self, params):
        config = self.config
        return create_optimizer(config.learning_rate, config.weight_decay, self.steps,
                                config.warmup_fraction)

    def train_step(self, tx):
        return self._with_rng(_make_train_step(self.graphdef, tx, self.wf.mesh, span_loss))

    def train_batches(self, phase: str, seed: int):
        if self.data.train_stream is not None:
            return workflow.StepBatches(functools.partial(stream_batch, self.data, self.config,
                                                          seed=seed))
        return workflow.StepBatches(lambda step: _epoch_batch(self.train_arrays,
                                                              self.config.batch_size, seed, step))

    def evaluate(self, state: dict[str, Any], phase: str) -> dict[str, Any]:
        return evaluate(self.logits_fn, state["params"], self.data, self.config, self.wf.mesh)

    def eval_record(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"split": "eval", "loss": None, "metric": result["f1"] / 100,
                "exact_match": result["exact_match"] / 100}

    def record_headline(self, record: dict[str, Any]) -> float:
        return 100 * record["metric"]  # the log's F1 is a fraction, results.json's a percentage

    def describe(self, result: dict[str, Any]) -> str:
        return f"held-out F1 {result['f1']:.2f}, exact match {result['exact_match']:.2f}"

    def load_dense(self, source: str, state: dict[str, Any]):
        params, description = _load_fine_tuned(source, state["params"])
        return {"params": params}, description

    def extra_results(self, evals):
        exact = {k: None if v is None else v["exact_match"] for k, v in evals.items()}
        return {"exact_match": exact,
                "batch_size": self.config.batch_size, "eval_questions": evals["sparse"]["count"]}

    def table_rows(self, results):
        return [("exact match", results["exact_match"])]

    def table_note(self, results):
        return f"batch {results['batch_size']}; held-out questions: {results['eval_questions']}"

    def write_outputs(self, state, evals) -> None:
        bert.save_hf_checkpoint(os.path.join(self.workdir, "sparse_model"), self.mcfg,
                                jax.device_get(state["params"]), self.data.vocab_path)

    def export_onnx(self, state, path: str) -> None:
        export_onnx(self.mcfg, state["params"], self.config.max_seq_length, path)


def main(model: str, description: str, epilog: str, argv: list[str] | None = None) -> dict:
    return cli.main(QuestionAnsweringTask, model, description, epilog, argv)
