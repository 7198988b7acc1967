"""The 2:4 workflow for BERT on extractive question answering (SQuAD v1.1 or the built-in task).

``train_and_evaluate(config, workdir)`` runs, as one resumable job:

0. (built-in task only) **pretrain**: a WordPiece vocabulary trained on the text, then a small
   BERT trained briefly by masked LM on it (the stand-in for Google's pre-trained checkpoint);
1. **dense**: fine-tune the span head and the encoder (AdamW, linear warmup and decay), or load
   a fine-tuned model (``init_from``);
2. **prune**: every encoder Linear (query, key, value, attention output, intermediate, output)
   2:4 along its input dimension, see ``bert.PRUNING_RULES``; evaluated as is (one-shot);
3. **retrain**: the same fine-tuning schedule again from the pruned weights, with a fresh
   ``sparse_jax.masked(optax.adamw(...))``, so that every step keeps the weights exactly 2:4;
4. optionally **control** (``config.control``): the dense model fine-tuned as many more steps
   without a mask, the fair comparison when the dense phase has not converged.

F1 / exact match are the official SQuAD v1.1 ones (``squad.squad_v11_metric``). Training is
data parallel over a 1-D mesh of all devices (``train.create_mesh``); parameters and optimizer
state are float32, the model computes in ``config.compute_dtype``. Each phase checkpoints to
``checkpoints/<phase>/<step>/`` (``checkpointing.PhaseCheckpoints``); ``resume`` continues.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sparse_jax
from recipes.engine import checkpointing, metrics
from recipes.text import bert, qa_data, squad
from recipes.text.bert_configs import QAConfig
from recipes.vision.train import (RUN_OUTPUTS, Interrupted, create_mesh, mean_loss_and_accuracy,
                                  exactly_masked, prepare_workdir, report_summary, run_facts,
                                  shard_batch, write_run_outputs)

PHASES = ("pretrain", "dense", "retrain", "control")


# ---------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------


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
class Task:
    name: str
    train_examples: list[squad.Example] | None  # SQuAD: a fixed training set
    eval_examples: list[squad.Example]
    train_features: squad.Features | None
    eval_features: squad.Features
    tokenizer: Any
    vocab_path: str
    pretrain_text: list[str] | None  # built-in task only
    train_stream: qa_data.ClozeStream | None = None  # built-in task: fresh questions every step


def load_task(config: QAConfig, workdir: str, vocab_path: str | None) -> Task:
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
        for flag, path in (("--train-file", config.train_file), ("--predict-file", config.predict_file)):
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
    return Task(name, train, held_out,
                None if train is None else squad.make_features(train, tokenizer, **window),
                squad.make_features(held_out, tokenizer, **window), tokenizer, vocab_path, text,
                stream)


def stream_batch(task: Task, config: QAConfig, step: int, seed: int) -> dict[str, np.ndarray]:
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


# ---------------------------------------------------------------------------------------------
# Optimizer and steps
# ---------------------------------------------------------------------------------------------


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


def make_qa_train_step(graphdef, tx, mesh: Mesh) -> Callable:
    """``(state, batch, rng) -> (state, metrics)``: mean of the start and end cross-entropies."""
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def step(state, batch, rng):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            start, end = model(batch["input_ids"], batch["token_type_ids"],
                               batch["attention_mask"], dropout_rng=rng)
            losses = (_cross_entropy(start, batch["start_positions"])
                      + _cross_entropy(end, batch["end_positions"])) / 2
            hits = ((jnp.argmax(start, -1) == batch["start_positions"])
                    & (jnp.argmax(end, -1) == batch["end_positions"]))
            return jnp.mean(losses), jnp.mean(hits)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {**state, "params": params, "opt_state": opt_state}, {"loss": loss,
                                                                      "accuracy": accuracy}

    return jax.jit(step, in_shardings=(replicated, data, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def make_mlm_train_step(graphdef, tx, mesh: Mesh) -> Callable:
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def step(state, batch, rng):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                           batch["masked_positions"], dropout_rng=rng)
            weights = batch["masked_weights"]
            losses = _cross_entropy(logits, batch["masked_ids"])
            hits = jnp.argmax(logits, -1) == batch["masked_ids"]
            total = jnp.maximum(jnp.sum(weights), 1.0)
            return jnp.sum(losses * weights) / total, jnp.sum(hits * weights) / total

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {**state, "params": params, "opt_state": opt_state}, {"loss": loss,
                                                                      "accuracy": accuracy}

    return jax.jit(step, in_shardings=(replicated, data, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def make_logits_fn(graphdef, mesh: Mesh) -> Callable:
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def logits(params, batch):
        model = nnx.merge(graphdef, params)
        return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])

    return jax.jit(logits, in_shardings=(replicated, data), out_shardings=replicated)


def evaluate(logits_fn: Callable, params, task: Task, config: QAConfig, mesh: Mesh) -> dict:
    """F1 / exact match of the held-out questions (windows -> logits -> n-best spans -> text)."""
    features = task.eval_features
    inputs = {k: v for k, v in features.arrays().items()
              if k in ("input_ids", "token_type_ids", "attention_mask")}
    starts, ends = [], []
    for batch in squad.batches(inputs, config.eval_batch_size):
        count = int(batch.pop("weight").sum())
        start, end = jax.device_get(logits_fn(params, shard_batch(batch, mesh)))
        starts.append(start[:count])
        ends.append(end[:count])
    predictions, _ = squad.decode_predictions(task.eval_examples, features, np.concatenate(starts),
                                              np.concatenate(ends), config.n_best,
                                              config.max_answer_length)
    scores = squad.squad_v11_metric(task.eval_examples, predictions)
    return {**scores, "count": len(task.eval_examples), "predictions": predictions}


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workflow:
    config: QAConfig
    workdir: str
    mesh: Mesh
    log: metrics.MetricsLog
    steps_done: int = 0

    def print(self, *args) -> None:
        if jax.process_index() == 0:
            print(*args, flush=True)


def _progress_bar(total: int, initial: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True,
                disable=not enabled or jax.process_index() != 0, file=sys.stdout, leave=True)


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


def run_phase(wf: Workflow, phase: str, state: dict, train_step: Callable,
              next_batch: Callable[[int], dict], total_steps: int,
              evaluate_fn: Callable[[dict], dict] | None, resume: bool) -> tuple[dict, dict]:
    """Trains ``state`` for ``total_steps``; logs, checkpoints, evaluates at the end."""
    config = wf.config
    progress = {"phase": phase, "step": 0, "total_steps": total_steps, "seconds": 0.0, "eval": None}
    ckpt, state, progress, done = checkpointing.open_phase(
        wf, phase, PHASES, state, progress, total_steps, resume,
        final_key=None if evaluate_fn is None else "eval")
    if done:
        return state, progress
    step = progress["step"]
    started = time.time() - progress["seconds"]
    bar = _progress_bar(total_steps, step, phase, config.progress_bar)
    pending = []
    base_rng = jax.random.key(config.seed + PHASES.index(phase))
    while step < total_steps:
        batch = shard_batch(next_batch(step), wf.mesh)
        state, step_metrics = train_step(state, batch, jax.random.fold_in(base_rng, step))
        step += 1
        wf.steps_done += 1
        pending.append(step_metrics)
        bar.update(1)
        if step % config.log_every_steps == 0 or step == total_steps:
            loss, accuracy = mean_loss_and_accuracy(pending, phase, step)
            pending = []
            wf.log.write({"phase": phase, "step": step, "split": "train", "loss": loss,
                          "metric": accuracy})
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{100 * accuracy:.1f}%")
        if step == total_steps and evaluate_fn is not None:
            result = evaluate_fn(state["params"])
            progress["eval"] = {k: v for k, v in result.items() if k != "predictions"}
            wf.log.write({"phase": phase, "step": step, "split": "eval", "loss": None,
                          "metric": result["f1"] / 100, "exact_match": result["exact_match"] / 100})
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
            progress.update(step=step, seconds=time.time() - started)
            ckpt.save(step, state, progress)
        if 0 < config.interrupt_after_steps <= wf.steps_done and step < total_steps:
            bar.close()
            ckpt.close()
            raise Interrupted(f"[{phase}] stopped after {wf.steps_done} steps")
    bar.close()
    ckpt.close()
    return state, progress


def pretrain(wf: Workflow, task: Task, mcfg: bert.BertConfig, resume: bool) -> dict:
    """Masked-LM pre-training of a fresh BERT on the task's text; returns the encoder params."""
    config = wf.config
    model = bert.BertForMaskedLM(mcfg, jnp.dtype(config.compute_dtype), init_rngs(config.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        learning_rate_schedule(config.pretrain_learning_rate, config.pretrain_steps, 0.1),
        b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, mask=_decay_mask))
    rows = qa_data.mlm_sequences(task.pretrain_text, task.tokenizer, config.max_seq_length)
    ids = {t: task.tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}

    def next_batch(step: int) -> dict:
        chosen = _epoch_batch({"rows": rows}, config.pretrain_batch_size, config.seed, step)["rows"]
        return qa_data.mask_tokens(chosen, np.random.default_rng([config.seed, 7, step]),
                                   task.tokenizer.get_vocab_size(), ids["[MASK]"],
                                   tuple(ids.values()), ids["[PAD]"], config.max_predictions)

    wf.print(f"[pretrain] masked LM on {len(rows)} sequences of {config.max_seq_length} tokens, "
             f"{config.pretrain_steps} steps of {config.pretrain_batch_size}")
    state = {"params": params, "opt_state": tx.init(params)}
    state, _ = run_phase(wf, "pretrain", state, make_mlm_train_step(graphdef, tx, wf.mesh),
                         next_batch, config.pretrain_steps, None, resume)
    return state["params"]["bert"]


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
    ckpt_dir = os.path.join(source, "checkpoints", "dense") if os.path.isdir(
        os.path.join(source, "checkpoints", "dense")) else source
    manager = checkpointing.PhaseCheckpoints(ckpt_dir)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"--init-from {source}: no dense checkpoint found")
    state, _ = manager.restore(step, {"params": like})
    manager.close()
    return state["params"], f"{ckpt_dir}/{step}"


# ---------------------------------------------------------------------------------------------
# The workflow
# ---------------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_and_evaluate(config: QAConfig, workdir: str, *, resume: bool = False,
                       overwrite: bool = False) -> dict[str, Any]:
    """Runs (pretrain ->) dense -> prune (one-shot eval) -> masked retrain; returns results.json."""
    started, cpu_started = time.time(), _cpu_seconds()
    if config.distributed:
        jax.distributed.initialize()
    prepare_workdir(workdir, resume, overwrite, RUN_OUTPUTS + ("vocab.txt", "sparse_model"))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())
    mesh = create_mesh(config.devices)
    for name in ("batch_size", "eval_batch_size") + (("pretrain_batch_size",) if config.builtin else ()):
        if getattr(config, name) % mesh.size:
            raise ValueError(f"{name} {getattr(config, name)} must be a multiple of the "
                             f"{mesh.size} devices")

    # The architecture: a Hugging Face checkpoint's config, or a named size.
    hf_dir = config.checkpoint or (config.init_from if is_hf_checkpoint(config.init_from) else None)
    hf_config, hf_state, vocab_path = None, None, None
    if hf_dir:
        hf_config, hf_state, vocab_path = bert.load_hf_checkpoint(hf_dir)
    mcfg = model_config(config, hf_config)
    dtype = jnp.dtype(config.compute_dtype)
    wf = Workflow(config, workdir, mesh, metrics.MetricsLog(os.path.join(workdir, "metrics.jsonl")))
    task = load_task(config, workdir, vocab_path)
    if mcfg.vocab_size != task.tokenizer.get_vocab_size():
        if hf_dir:
            raise ValueError(f"{hf_dir}: config vocab_size {mcfg.vocab_size} but vocab.txt has "
                             f"{task.tokenizer.get_vocab_size()} tokens")
        mcfg = mcfg.replace(vocab_size=task.tokenizer.get_vocab_size())
    if config.max_seq_length > mcfg.max_position_embeddings:
        raise ValueError(f"max_seq_length {config.max_seq_length} exceeds the model's "
                         f"{mcfg.max_position_embeddings} positions")

    model = bert.BertForQuestionAnswering(mcfg, dtype, init_rngs(config.seed + 1))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    num_params = bert.num_parameters(params)
    if config.num_train_steps > 0:
        steps = config.num_train_steps
    elif task.train_features is not None:
        steps = max(1, int(config.num_epochs * len(task.train_features) // config.batch_size))
    else:
        raise ValueError("the built-in task makes fresh questions every step, so epochs mean "
                         "nothing: set num_train_steps (--set num_train_steps=N)")
    wf.print(f"BERT {mcfg.num_layers} layers x {mcfg.hidden_size} ({mcfg.num_heads} heads, FFN "
             f"{mcfg.intermediate_size}, vocab {mcfg.vocab_size}): {num_params:,} parameters with "
             "the span head")
    if task.train_stream is not None:
        training = (f"fresh cloze questions on random-word passages every step ("
                    f"{steps * config.batch_size:,} per phase)")
    else:
        training = (f"{len(task.train_examples):,} training questions ({len(task.train_features):,}"
                    f" windows of {config.max_seq_length} tokens, stride {config.doc_stride})")
    wf.print(f"{task.name}: {training}, {len(task.eval_examples):,} held-out questions; "
             f"{mesh.size} {mesh.devices.flat[0].platform} device(s), batch {config.batch_size}, "
             f"{steps} steps per phase, lr {config.learning_rate:g}, compute "
             f"{config.compute_dtype}")

    logits_fn = make_logits_fn(graphdef, mesh)
    evaluate_fn = functools.partial(evaluate, logits_fn, task=task, config=config, mesh=mesh)
    if task.train_stream is not None:
        next_batch = functools.partial(stream_batch, task, config)
    else:
        train_arrays = task.train_features.arrays()
        next_batch = lambda step, seed: _epoch_batch(train_arrays, config.batch_size, seed, step)

    # 0. Pre-trained encoder: masked LM on the built-in text, or a Hugging Face checkpoint.
    pretrain_steps = 0
    if config.builtin and config.pretrain_steps > 0 and not config.init_from:
        params["bert"] = pretrain(wf, task, mcfg, resume)
        pretrain_steps = config.pretrain_steps
    elif hf_state is not None and not config.init_from:
        params, notes = bert.params_from_hf(hf_state, params)
        wf.print(f"[dense] pre-trained weights from {hf_dir}" + "".join(f"; {n}" for n in notes))
    del hf_state

    # 1. Dense fine-tuning, or a fine-tuned model.
    if config.init_from:
        params, description = _load_fine_tuned(config.init_from, params)
        wf.print(f"[dense] loaded {description}")
        params = jax.device_put(params, NamedSharding(mesh, P()))
        dense_eval, dense_steps, dense_seconds = evaluate_fn(params), 0, 0.0
        dense_eval.pop("predictions")
        wf.log.write({"phase": "dense", "step": 0, "split": "eval", "loss": None,
                      "metric": dense_eval["f1"] / 100, "exact_match": dense_eval["exact_match"] / 100})
    else:
        tx = create_optimizer(config.learning_rate, config.weight_decay, steps,
                              config.warmup_fraction)
        state = {"params": params, "opt_state": tx.init(params)}
        state, progress = run_phase(wf, "dense", state, make_qa_train_step(graphdef, tx, mesh),
                                    functools.partial(next_batch, seed=config.seed), steps,
                                    evaluate_fn, resume)
        params, dense_eval = state["params"], progress["eval"]
        dense_steps, dense_seconds = steps, progress["seconds"]
    wf.print(f"[dense] held-out F1 {dense_eval['f1']:.2f}, exact match {dense_eval['exact_match']:.2f}")

    # 2. Prune every encoder Linear 2:4 along its input dimension; evaluate as is.
    pruned, masks = sparse_jax.prune(params, 2, 4, rules=bert.PRUNING_RULES)
    one_shot = evaluate_fn(pruned)
    one_shot.pop("predictions")
    if not any(r["phase"] == "one_shot" for r in wf.log.read()):
        wf.log.write({"phase": "one_shot", "step": 0, "split": "eval", "loss": None,
                      "metric": one_shot["f1"] / 100, "exact_match": one_shot["exact_match"] / 100})
    wf.print(f"[prune] 2:4 one-shot held-out F1 {one_shot['f1']:.2f}, exact match "
             f"{one_shot['exact_match']:.2f}")

    # The train steps donate their input state: keep the dense weights for the control.
    dense_params = jax.tree.map(jnp.copy, params) if config.control else None

    # 3. The same fine-tuning again, with the mask fixed and a fresh optimizer.
    sparse_tx = sparse_jax.masked(create_optimizer(config.learning_rate, config.weight_decay,
                                                   steps, config.warmup_fraction), masks)
    state = {"params": pruned, "opt_state": sparse_tx.init(pruned), "masks": masks}
    state, progress = run_phase(wf, "retrain", state, make_qa_train_step(graphdef, sparse_tx, mesh),
                                functools.partial(next_batch, seed=config.seed + 1), steps,
                                evaluate_fn, resume)
    # The step donates its input state: the masks to use now are the state's.
    final_params, masks, sparse_eval = state["params"], state["masks"], progress["eval"]
    retrain_seconds = progress["seconds"]

    report = sparse_jax.sparsity_report(final_params, masks, 2, 4, rules=bert.PRUNING_RULES)
    exactly_sparse = exactly_masked(final_params, masks)
    wf.print(f"[retrain] held-out F1 {sparse_eval['f1']:.2f}, exact match "
             f"{sparse_eval['exact_match']:.2f} (weights exactly 2:4: {exactly_sparse})")

    # 4. Optionally the fair comparison: the dense model fine-tuned as many more steps, unmasked.
    control, control_seconds = None, 0.0
    if config.control:
        control_tx = create_optimizer(config.learning_rate, config.weight_decay, steps,
                                      config.warmup_fraction)
        control_state = {"params": dense_params, "opt_state": control_tx.init(dense_params)}
        _, control_progress = run_phase(
            wf, "control", control_state, make_qa_train_step(graphdef, control_tx, mesh),
            functools.partial(next_batch, seed=config.seed + 2), steps, evaluate_fn, resume)
        control, control_seconds = control_progress["eval"], control_progress["seconds"]
        wf.print(f"[control] held-out F1 {control['f1']:.2f}, exact match "
                 f"{control['exact_match']:.2f}")

    results = {
        "model": f"bert_{config.size}" if not config.builtin else
                 f"bert_{mcfg.num_layers}x{mcfg.hidden_size}",
        "dataset": task.name,
        "metric": "f1",
        "dense": dense_eval["f1"],
        "one_shot": one_shot["f1"],
        "sparse": sparse_eval["f1"],
        "control": control["f1"] if control else None,
        "exact_match": {"dense": dense_eval["exact_match"], "one_shot": one_shot["exact_match"],
                        "sparse": sparse_eval["exact_match"],
                        "control": control["exact_match"] if control else None},
        "steps": {"pretrain": pretrain_steps, "dense": dense_steps, "retrain": steps,
                  "control": steps if control else None},
        "batch_size": config.batch_size,
        "num_params": num_params,
        "eval_questions": sparse_eval["count"],
        "exactly_nm_sparse": exactly_sparse,
        "cpu_seconds": round(_cpu_seconds() - cpu_started, 1),
        "training_seconds": round(dense_seconds + retrain_seconds + control_seconds, 1),
        **run_facts(started, mesh),
    }
    write_run_outputs(workdir, results, report, lambda path: metrics.plot_curves(
        [r for r in wf.log.read() if r["phase"] != "pretrain"], path,
        f"BERT on {task.name}: dense -> 2:4 prune -> retrain", metric_name="F1"))
    if jax.process_index() == 0:
        bert.save_hf_checkpoint(os.path.join(workdir, "sparse_model"), mcfg,
                                jax.device_get(final_params), task.vocab_path)
        if config.export_onnx:
            export_onnx(mcfg, final_params, config.max_seq_length, config.export_onnx)
            wf.print(f"wrote the 2:4 model as ONNX to {config.export_onnx} (check: "
                     f"sparse-jax-inspect {config.export_onnx})")
    wf.print("")
    wf.print(report_summary(report, os.path.join(workdir, "sparsity_report.txt")))
    wf.print("")
    wf.print(results_table(results))
    wf.print(f"\nwrote {workdir}/results.json, metrics.jsonl, curves.png, sparsity_report.txt, "
             "checkpoints/, sparse_model/ (Hugging Face layout)")
    return results


def export_onnx(mcfg: bert.BertConfig, params, max_seq_length: int, path: str) -> None:
    """Writes the span-prediction model to ONNX: float32 (TensorRT picks its own precision), eval
    mode, inputs ``input_ids``, ``token_type_ids``, ``attention_mask`` of ``[1, max_seq_length]``
    int32; outputs start and end logits."""
    import sparse_jax.export  # needs the export extra (jax2onnx)

    graphdef, _ = nnx.split(bert.BertForQuestionAnswering(mcfg, jnp.float32, nnx.Rngs(0)),
                            nnx.Param)
    model = nnx.merge(graphdef, jax.device_get(params))
    example = jax.ShapeDtypeStruct((1, max_seq_length), jnp.int32)
    sparse_jax.export.to_onnx(model, [example] * 3, path,
                              input_names=["input_ids", "token_type_ids", "attention_mask"])


def results_table(results: dict[str, Any]) -> str:
    em = results["exact_match"]
    columns = [("dense", "dense"), ("2:4 one-shot", "one_shot"), ("2:4 retrained", "sparse")]
    if results.get("control") is not None:
        columns.append(("dense control", "control"))
    lines = [
        "| model | dataset | " + " | ".join(f"{title} F1 / EM" for title, _ in columns) + " |",
        "|---|---|" + "---|" * len(columns),
        f"| {results['model']} | {results['dataset']} | " + " | ".join(
            f"{results[key]:.2f} / {em[key]:.2f}" for _, key in columns) + " |",
        f"steps: pretrain {results['steps']['pretrain']}, dense {results['steps']['dense']}, "
        f"retrain {results['steps']['retrain']}"
        + (f", control {results['steps']['control']}" if results['steps'].get('control') else "")
        + f" (batch {results['batch_size']}); held-out "
        f"questions: {results['eval_questions']}; {results['seconds']:.0f} s wall, "
        f"{results['cpu_seconds']:.0f} s CPU on {results['devices']} {results['platform']} device(s)",
    ]
    return "\n".join(lines)
