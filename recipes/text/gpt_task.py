"""A GPT language model (built-in stdlib sources, or GPT-2 on WikiText-2) as an engine task.

Workflow: dense training (or ``--init-from`` a GPT-2 ``model.safetensors``), then one-shot 2:4
by every method of ``one_shot_methods`` (magnitude, Wanda, SparseGPT through
``sparse_jax.oneshot_prune``, sequential, on ``calibration_sequences`` random training windows),
each evaluated; the best (lowest held-out perplexity) is retrained under ``sparse_jax.masked``
for ``retrain_steps``. Pruned (`PRUNING_RULES`): every block's ``c_attn``, ``attn.c_proj``,
``c_fc`` and ``mlp.c_proj``, 2:4 along the input axis; the embeddings (``wte`` is also the
tied output projection) stay dense. AdamW (decay on kernels only), linear warm-up then cosine
decay to a tenth, gradient clipping at 1. The headline is the held-out perplexity (lower is better).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sparse_jax
from flax import nnx

from recipes.engine import checkpointing, cli, workflow
from recipes.engine.workflow import WorkflowConfig
from recipes.text import gpt, gpt_data

PRUNING_RULES = (
    (r"^(wte|wpe)/embedding$", "skip"),
    (r"^h/\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/kernel$", 0),
)
SKIP_EXPLANATIONS = {"wte/embedding": "token embedding, also the tied output projection",
                     "wpe/embedding": "position embedding (a lookup)"}


@dataclasses.dataclass(frozen=True)
class GPTRecipeConfig(WorkflowConfig):
    model: str = "gpt"
    compute_dtype: str = "float32"
    data_dir: str | None = None  # WikiText-2 raw files; None: the standard library's sources
    vocab_size: int = 2048  # of the BPE trained when there is no tokenizer
    max_text_bytes: int = -1  # smoke runs: a prefix of each split
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    seq_len: int = 128  # training, calibration and evaluation window (<= n_positions)
    batch_size: int = 16
    eval_batch_size: int = 16
    max_eval_windows: int = 256  # evaluations inside a phase (the final one uses every window)
    eval_every_steps: int = 200
    num_train_steps: int = 800  # dense
    retrain_steps: int = 200  # retrain and control
    learning_rate: float = 3e-3
    retrain_learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    one_shot_methods: str = "magnitude,wanda,sparsegpt"
    calibration_sequences: int = 128
    calibration_batch: int = 16
    log_every_steps: int = 50
    checkpoint_every_steps: int = 200


def builtin_config() -> GPTRecipeConfig:
    return GPTRecipeConfig(control=True)  # the fair comparison for "retrained"


def gpt2_config() -> GPTRecipeConfig:
    """GPT-2 from Hugging Face weights on WikiText-2: 1,024-token windows, stride = window."""
    return GPTRecipeConfig(compute_dtype="bfloat16", seq_len=1024, batch_size=8,
                           eval_batch_size=8, max_eval_windows=64, eval_every_steps=250,
                           num_train_steps=10_000, retrain_steps=1000, retrain_learning_rate=5e-5,
                           warmup_steps=100, weight_decay=0.0, calibration_batch=8,
                           log_every_steps=50, checkpoint_every_steps=500)


def smoke_config(config: GPTRecipeConfig) -> GPTRecipeConfig:
    return config.replace(
        vocab_size=300, max_text_bytes=60_000, n_layer=2, n_head=2, n_embd=32, seq_len=32,
        batch_size=8, eval_batch_size=8, max_eval_windows=4, eval_every_steps=3,
        num_train_steps=6, retrain_steps=4, warmup_steps=2, calibration_sequences=16,
        calibration_batch=8, log_every_steps=2, checkpoint_every_steps=3, progress_bar=False)


def hf_weights(source: str | None) -> str | None:
    """The ``model.safetensors`` that ``--init-from`` names (a file or its directory), or None."""
    if source and os.path.isdir(source) and os.path.isfile(os.path.join(source, "model.safetensors")):
        return os.path.join(source, "model.safetensors")
    return source if source and source.endswith(".safetensors") else None


def next_token_nll(logits, tokens):
    """Per-position NLL of ``tokens[:, 1:]`` given the logits of ``tokens[:, :-1]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])


class GPTTask(workflow.Task):
    """Next-token prediction; held-out perplexity is the headline."""

    metric = headline = "perplexity"
    label = "perplexity"
    percent = False
    outputs = ("tokenizer.json", "sparse_model.safetensors")
    pruning_rules = PRUNING_RULES
    skip_explanations = SKIP_EXPLANATIONS
    config_name = "recipes/text/gpt_task.py GPTRecipeConfig"
    set_example = "--set n_layer=6 --set calibration_sequences=64"
    control_help = "on by default for the built-in text, off for WikiText-2"
    options = (
        ("--data-dir", "data_dir", None, "folder with WikiText-2 wiki.{train,valid,test}.raw; "
         "selects the full recipe. Without it: the standard library's sources"),
        ("--init-from", "init_from", None, "a Hugging Face GPT-2 model.safetensors (or its "
         "directory, with config.json and tokenizer files), or a finished run directory"),
        ("--steps", "num_train_steps", int, "dense training steps"),
        ("--retrain-steps", "retrain_steps", int, "masked retraining steps"),
        ("--methods", "one_shot_methods", None, "comma-separated one-shot methods "
         "(magnitude, wanda, sparsegpt); the best is retrained"),
        cli.export_option("the final 2:4 model (logits of input_ids [1, seq_len], float32)"),
    )

    @staticmethod
    def configs(args: argparse.Namespace, model: str) -> GPTRecipeConfig:
        return (gpt2_config() if args.data_dir else builtin_config()).replace(data_dir=args.data_dir)

    smoke_config = staticmethod(smoke_config)

    @staticmethod
    def dataset_of(args: argparse.Namespace) -> str:
        return "wikitext2" if args.data_dir else "stdlib"

    def setup(self) -> dict[str, Any]:
        config, wf = self.config, self.wf
        texts = (gpt_data.wikitext2(config.data_dir) if config.data_dir
                 else gpt_data.stdlib_modules(config.max_text_bytes))
        self.dataset_name = "wikitext2" if config.data_dir else "stdlib"
        hf_file = hf_weights(config.init_from)
        saved = os.path.join(self.workdir, "tokenizer.json")
        run_tokenizer = os.path.join(config.init_from or "", "tokenizer.json")  # a run directory
        source = (os.path.dirname(hf_file) if hf_file  # GPT-2's own tokenizer.json
                  else config.init_from if os.path.isfile(run_tokenizer) else None)
        if source or os.path.isfile(saved):
            tokenizer = gpt_data.load_tokenizer(source or saved)
            wf.print(f"tokenizer: {source or saved} ({tokenizer.get_vocab_size():,} tokens)")
        else:
            started = time.time()
            tokenizer = gpt_data.train_bpe(texts["train"], config.vocab_size)
            wf.print(f"tokenizer: byte-level BPE of {tokenizer.get_vocab_size():,} tokens trained "
                     f"in {time.time() - started:.1f} s")
        if jax.process_index() == 0 and not os.path.isfile(saved):
            tokenizer.save(saved)
        self.streams = {split: gpt_data.encode(tokenizer, t) for split, t in texts.items()}
        self.eval_split = "test" if "test" in self.streams else "valid"
        if hf_file:
            self.model_cfg = gpt.hf_gpt2_config(hf_file, dtype=config.compute_dtype)
        else:
            self.model_cfg = gpt.GPTConfig(tokenizer.get_vocab_size(), config.seq_len,
                                           config.n_embd, config.n_layer, config.n_head,
                                           dtype=config.compute_dtype)
        self.graphdef, params = nnx.split(gpt.GPT(self.model_cfg, nnx.Rngs(config.seed)), nnx.Param)
        self.steps = config.num_train_steps
        self.phase, self.one_shot, self.best_method = "dense", {}, None
        self.srste_steps = 0  # --method sr-ste: the steps of its one phase (and of the control)
        replicated, data = workflow.shardings(self.wf.mesh)

        def eval_step(params, tokens, weights):
            nll = next_token_nll(nnx.merge(self.graphdef, params)(tokens), tokens)
            return jnp.sum(nll.sum(-1) * weights), jnp.sum(weights) * nll.shape[1]

        self.eval_step = jax.jit(eval_step, in_shardings=(replicated, data, data))
        cfg, counts = self.model_cfg, {k: f"{len(v):,}" for k, v in self.streams.items()}
        wf.print(f"gpt: {cfg.n_layer} layers, d {cfg.n_embd}, {cfg.n_head} heads, "
                 f"{cfg.n_positions} positions, vocabulary {cfg.vocab_size:,}: "
                 f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters")
        wf.print(f"{self.dataset_name} tokens: {counts}; windows of {config.seq_len}, batch "
                 f"{config.batch_size}; steps: dense {self.steps}, retrain {config.retrain_steps}")
        return {"params": nnx.to_pure_dict(params)}

    def phase_steps(self, phase: str) -> int:
        self.phase = phase  # asked first in each phase: optimizer() then builds its schedule
        if self.srste_steps:
            return self.srste_steps
        return self.steps if phase == "dense" else self.config.retrain_steps

    projects_loss_params = True  # train_step's loss sees self.params_projection's params

    def set_phase_steps(self, steps: int) -> None:
        # SR-STE: one phase from the random init, as long as dense + retrain, with the dense
        # peak learning rate; its control as long.
        super().set_phase_steps(steps)
        self.srste_steps = steps

    def optimizer(self, params):
        # From the random init (dense, SR-STE and its control): the dense peak learning rate.
        config, dense = self.config, self.phase == "dense" or self.srste_steps > 0
        peak = config.learning_rate if dense else config.retrain_learning_rate
        total = max(self.phase_steps(self.phase), config.warmup_steps + 1)
        self.schedule = optax.warmup_cosine_decay_schedule(0.0, peak, config.warmup_steps, total,
                                                           end_value=peak / 10)
        decay = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
            self.schedule, b1=0.9, b2=0.95, weight_decay=config.weight_decay, mask=decay))

    def train_step(self, tx):
        graphdef, project = self.graphdef, self.params_projection

        def loss_fn(params, state, batch):
            tokens = batch["tokens"]
            logits = nnx.merge(graphdef, params if project is None else project(params))(tokens)
            accuracy = jnp.mean(jnp.argmax(logits[:, :-1], -1) == tokens[:, 1:])
            return next_token_nll(logits, tokens).mean(), ({"accuracy": accuracy}, {})

        jitted = workflow.jit_train_step(loss_fn, tx, self.wf.mesh)
        return lambda state, batch, step_index, phase: jitted(state, batch)

    def train_batches(self, phase: str, seed: int):
        config, stream = self.config, self.streams["train"]
        rows = config.batch_size // jax.process_count()
        return workflow.StepBatches(lambda step: {"tokens": gpt_data.random_windows(
            stream, config.batch_size, config.seq_len, [seed, step])[
                jax.process_index() * rows:(jax.process_index() + 1) * rows]})

    def train_record(self, fetched, step):  # metric: perplexity of the training batches
        loss = float(np.mean([m["loss"] for m in fetched]))
        return {"loss": loss, "metric": float(np.exp(loss)),
                "accuracy": float(np.mean([m["accuracy"] for m in fetched]))}

    def evaluate(self, state, phase: str, split: str | None = None, max_windows: int = -1):
        if phase == "one_shot" and self.one_shot:  # prune_step evaluated the chosen model already
            return self.one_shot[self.best_method]
        windows = gpt_data.eval_windows(self.streams[split or self.eval_split],
                                        self.config.seq_len, max_windows)
        size = self.config.eval_batch_size
        total = count = 0.0
        for start in range(0, len(windows), size):
            chunk = windows[start:start + size]
            weights = np.zeros(size, np.float32)
            weights[:len(chunk)] = 1.0
            chunk = np.concatenate([chunk, np.zeros((size - len(chunk), chunk.shape[1]), np.int32)])
            nll, tokens = jax.device_get(self.eval_step(
                state["params"], *workflow.shard_batch({"t": chunk, "w": weights},
                                                       self.wf.mesh).values()))
            total, count = total + float(nll), count + float(tokens)
        loss = total / count
        return {"perplexity": float(np.exp(loss)), "loss": loss, "tokens": int(count),
                "windows": len(windows)}

    def eval_record(self, result):
        return {"split": "eval", "loss": result["loss"], "metric": result["perplexity"]}

    def eval_during(self, state, phase: str, step: int):
        last = step == self.phase_steps(phase)
        if last:
            result = self.evaluate(state, phase)
            return self.eval_record(result), result
        if step % self.config.eval_every_steps:
            return None, None
        result = self.evaluate(state, phase, "valid", self.config.max_eval_windows)
        return {"split": "valid", "loss": result["loss"], "metric": result["perplexity"]}, None

    def describe(self, result):
        return (f"held-out perplexity {result['perplexity']:.2f} ({result['tokens']:,} tokens "
                f"of {self.eval_split})")

    def prune_step(self, model_state):
        """Every one-shot method from the same calibration windows; returns the best one."""
        config, wf = self.config, self.wf
        calibration = gpt_data.random_windows(self.streams["train"], config.calibration_sequences,
                                              config.seq_len, [config.seed, 999])
        batches = [calibration[i:i + config.calibration_batch]
                   for i in range(0, len(calibration), config.calibration_batch)]
        graphdef = self.graphdef
        forward = lambda params, tokens: nnx.merge(graphdef, params)(tokens)
        pruned = {}
        for method in config.one_shot_methods.split(","):
            started = time.time()
            with warnings.catch_warnings():  # wpe's gather: PRUNING_RULES decide it
                warnings.filterwarnings("ignore", "rules_from_computation could not follow")
                params, masks, _ = sparse_jax.oneshot_prune(
                    forward, model_state["params"], batches, method=method, n=config.sparsity_n,
                    m=config.sparsity_m, rules=PRUNING_RULES, progress=config.progress_bar)
            seconds = time.time() - started
            self.one_shot[method] = {**self.evaluate({**model_state, "params": params}, method),
                                     "seconds": round(seconds, 1)}
            pruned[method] = params, masks
            wf.print(f"[prune] {method}: {self.describe(self.one_shot[method])}, pruned in "
                     f"{seconds:.1f} s from {len(calibration)} calibration windows")
        self.best_method = min(self.one_shot, key=lambda k: self.one_shot[k]["perplexity"])
        params, masks = pruned[self.best_method]
        wf.print(f"[prune] retraining the best one-shot model: {self.best_method}")
        return params, masks

    def load_dense(self, source: str, state):
        hf_file = hf_weights(source)
        if hf_file:
            return {**state, "params": gpt.load_hf_gpt2(hf_file, state["params"])}, \
                f"Hugging Face GPT-2 weights {hf_file}"
        return checkpointing.load_dense_state(source, {"params": state["params"]})

    def extra_results(self, evals):
        methods = self.one_shot
        held_out = next(e for e in evals.values() if e is not None)
        return {"one_shot_method": self.best_method, "seq_len": self.config.seq_len,
                "one_shot_perplexity": {k: v["perplexity"] for k, v in methods.items()},
                "one_shot_seconds": {k: v["seconds"] for k, v in methods.items()},
                "calibration_sequences": self.config.calibration_sequences,
                "eval_tokens": held_out["tokens"], "eval_split": self.eval_split}

    def table_rows(self, results):
        return [(f"one-shot {k}", {"one_shot": v})
                for k, v in results["one_shot_perplexity"].items()]

    def table_note(self, results):
        held_out = (f"{results['eval_tokens']:,} held-out tokens in windows of "
                    f"{results['seq_len']}")
        if results["one_shot_method"] is None:  # --method sr-ste: no one-shot step
            return held_out
        return (f"one-shot column of the first row: the best method ({results['one_shot_method']}), "
                f"the one retrained; {held_out}, {results['calibration_sequences']} calibration "
                "windows")

    def write_outputs(self, state, evals) -> None:
        gpt.save_hf_gpt2(jax.device_get(state["params"]),
                         os.path.join(self.workdir, "sparse_model.safetensors"))

    def export_onnx(self, state, path: str) -> None:
        import sparse_jax.export  # needs the export extra (jax2onnx)

        cfg = dataclasses.replace(self.model_cfg, dtype="float32")
        model = nnx.merge(nnx.split(gpt.GPT(cfg, nnx.Rngs(0)), nnx.Param)[0],
                          jax.device_get(state["params"]))
        sparse_jax.export.to_onnx(model, [jax.ShapeDtypeStruct((1, self.config.seq_len), np.int32)],
                                  path, input_names=["input_ids"])


def train_and_evaluate(config: GPTRecipeConfig, workdir: str, **kwargs) -> dict[str, Any]:
    return workflow.train_and_evaluate(GPTTask, config, workdir, **kwargs)


def main(model: str, description: str, epilog: str, argv: list[str] | None = None) -> dict:
    return cli.main(GPTTask, model, description, epilog, argv)
