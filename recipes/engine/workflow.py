"""The one 2:4 workflow every recipe runs: dense -> prune -> retrain (-> control) -> evaluate.

``train_and_evaluate(task_class, config, workdir)`` runs, as one resumable job:

1. **dense**: train the task's model with its reference schedule, or load it (``init_from``);
2. **prune**: ``sparse_jax.prune`` (``config.pruning``: "magnitude") keeps the ``n`` largest
   of every ``m`` weights along each kernel's reduction axis (the task's ``pruning_rules``);
   the pruned model is evaluated as is ("one-shot");
3. **retrain**: the same schedule again from the pruned weights, with a fresh optimizer wrapped
   in ``sparse_jax.masked``, so that every step keeps the weights exactly n:m;
4. optionally **control** (``config.control``): the dense model trained as many more steps
   without a mask, so that sparse-vs-dense compares models that had the same number of steps.

Options of the prune step (``config.transposable``, ``permute``, ``recalibrate_bn``):
transposable n:m masks (``sparse_jax.prune(transposable=True)``); channel permutations found
from the task's own ``forward`` (``sparse_jax.channel_groups``, ``search_permutations``,
``apply_permutations``) before pruning; batch statistics re-estimated on a few hundred training
images after it (the task's ``recalibrate_batch_stats``). With either of the last two, the
one-shot model is evaluated in all four combinations ("one_shot_variants" in results.json) and
retraining starts from the one asked for.

``config.method = "sr-ste"`` replaces dense -> prune -> retrain by one phase "sr-ste" of as many
steps from the random init, trained with SR-STE (``sparse_jax.srste``: the task's loss sees
``sparse_jax.srste_project`` of the params through ``Task.loss_params``; sparse-refined decay
before the task's optimizer); its final mask (``sparse_jax.srste_finalize``) goes to the same
evaluation, sparsity report and export. The control then trains dense for the same steps.

The engine owns everything around the phases: the device mesh (data parallel: parameters
replicated, batches split along ``"data"``), several processes (``jax.distributed``),
per-phase orbax checkpoints with ``--resume`` (model, optimizer and data-iterator state), the
progress bars, ``metrics.jsonl``, ``curves.png``, ``sparsity_report.txt``, ``results.json``,
the results table, ONNX export and the wall time. A task (``Task``) only knows its model, data,
optimizer, train step and evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sparse_jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recipes.engine import checkpointing, metrics

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "results.json", "curves.png", "sparsity_report.txt")
PRUNING_METHODS = ("magnitude",)
METHODS = ("prune-retrain", "sr-ste")


class Interrupted(RuntimeError):
    """Raised when ``config.interrupt_after_steps`` simulates a killed run (tests)."""


@dataclasses.dataclass(frozen=True)
class WorkflowConfig:
    """The fields the engine reads; every task's config extends it (``--set FIELD=VALUE``)."""

    model: str = ""
    compute_dtype: str = "bfloat16"  # parameters and optimizer state stay float32
    num_train_steps: int = -1  # > 0: steps of each phase (else the task's epochs)
    init_from: str | None = None  # dense weights instead of dense training
    method: str = "prune-retrain"  # one of METHODS
    pruning: str = "magnitude"  # one of PRUNING_METHODS
    transposable: bool = False  # prune: n:m along both axes of every m x m block
    permute: bool = False  # prune: channel permutations that keep more magnitude, first
    recalibrate_bn: bool = False  # prune: re-estimate the batch statistics afterwards
    recalibrate_examples: int = 512  # training images for --recalibrate-bn
    permutation_time_limit: float = 2.0  # seconds of search per channel group at most
    srste_decay: float = 2e-4  # SR-STE's sparse-refined decay (the paper's lambda_W)
    sparsity_n: int = 2
    sparsity_m: int = 4
    control: bool = False  # also train the dense model for the retraining steps
    # > 0: the engine adds held-out evaluations at this many + 1 evenly spaced steps over the
    # last half of every phase; results.json "last_quarter" then tells whether each phase's
    # held-out metric was still moving (the converged presets set it)
    plateau_evals: int = 0
    seed: int = 0
    log_every_steps: int = 100
    checkpoint_every_steps: int = 1000
    max_checkpoints_to_keep: int = 2
    devices: int = -1  # -1: all local devices
    distributed: bool = False  # several processes: jax.distributed.initialize
    coordinator_address: str | None = None  # host:port of process 0 (else JAX_COORDINATOR_ADDRESS)
    num_processes: int = -1  # else JAX_NUM_PROCESSES (or the cluster's auto-detection)
    process_id: int = -1  # else JAX_PROCESS_ID
    progress_bar: bool = True
    export_onnx: str | None = None  # also write the final sparse model as ONNX
    interrupt_after_steps: int = -1  # testing: stop after this many steps in all

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


class Task:
    """One recipe: its model, data, optimizer, train step and evaluation.

    The engine calls, in order: ``setup()`` (returns the model state, a dict of pure-dict trees
    with at least ``"params"``, and sets ``self.steps``, the steps of each phase), optionally
    ``pretrain(state)``, then per phase ``optimizer(params)``, ``train_step(tx)``,
    ``train_batches(phase, seed)``, ``train_record(...)`` and ``evaluate(state, phase)``.
    """

    phases: ClassVar[tuple[str, ...]] = ("dense", "retrain", "control")
    metric: ClassVar[str] = "top1"  # results.json "metric"
    headline: ClassVar[str] = "top1"  # the key of evaluate()'s result that is the headline
    label: ClassVar[str] = "top-1"  # its name in tables and plots
    percent: ClassVar[bool] = True  # a fraction, shown x100
    outputs: ClassVar[tuple[str, ...]] = ()  # run outputs besides RUN_OUTPUTS
    seed_offsets: ClassVar[dict[str, int]] = {"dense": 0, "retrain": 1, "control": 2}
    pruning_rules: ClassVar[Any] = None
    skip_explanations: ClassVar[dict[str, str]] = {}

    # True where the task's train step calls ``loss_params`` on the params its loss sees
    # (needed by ``--method sr-ste``).
    projects_loss_params: ClassVar[bool] = False

    def __init__(self, config, workdir: str, wf: "Workflow"):
        self.config, self.workdir, self.wf = config, workdir, wf
        self.steps = 0
        # Set by the engine before it calls train_step(tx) for an SR-STE phase.
        self.params_projection: Callable | None = None
        self.model_name = config.model  # results.json "model"
        self.extra_steps: dict[str, int] = {}  # steps of the task's own phases (pretrain)

    # -- to override ---------------------------------------------------------------------------
    def setup(self) -> dict[str, Any]:
        raise NotImplementedError

    def optimizer(self, params):
        raise NotImplementedError

    def train_step(self, tx) -> Callable:
        """``(state, batch, step, phase) -> (state, metrics)``; state: model state + opt_state."""
        raise NotImplementedError

    def train_batches(self, phase: str, seed: int) -> Iterator:
        """The phase's training batches (with ``get_state``/``set_state`` to resume)."""
        raise NotImplementedError

    def train_record(self, fetched: list[dict], step: int) -> dict[str, Any]:
        """The train log record of the steps since the last one (default: mean loss, accuracy)."""
        return {"loss": float(np.mean([m["loss"] for m in fetched])),
                "metric": float(np.mean([m["accuracy"] for m in fetched]))}

    def evaluate(self, state: dict[str, Any], phase: str) -> dict[str, Any]:
        raise NotImplementedError

    def eval_record(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"split": "eval", "loss": None, "metric": result[self.headline]}

    def record_headline(self, record: dict[str, Any]) -> float:
        """The headline, in results.json's units, of a held-out log record's ``metric``."""
        return record["metric"]

    def eval_steps(self) -> set[int]:
        """Steps of a phase with a held-out evaluation (its last step always has one)."""
        return {self.steps}

    def eval_during(self, state, phase: str, step: int) -> tuple[dict | None, dict | None]:
        """(log record or None, the phase's final result or None) after ``step``."""
        if step not in self.eval_steps() and step != self.steps:
            return None, None
        result = self.evaluate(state, phase)
        return self.eval_record(result), result if step == self.steps else None

    def load_dense(self, source: str, state: dict[str, Any]) -> tuple[dict[str, Any], str]:
        raise NotImplementedError

    def phase_steps(self, phase: str) -> int:
        """Steps of ``phase``, asked first thing in each phase (default: ``self.steps``)."""
        return self.steps

    # Optional: ``prune_step(model_state) -> (pruned params, masks)`` replaces the engine's
    # ``prune`` (e.g. one-shot methods that need calibration data).

    def describe(self, result: dict[str, Any]) -> str:
        return f"held-out {self.label} {format_value(result[self.headline], self.percent)}"

    def extra_results(self, evals: dict[str, dict | None]) -> dict[str, Any]:
        return {}

    def table_rows(self, results: dict[str, Any]) -> list[tuple[str, dict]]:
        """Extra rows of the results table: (label, {phase: value})."""
        return []

    def table_note(self, results: dict[str, Any]) -> str:
        return ""

    def write_outputs(self, state: dict[str, Any], evals: dict[str, dict | None]) -> None:
        """Task-specific files, written by the main process."""

    def export_onnx(self, state: dict[str, Any], path: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no ONNX export")

    # -- optional, for the engine's other methods ---------------------------------------------
    def loss_params(self, params):
        """What the loss of a train step built now sees instead of ``params`` (SR-STE: their
        straight-through n:m projection); a task with ``projects_loss_params`` applies it."""
        return params if self.params_projection is None else self.params_projection(params)

    def set_phase_steps(self, steps: int) -> None:
        """The next phases have ``steps`` steps (SR-STE: dense + retrain together)."""
        self.steps = steps

    @staticmethod
    def converged_config(config):
        """``--preset converged``: the built-in ``config`` trained until the dense phase's
        held-out metric is flat (longer, same recipe otherwise); None: the task has none."""
        return None

    def forward(self, variables: dict[str, Any], batch: dict) -> Any:
        """Inference over ``variables`` (the model state without the optimizer) and one training
        batch (``--permute`` reads the channel groups from it)."""
        raise NotImplementedError

    def recalibrate_batch_stats(self, variables: dict[str, Any], batches: list) -> dict[str, Any]:
        """``variables`` with batch statistics re-estimated on ``batches`` (``--recalibrate-bn``)."""
        raise NotImplementedError


def initialize_distributed(config: WorkflowConfig) -> None:
    """``jax.distributed.initialize`` with the explicit coordinator, process count and id
    (options, else ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``);
    with none of them, JAX's own cluster detection (SLURM, Open MPI, ...)."""
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = config.num_processes if config.num_processes >= 0 else int(
        os.environ.get("JAX_NUM_PROCESSES", -1))
    index = config.process_id if config.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
    explicit = {"coordinator_address": address, "num_processes": None if count < 0 else count,
                "process_id": None if index < 0 else index}
    given = [k for k, v in explicit.items() if v is not None]
    if given and len(given) < 3:
        missing = sorted(set(explicit) - set(given))
        raise ValueError(f"--distributed: got {', '.join(given)} but not {', '.join(missing)}; give "
                         "all three (or none, for JAX's cluster auto-detection)")
    if "cpu" in (jax.config.jax_platforms or "") or not _has_accelerator():
        # CPU processes need a collectives implementation to run cross-process reductions.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})


def _has_accelerator() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                           "libtpu"))


def create_mesh(num_devices: int = -1):
    """A 1-D ``("data",)`` mesh over all devices, or the first ``num_devices`` local ones."""
    if num_devices is None or num_devices < 0:
        devices = jax.devices()
    else:
        if jax.process_count() > 1:
            raise ValueError("--devices selects local devices and cannot be used with several "
                             "processes; every process uses all of its devices")
        if num_devices > jax.local_device_count():
            raise ValueError(f"--devices {num_devices}: only {jax.local_device_count()} local "
                             f"devices are visible ({jax.local_devices()[0].platform})")
        devices = jax.local_devices()[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict:
    """This process's part of a global batch -> global arrays split along ``"data"``."""
    sharding = NamedSharding(mesh, P("data"))
    return {key: jax.make_array_from_process_local_data(sharding, value)
            for key, value in batch.items()}


def shardings(mesh):
    """(replicated, split along "data") shardings of ``mesh``."""
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def jit_train_step(loss_fn: Callable, tx, mesh, num_args: int = 0, donate: bool = True,
                   **jit_options) -> Callable:
    """The one optimizer step of every task: a jitted ``(state, batch, *args) -> (state,
    metrics)``, data parallel over ``mesh`` (state and the ``num_args`` extra arguments
    replicated, the batch split). ``loss_fn(params, state, batch, *args) -> (loss, (metrics,
    changed))`` is differentiated in the params; ``tx`` steps them, ``changed`` (e.g. new batch
    statistics) replaces its entries of the state, and ``metrics`` gain ``"loss"`` first."""
    replicated, data = shardings(mesh)

    def step(state, batch, *args):
        (loss, (step_metrics, changed)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state, batch, *args)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return ({**state, "params": params, **changed, "opt_state": opt_state},
                {"loss": loss, **step_metrics})

    return jax.jit(step, in_shardings=(replicated, data) + (replicated,) * num_args,
                   out_shardings=(replicated, replicated), donate_argnums=0 if donate else (),
                   **jit_options)


class StepBatches:
    """An iterator over ``batch_fn(step)``: batches that depend on the step only; its state is
    the step."""

    def __init__(self, batch_fn: Callable[[int], dict]):
        self.batch_fn, self.step = batch_fn, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batch_fn(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def phase_steps(config, num_train: int) -> int:
    """``num_train_steps``, or ``num_epochs`` of a ``num_train``-example split."""
    if config.num_train_steps > 0:
        return config.num_train_steps
    return max(1, int(config.num_epochs * num_train // config.batch_size))


@dataclasses.dataclass
class Workflow:
    """What every phase shares (``checkpointing.open_phase`` reads ``workdir``, ``config``,
    ``mesh``, ``log`` and ``print``)."""

    config: Any
    workdir: str
    mesh: Any
    log: Any  # metrics.MetricsLog
    phases: tuple[str, ...]
    steps_done: int = 0

    def print(self, *args) -> None:
        if jax.process_index() == 0:
            print(*args, flush=True)


def _progress_bar(total: int, initial: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True,
                disable=not enabled or jax.process_index() != 0, file=sys.stdout, leave=True)


def run_phase(wf: Workflow, phase: str, state: dict, train_step: Callable, batches: Iterator,
              total_steps: int, eval_during: Callable | None, resume: bool) -> tuple[dict, dict]:
    """Trains ``state`` for ``total_steps``: logs, checkpoints, evaluates (``eval_during(state,
    phase, step) -> (record, final result)``; None: no evaluation). With ``resume``, continues
    from the phase's latest checkpoint (state, data position, step); a finished phase is restored
    without running a step. Returns the final state and progress (``progress["eval"]``)."""
    config = wf.config
    progress = {"phase": phase, "step": 0, "total_steps": total_steps, "seconds": 0.0, "eval": None}
    has_state = hasattr(batches, "get_state")
    ckpt, state, progress, done = checkpointing.open_phase(
        wf, phase, wf.phases, state, progress, total_steps, resume,
        data_iterator=batches if has_state else None,
        final_key=None if eval_during is None else "eval")
    if done:
        return state, progress
    step = progress["step"]
    started = time.time() - progress["seconds"]
    bar = _progress_bar(total_steps, step, phase, config.progress_bar)
    pending, postfix = [], {}
    while step < total_steps:
        state, step_metrics = train_step(state, shard_batch(next(batches), wf.mesh), step, phase)
        step += 1
        wf.steps_done += 1
        pending.append(step_metrics)
        bar.update(1)
        if step % config.log_every_steps == 0 or step == total_steps:
            fetched = jax.device_get(pending)
            record = wf.task.train_record(fetched, step)
            if "mask_flip" in fetched[0]:  # SR-STE: mean fraction of mask entries flipped a step
                record["mask_flip_fraction"] = float(np.mean([m["mask_flip"] for m in fetched]))
            pending = []
            if not np.isfinite(record["loss"]):
                raise FloatingPointError(f"[{phase}] loss became {record['loss']} at step {step}")
            wf.log.write({"phase": phase, "step": step, "split": "train", **record})
            postfix["loss"] = f"{record['loss']:.3f}"
            bar.set_postfix(**postfix)
        if eval_during is not None:
            record, final = eval_during(state, phase, step)
            if record is not None:
                wf.log.write({"phase": phase, "step": step, **record})
                if record.get("metric") is not None:
                    postfix[wf.task.label] = format_value(record["metric"], wf.task.percent)
                bar.set_postfix(**postfix)
            if final is not None:
                progress["eval"] = final
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
            progress.update(step=step, seconds=time.time() - started)
            if has_state:
                progress["data_state"] = batches.get_state()
            ckpt.save(step, state, progress)
        if 0 < config.interrupt_after_steps <= wf.steps_done and step < total_steps:
            bar.close()
            ckpt.close()
            raise Interrupted(f"[{phase}] stopped after {wf.steps_done} steps "
                              "(interrupt_after_steps)")
    bar.close()
    ckpt.close()
    return state, progress


def plateau_steps(total_steps: int, count: int) -> set[int]:
    """``count + 1`` evenly spaced steps over the second half of a ``total_steps`` phase."""
    if count <= 0:
        return set()
    return {max(1, round(total_steps * (0.5 + j / (2 * count)))) for j in range(count + 1)}


def with_plateau_evals(task: Task, eval_during: Callable, total_steps: int, count: int,
                       evaluated: Callable[[dict], dict] = lambda state: state) -> Callable:
    """``eval_during`` that also evaluates the headline metric at ``plateau_steps`` (on
    ``evaluated(state)``), where the task's own schedule gives no headline there."""
    extra = plateau_steps(total_steps, count)
    if not extra:
        return eval_during

    def during(state, phase: str, step: int):
        record, final = eval_during(state, phase, step)
        if step in extra and (record is None or record.get("metric") is None):
            record = {**(record or {}), **task.eval_record(task.evaluate(evaluated(state), phase))}
        return record, final

    return during


def last_quarter(records: list[dict], phase: str, total_steps: int,
                 headline: Callable[[dict], float] = lambda record: record["metric"]) -> dict | None:
    """The held-out headline (``headline(record)``) over the last quarter of ``phase``: its steps
    and values, the change from the first of them to the last and their spread (max - min);
    None with fewer than two evaluations there."""
    held_out = sorted((r["step"], headline(r)) for r in records
                      if r["phase"] == phase and r.get("split") != "train" and r["step"] > 0
                      and r.get("metric") is not None and r["step"] >= 0.75 * total_steps)
    if len(held_out) < 2:
        return None
    values = [v for _, v in held_out]
    return {"steps": [s for s, _ in held_out], "values": values,
            "change": values[-1] - values[0], "spread": max(values) - min(values)}


def prepare_workdir(workdir: str, resume: bool, overwrite: bool,
                    outputs: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """Creates ``workdir``; a finished run's ``outputs`` are removed (or an unfinished run's, with
    ``overwrite``) unless resuming. An unfinished run is never lost silently."""
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and not resume:
        finished = os.path.exists(os.path.join(workdir, "results.json"))
        if not (finished or overwrite):
            raise FileExistsError(
                f"{workdir} holds an unfinished run; pass --resume to continue it, or "
                "--overwrite to start again")
        if jax.process_index() == 0:
            for name in outputs:
                path = os.path.join(workdir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
    os.makedirs(workdir, exist_ok=True)


def exactly_masked(params, masks) -> bool:
    """Whether ``params`` already equal ``sparse_jax.apply_masks(params, masks)``, bit for bit."""
    remasked = jax.jit(sparse_jax.apply_masks)(params, masks)
    return all(np.array_equal(p, a) for p, a in zip(
        jax.device_get(jax.tree.leaves(params)), jax.device_get(jax.tree.leaves(remasked))))


def prune(config, params, rules=None, transposable: bool | None = None):
    """(pruned params, masks) by ``config.pruning`` ("magnitude": ``sparse_jax.prune``;
    transposable masks with ``config.transposable``, or ``transposable`` when given)."""
    if config.pruning not in PRUNING_METHODS:
        raise ValueError(f"pruning {config.pruning!r}: expected one of {PRUNING_METHODS}")
    transposable = config.transposable if transposable is None else transposable
    return jax.jit(functools.partial(sparse_jax.prune, n=config.sparsity_n, m=config.sparsity_m,
                                     rules=rules, transposable=transposable))(params)


def check_methods(task_class: type[Task], config) -> None:
    """Fails before any work when the task cannot run the options ``config`` asks for."""
    name = task_class.__name__
    if config.method not in METHODS:
        raise ValueError(f"--method {config.method!r}: expected one of {METHODS}")
    if config.method == "sr-ste":
        if not task_class.projects_loss_params:
            raise ValueError(f"--method sr-ste: {name}'s train step does not apply "
                             "Task.loss_params (projects_loss_params is False)")
        if config.init_from:
            raise ValueError("--method sr-ste trains from the random init; --init-from (a dense "
                             "model to prune) belongs to --method prune-retrain")
        for flag, on in (("--permute", config.permute), ("--recalibrate-bn", config.recalibrate_bn)):
            if on:
                raise ValueError(f"{flag} is an option of the prune step of --method "
                                 "prune-retrain; --method sr-ste has no prune step")
    if config.permute and task_class.forward is Task.forward:
        raise ValueError(f"--permute: {name} defines no forward(variables, batch), the inference "
                         "computation the channel groups are read from")
    if config.recalibrate_bn and task_class.recalibrate_batch_stats is Task.recalibrate_batch_stats:
        raise ValueError(f"--recalibrate-bn: {name}'s model has no batch statistics to "
                         "recalibrate (no recalibrate_batch_stats)")
    if config.recalibrate_examples < 1:
        raise ValueError(f"recalibrate_examples must be positive, got {config.recalibrate_examples}")


def kept_magnitude_fraction(params, masks) -> float:
    """Sum of |w| the masks keep over the sum of |w|, over the pruned leaves (float64)."""
    kept = total = 0.0
    aligned = jax.tree.leaves(masks, is_leaf=lambda x: x is None)
    for leaf, mask in zip(jax.tree.leaves(params), aligned):
        if mask is None:
            continue
        magnitude = np.abs(np.asarray(jax.device_get(leaf), np.float64))
        kept += float(magnitude[np.asarray(jax.device_get(mask), bool)].sum())
        total += float(magnitude.sum())
    return kept / total if total else 1.0


def _merge_variables(variables: dict[str, Any]) -> tuple[dict, Callable[[dict], dict]]:
    """One tree of ``variables["params"]`` with the other collections' leaves merged in where
    their modules are (batch stats next to the norm's scale), so that leaf paths are the params'
    paths the pruning rules match; and the function that splits such a tree back."""
    def merge(into: dict, other: dict, where: str) -> dict:
        out = dict(into)
        for key, value in other.items():
            if key not in out:
                out[key] = value
            elif isinstance(out[key], dict) and isinstance(value, dict):
                out[key] = merge(out[key], value, f"{where}/{key}")
            else:
                raise ValueError(f"--permute: {where}/{key} is in params and another collection")
        return out

    def pick(tree: dict, like: dict) -> dict:
        return {k: pick(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}

    merged = variables["params"]
    for name, collection in variables.items():
        if name != "params":
            merged = merge(merged, collection, name)
    return merged, lambda tree: {name: pick(tree, c) for name, c in variables.items()}


def permute_channels(task: Task, config, variables: dict[str, Any], batch: dict
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``variables`` with channel permutations that raise the kept n:m magnitude (the same
    function before pruning), and a record of the search."""
    started = time.time()
    merged, split = _merge_variables(variables)
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch)
    coupling = sparse_jax.channel_groups(lambda v, b: task.forward(split(v), b), merged, example)
    search = sparse_jax.search_permutations(
        merged, coupling, config.sparsity_n, config.sparsity_m, task.pruning_rules,
        time_limit=config.permutation_time_limit, seed=config.seed)
    permuted = split(sparse_jax.apply_permutations(merged, coupling, search))
    record = {"groups": len(coupling.groups), "permutable": len(coupling.permutable),
              "searched": len(search.groups), "permuted": sum(
                  not np.array_equal(p, np.arange(len(p))) for p in search.perms.values()),
              "consumers_kept_before": search.kept_before, "consumers_kept_after": search.kept_after,
              "search_seconds": round(sum(g.seconds for g in search.groups), 2),
              "time_limit_reached": sum(g.seconds >= config.permutation_time_limit
                                        for g in search.groups),
              "seconds": round(time.time() - started, 2)}
    return permuted, record


def recalibration_batches(task: Task, config) -> list[dict]:
    """``config.recalibrate_examples`` training images (rounded up to whole batches)."""
    batches = task.train_batches("recalibrate", config.seed + task.seed_offsets.get("recalibrate", 3))
    out, count = [], 0
    while count < config.recalibrate_examples:
        batch = next(batches)
        out.append(batch)
        count += len(next(iter(batch.values())))
    return out


def prune_with_options(task: Task, config, model_state: dict[str, Any]):
    """The prune step with ``--permute`` / ``--recalibrate-bn``: the one-shot ablation (every
    combination evaluated) and the state, masks and one-shot result of the combination asked
    for. Returns ``(pruned_state, masks, one_shot, extra results)``."""
    rules = task.pruning_rules
    extra: dict[str, Any] = {}
    batches = recalibration_batches(task, config)
    can_permute = type(task).forward is not Task.forward
    can_recalibrate = type(task).recalibrate_batch_stats is not Task.recalibrate_batch_stats
    starts = {False: model_state}
    if can_permute:
        starts[True], extra["permutation"] = permute_channels(task, config, model_state, batches[0])
    variants, chosen, kept = {}, None, {}
    kind = "transposable" if config.transposable else "nm"
    for permuted, start in starts.items():
        pruned, masks = prune(config, start["params"], rules)
        suffix = "_permuted" if permuted else ""
        kept[kind + suffix] = kept_magnitude_fraction(start["params"], masks)
        if config.transposable:  # the plain n:m mask of the same weights, for comparison
            kept["nm" + suffix] = kept_magnitude_fraction(
                start["params"], prune(config, start["params"], rules, transposable=False)[1])
        for recalibrated in ((False, True) if can_recalibrate else (False,)):
            state = {**start, "params": pruned}
            if recalibrated:
                state = jax.device_put(task.recalibrate_batch_stats(state, batches),
                                       shardings(task.wf.mesh)[0])
            name = {(False, False): "magnitude", (True, False): "permutation",
                    (False, True): "bn_recalibration", (True, True): "both"}[permuted, recalibrated]
            result = task.evaluate(state, "one_shot")
            variants[name] = result
            task.wf.print(f"[prune] one-shot {name.replace('_', ' ')}: {task.describe(result)}")
            if (permuted, recalibrated) == (config.permute, config.recalibrate_bn):
                chosen = state, masks, result
    extra["kept_magnitude_fraction"] = kept
    order = ("magnitude", "permutation", "bn_recalibration", "both")
    extra["one_shot_variants"] = {k: variants[k][task.headline] for k in order if k in variants}
    extra["recalibrate_examples"] = sum(len(next(iter(b.values()))) for b in batches)
    return (*chosen, extra)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def format_value(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" if percent else f"{value:.2f}"


def train_and_evaluate(task_class: type[Task], config, workdir: str, *, resume: bool = False,
                       overwrite: bool = False) -> dict[str, Any]:
    """Runs dense -> prune (one-shot eval) -> masked retrain (-> dense control) -> evaluate.

    Args:
        task_class: the recipe's ``Task``.
        config: its configuration (a ``WorkflowConfig``).
        workdir: output directory (results.json, metrics.jsonl, curves.png, checkpoints/).
        resume: continue from the checkpoints in ``workdir``; gives the same result as an
            uninterrupted run.
        overwrite: start again even if ``workdir`` holds an unfinished run.

    Returns:
        The dict written to ``results.json``.
    """
    started, cpu_started = time.time(), _cpu_seconds()
    check_methods(task_class, config)
    srste = config.method == "sr-ste"
    if config.distributed:
        initialize_distributed(config)
    prepare_workdir(workdir, resume, overwrite, RUN_OUTPUTS + task_class.outputs)
    main_process = jax.process_index() == 0
    if main_process:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())
    mesh = create_mesh(config.devices)
    for name in ("batch_size", "eval_batch_size"):  # the fields of the tasks that have them
        if getattr(config, name, mesh.size) % mesh.size:
            raise ValueError(f"{name} {getattr(config, name)} must be a multiple of the "
                             f"{mesh.size} devices")
    log = metrics.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    phases = task_class.phases
    if srste:  # one SR-STE phase where dense and retrain were
        phases = tuple(p for p in phases if p != "retrain")
        phases = tuple("sr-ste" if p == "dense" else p for p in phases)
    wf = Workflow(config, workdir, mesh, log, phases)
    task = wf.task = task_class(config, workdir, wf)
    model_state = task.setup()
    num_params = sum(int(x.size) for x in jax.tree.leaves(model_state["params"]))
    steps = task.steps
    compiled: dict[str, Callable] = {}  # dense and control share one compiled step
    n, m = config.sparsity_n, config.sparsity_m
    project = functools.partial(sparse_jax.srste_project, n=n, m=m, rules=task.pruning_rules,
                                transposable=config.transposable)

    def projected(state):
        return {**state, "params": jax.jit(project)(state["params"])}

    def srste_eval_during(state, phase, step):
        # Held-out evaluations see the weights the forward pass uses: the n:m projection.
        if step not in task.eval_steps() and step != task.steps:
            return task.eval_during(state, phase, step)
        return task.eval_during(projected(state), phase, step)

    def train(phase: str, model_state: dict, masks=None, kind: str | None = None,
              seed_phase: str | None = None) -> tuple[dict, dict]:
        kind = kind or ("masked" if masks is not None else "dense")
        total_steps = task.phase_steps(phase)
        tx = task.optimizer(model_state["params"])
        if masks is not None:
            tx = sparse_jax.masked(tx, masks)
        if kind == "sr-ste":  # the decay goes to the gradient, before the task's optimizer
            tx = optax.chain(sparse_jax.srste(n, m, task.pruning_rules, decay=config.srste_decay,
                                              transposable=config.transposable), tx)
        # The steps may donate their input state: every phase gets its own copies.
        state = {**jax.tree.map(jnp.copy, model_state),
                 "opt_state": jax.jit(tx.init)(model_state["params"])}
        if masks is not None:
            state["masks"] = jax.tree.map(jnp.copy, masks)
        if kind not in compiled:
            if kind == "sr-ste":
                task.params_projection = project
                inner = task.train_step(tx)
                task.params_projection = None

                def step_fn(state, batch, step, phase):
                    state, step_metrics = inner(state, batch, step, phase)
                    flips = sparse_jax.srste_flip_fraction(state["opt_state"])
                    return state, {**step_metrics, "mask_flip": flips}

                compiled[kind] = step_fn
            else:
                compiled[kind] = task.train_step(tx)
        seed = config.seed + task.seed_offsets.get(seed_phase or phase, 0)
        batches = task.train_batches(phase, seed)
        eval_during = with_plateau_evals(
            task, srste_eval_during if kind == "sr-ste" else task.eval_during, total_steps,
            config.plateau_evals, projected if kind == "sr-ste" else (lambda state: state))
        state, progress = run_phase(wf, phase, state, compiled[kind], batches, total_steps,
                                    eval_during, resume)
        wf.print(f"[{phase}] {task.describe(progress['eval'])}")
        return state, progress

    def model_part(state: dict) -> dict:
        return {k: v for k, v in state.items() if k not in ("opt_state", "masks")}

    def log_once(phase: str, result: dict) -> None:
        if not any(r["phase"] == phase for r in log.read()):  # a resumed run logged it already
            log.write({"phase": phase, "step": 0, **task.eval_record(result)})

    # 0. Optional pre-training (the task's own phase, e.g. masked LM).
    if hasattr(task, "pretrain"):
        model_state = task.pretrain(model_state, resume)

    seconds, extra = {}, {}
    if srste:
        # 1-3. SR-STE from the random init, as many steps as dense + retrain together.
        task.set_phase_steps(task.phase_steps("dense") + task.phase_steps("retrain"))
        state, progress = train("sr-ste", model_state, kind="sr-ste",
                                seed_phase="sr-ste" if "sr-ste" in task.seed_offsets else "dense")
        pruned, masks = jax.jit(sparse_jax.srste_finalize)(state["params"], state["opt_state"])
        final_state = {**model_part(state), "params": pruned}
        sparse, seconds["sr-ste"] = progress["eval"], progress["seconds"]
        dense = one_shot = None
        dense_steps = 0
        extra["mask_flip_fraction_last_step"] = float(
            sparse_jax.srste_flip_fraction(state["opt_state"]))
        exactly_sparse = exactly_masked(final_state["params"], masks)
        wf.print(f"[sr-ste] weights exactly {n}:{m}: {exactly_sparse}")
        # The sr-ste checkpoints hold the dense weights SR-STE trains; the n:m model goes here.
        final_ckpt = checkpointing.PhaseCheckpoints(os.path.join(workdir, "checkpoints", "sparse"),
                                                    config.max_checkpoints_to_keep)
        if final_ckpt.latest_step() != task.steps:  # (a resumed finished run has it)
            final_ckpt.save(task.steps, {**final_state, "masks": masks},
                            {"phase": "sparse", "step": task.steps, "eval": sparse})
        final_ckpt.close()
    else:
        # 1. Dense.
        if config.init_from:
            model_state, description = task.load_dense(config.init_from, model_state)
            wf.print(f"[dense] loaded {description}")
            model_state = jax.device_put(model_state, shardings(mesh)[0])
            dense = task.evaluate(model_state, "dense")
            log_once("dense", dense)
            wf.print(f"[dense] {task.describe(dense)}")
            dense_steps = 0
        else:
            state, progress = train("dense", model_state)
            model_state, dense, seconds["dense"] = model_part(state), progress["eval"], progress["seconds"]
            dense_steps = steps

        # 2. Prune and evaluate as is.
        if config.permute or config.recalibrate_bn:
            pruned_state, masks, one_shot, extra = prune_with_options(task, config, model_state)
        else:
            if hasattr(task, "prune_step"):  # the task's own one-shot method (calibration data)
                pruned, masks = task.prune_step(model_state)
            else:
                pruned, masks = prune(config, model_state["params"], task.pruning_rules)
            pruned_state = {**model_state, "params": pruned}
            one_shot = task.evaluate(pruned_state, "one_shot")
            if config.transposable:
                extra["kept_magnitude_fraction"] = {
                    "transposable": kept_magnitude_fraction(model_state["params"], masks),
                    "nm": kept_magnitude_fraction(model_state["params"], prune(
                        config, model_state["params"], task.pruning_rules, transposable=False)[1])}
        log_once("one_shot", one_shot)
        wf.print(f"[prune] {n}:{m}{' transposable' if config.transposable else ''} one-shot "
                 f"{task.describe(one_shot)}")
        if "kept_magnitude_fraction" in extra:
            wf.print("[prune] kept magnitude fraction: " + ", ".join(
                f"{k} {v:.4f}" for k, v in extra["kept_magnitude_fraction"].items()))

        # 3. Retrain with the mask fixed: the same schedule, a fresh optimizer.
        state, progress = train("retrain", pruned_state, masks)
        final_state, masks = model_part(state), state["masks"]
        sparse, seconds["retrain"] = progress["eval"], progress["seconds"]
        exactly_sparse = exactly_masked(final_state["params"], masks)
        wf.print(f"[retrain] weights exactly {n}:{m}: {exactly_sparse}")

    # 4. Dense control: the same extra steps without a mask (SR-STE: the same total steps from
    # the random init, with its data order).
    control = None
    if config.control:
        _, progress = train("control", model_state,
                            seed_phase=None if not srste else (
                                "sr-ste" if "sr-ste" in task.seed_offsets else "dense"))
        control, seconds["control"] = progress["eval"], progress["seconds"]

    evals = {"dense": dense, "one_shot": one_shot, "sparse": sparse, "control": control}
    report = sparse_jax.sparsity_report(final_state["params"], masks, config.sparsity_n,
                                        config.sparsity_m, rules=task.pruning_rules)
    sparse_phase = "sparse" if srste else "retrain"
    final_steps = task.steps if srste else task.phase_steps("retrain")
    phase_steps_run = ({"sr-ste": final_steps} if srste else
                       {"dense": dense_steps, "retrain": final_steps})
    control_steps = task.phase_steps("control") if control else None
    # (the other processes of a multi-host run have no metrics.jsonl: their own records)
    records = log.read() if log.writer else log.written
    plateaus = {phase: last_quarter(records, phase, total, task.record_headline)
                for phase, total in {**phase_steps_run, "control": control_steps}.items() if total}
    results = {
        "model": task.model_name,
        "dataset": task.dataset_name,
        "metric": task.metric,
        **{name: None if result is None else result[task.headline]
           for name, result in evals.items()},
        "steps": {**task.extra_steps, **phase_steps_run,
                  "control": control_steps},
        "num_params": num_params,
        **task.extra_results(evals),
        "exactly_nm_sparse": exactly_sparse,
        "method": config.method,
        "seed": config.seed,
        "transposable": config.transposable,
        "permute": config.permute,
        "recalibrate_bn": config.recalibrate_bn,
        **extra,
        # the held-out headline over each phase's last quarter (converged: change ~ 0)
        "last_quarter": {k: v for k, v in plateaus.items() if v is not None} or None,
        "training_seconds": round(sum(seconds.values()), 1),
        "cpu_seconds": round(_cpu_seconds() - cpu_started, 1),
        "seconds": round(time.time() - started, 1),
        "devices": mesh.size, "platform": mesh.devices.flat[0].platform, "jax": jax.__version__,
    }
    if main_process:
        with open(os.path.join(workdir, "sparsity_report.txt"), "w") as f:
            f.write(str(report) + "\n")
        metrics.plot_curves(log.read(), os.path.join(workdir, "curves.png"),
                            f"{task.model_name} on {task.dataset_name}: " + (
                                f"{n}:{m} SR-STE" if srste else
                                f"dense -> {n}:{m} prune -> retrain"),
                            task.label, task.percent)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        task.write_outputs(final_state, evals)
        if config.export_onnx:
            task.export_onnx(final_state, config.export_onnx)
            wf.print(f"[export] final {config.sparsity_n}:{config.sparsity_m} model -> "
                     f"{config.export_onnx} (check: sparse-jax-inspect {config.export_onnx})")
    else:  # each process's own results, so that one can check they agree
        with open(os.path.join(workdir, f"results_process{jax.process_index()}.json"), "w") as f:
            json.dump(results, f, indent=2)
    wf.print("")
    wf.print(report_summary(report, os.path.join(workdir, "sparsity_report.txt"),
                            task.skip_explanations))
    if "one_shot_variants" in results:
        wf.print("")
        wf.print(one_shot_table(task, results))
    wf.print("")
    wf.print(results_table(task, results))
    wf.print(f"\nwrote {workdir}/results.json, metrics.jsonl, curves.png, sparsity_report.txt, "
             f"checkpoints/ (sparse model: checkpoints/{sparse_phase}/{final_steps})"
             + "".join(f", {name}" for name in task.outputs
                       if os.path.exists(os.path.join(workdir, name))))
    return results


def report_summary(report, table_path: str, explanations: dict[str, str] | None = None) -> str:
    """The sparsity report in a few lines: what was pruned, which kernels stayed dense and why."""
    pruned = [r for r in report.rows if r.pruned]
    dense_kernels = [r for r in report.rows if not r.pruned and len(r.shape) >= 2]
    small = [r for r in report.rows if not r.pruned and len(r.shape) < 2]
    lines = [f"sparsity report: {len(pruned)} kernels pruned to {report.n}:{report.m}, "
             f"{len(dense_kernels)} kernel(s) kept dense, {len(small)} biases/norm parameters dense"]
    for r in dense_kernels:
        why = (explanations or {}).get(r.path)
        lines.append(f"  kept dense: {r.path} {'x'.join(map(str, r.shape))}: "
                     + (f"{why} ({r.reason})" if why else r.reason))
    lines.append("  " + str(report).splitlines()[-1])  # the report's own totals line
    lines.append(f"  per-leaf table: {table_path}")
    return "\n".join(lines)


def results_table(task: Task, results: dict[str, Any]) -> str:
    """Table-2 style rows: dense / one-shot n:m / retrained n:m / dense control."""
    phases = ("dense", "one_shot", "sparse", "control")
    rows = [(task.label, {p: results[p] for p in phases})] + task.table_rows(results)
    sparse = "2:4 SR-STE" if results.get("method") == "sr-ste" else "2:4 retrained"
    lines = [f"| model | dataset | metric | dense | 2:4 one-shot | {sparse} | dense control |",
             "|---|---|---|---|---|---|---|"]
    for label, values in rows:
        lines.append(f"| {results['model']} | {results['dataset']} | {label} | " + " | ".join(
            format_value(values.get(p), task.percent) for p in phases) + " |")
    steps = results["steps"]
    note = task.table_note(results)
    lines.append((note + "; " if note else "") + "steps: " + ", ".join(
        f"{k} {v}" for k, v in steps.items() if v) + f"; {results['seconds']:.0f} s on "
        f"{results['devices']} {results['platform']} device(s)")
    if results.get("last_quarter"):
        lines.append(f"held-out {task.label} over the last quarter of each phase (converged: "
                     "change ~ 0): " + "; ".join(
                         f"{phase} {format_value(q['values'][0], task.percent)} -> "
                         f"{format_value(q['values'][-1], task.percent)} ({len(q['values'])} "
                         f"evaluations, spread {format_value(q['spread'], task.percent)})"
                         for phase, q in results["last_quarter"].items()))
    return "\n".join(lines)


def one_shot_table(task: Task, results: dict[str, Any]) -> str:
    """The one-shot ablation of ``--permute`` / ``--recalibrate-bn``: one row per combination."""
    names = {"magnitude": "magnitude alone", "permutation": "+ channel permutation",
             "bn_recalibration": "+ BN recalibration", "both": "+ both"}
    lines = [f"| one-shot {results['model']} | {task.label} |", "|---|---|"]
    for key, value in results["one_shot_variants"].items():
        lines.append(f"| {names[key]} | {format_value(value, task.percent)} |")
    return "\n".join(lines)
