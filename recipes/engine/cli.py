"""The command line every recipe shares; a task adds its own options as a table.

A task class gives ``options``: ``(flag, config field, type, help)`` rows (``type`` None: a
string; a tuple: the choices), ``control_help``, ``configs(args, model) -> config`` (the full recipe
or the built-in default), ``smoke_config(config)`` and ``dataset_of(args)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
import typing


STEPS = ("--steps", "num_train_steps", int, "steps of each phase (overrides --epochs)")


def batch_size_option(full: str) -> tuple:
    return ("--batch-size", "batch_size", int, f"global batch, split over all devices (full "
            f"recipe: {full}; the learning rate scales with it)")


def epochs_option(full: str) -> tuple:
    return ("--epochs", "num_epochs", float, f"epochs of each phase (full recipe: {full})")


def workers_option(full: str = "8") -> tuple:
    return ("--workers", "num_workers", int, f"grain worker processes (full recipe: {full})")


def export_option(what: str) -> tuple:
    return ("--export-onnx", "export_onnx", None, f"also export {what} to ONNX for TensorRT; "
            "needs the export extra (see README); check it with sparse-jax-inspect PATH")


COCO_DATA_DIR = ("--data-dir", "data_dir", None, "COCO 2017 directory (train2017/, val2017/, "
                 "annotations/instances_{train,val}2017.json); selects the full recipe. Without "
                 "it: the built-in digits set")


def parse_field_value(config_type: type, name: str, text: str):
    """``text`` from ``--set name=text`` as the type of ``config_type``'s field ``name``."""
    kind = typing.get_type_hints(config_type)[name]
    if text.lower() in ("none", "null"):
        return None
    if kind in (bool, bool | None):
        if text.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"{name}: expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if kind in (int, int | None):
        return int(text)
    if kind in (float, float | None):
        return float(text)
    if "tuple" in str(kind):
        return tuple(int(v) for v in text.split(",") if v)
    return text


def apply_command_line(config, overrides: dict, args: argparse.Namespace):
    """``config`` with the given ``overrides`` (None: not given), then ``--distributed`` (and
    its coordinator options), ``--no-progress`` and every ``--set FIELD=VALUE`` applied."""
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    distributed = {"coordinator_address": args.coordinator_address,
                   "num_processes": args.num_processes, "process_id": args.process_id}
    if args.distributed or any(v is not None for v in distributed.values()):
        config = config.replace(distributed=True,
                                **{k: v for k, v in distributed.items() if v is not None})
    if args.no_progress:
        config = config.replace(progress_bar=False)
    names = {f.name for f in dataclasses.fields(config)}
    for assignment in args.set:
        name, _, text = assignment.partition("=")
        if name not in names:
            raise SystemExit(f"--set {assignment}: unknown config field {name!r}")
        config = config.replace(**{name: parse_field_value(type(config), name, text)})
    return config


def add_run_arguments(parser: argparse.ArgumentParser, config_name: str, set_example: str,
                      control_help: str) -> None:
    """The options every recipe shares."""
    parser.add_argument("--devices", type=int, help="use the first N local devices (default all)")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                        help="also train the dense model for the retraining steps (the fair "
                        f"comparison; {control_help})")
    parser.add_argument("--method", choices=("prune-retrain", "sr-ste"),
                        help="prune-retrain (default): dense, one-shot 2:4 prune, masked "
                        "retraining; sr-ste: one phase of as many steps from the random init, "
                        "trained 2:4 with SR-STE (sparse_jax.srste)")
    parser.add_argument("--transposable", action="store_true", default=None,
                        help="transposable 2:4 masks (2:4 along both axes of every 4x4 block, "
                        "so dY @ W^T can be sparse too)")
    parser.add_argument("--permute", action="store_true", default=None,
                        help="prune step: channel permutations that keep more magnitude first "
                        "(the same dense function); adds the one-shot ablation to the outputs")
    parser.add_argument("--recalibrate-bn", action="store_true", default=None,
                        help="prune step: re-estimate the batch-norm statistics of the pruned "
                        "model on a few hundred training images (--set recalibrate_examples=)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --workdir "
                        "from its last checkpoints (same result as an uninterrupted run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again even if --workdir holds an unfinished run")
    parser.add_argument("--distributed", action="store_true", help="several processes: call "
                        "jax.distributed.initialize() first (the cluster is auto-detected "
                        "unless the next three options or JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES and JAX_PROCESS_ID give it)")
    parser.add_argument("--coordinator-address", metavar="HOST:PORT",
                        help="process 0's address (implies --distributed)")
    parser.add_argument("--num-processes", type=int, help="number of processes (all hosts)")
    parser.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps: runs every "
                        "code path (all phases, checkpoints, plot) in well under a minute")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--preset", choices=("converged",),
                        help="converged: the built-in run trained until the dense phase's "
                        "held-out metric is flat, retraining and control on the same schedule "
                        "(longer: see the recipe's README table); results.json 'last_quarter'")
    parser.add_argument("--seeds", type=int, default=1, metavar="K",
                        help="run the whole workflow K times (seeds seed .. seed+K-1, each in "
                        "WORKDIR/seed<s>) and report the mean and spread (WORKDIR/seeds.json)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"override any config field, e.g. {set_example} (see {config_name})")


def build_parser(task_class, description: str, epilog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="output directory (default runs/<model>_<dataset>)")
    for flag, _, kind, text in task_class.options:
        extra = ({"choices": kind} if isinstance(kind, tuple) else
                 {"action": "store_true", "default": None} if kind is bool else
                 {"type": kind} if kind else {})
        parser.add_argument(flag, help=text, **({"metavar": "PATH"} if flag == "--export-onnx"
                                                else {}), **extra)
    add_run_arguments(parser, task_class.config_name, task_class.set_example,
                      task_class.control_help)
    return parser


def config_from_args(task_class, args: argparse.Namespace, model: str):
    config = task_class.configs(args, model).replace(model=model)
    if args.preset:
        full_scale = [flag for flag in ("--data-dir", "--train-file", "--predict-file")
                      if getattr(args, flag[2:].replace("-", "_"), None)]
        preset = None if full_scale else task_class.converged_config(config)
        if preset is None:
            raise SystemExit(f"--preset {args.preset}: {model} has it for the built-in data only"
                             + (f" (drop {', '.join(full_scale)})" if full_scale else
                                " and this task has none"))
        config = preset
    if args.smoke:
        config = task_class.smoke_config(config)
    overrides = {field: getattr(args, flag.lstrip("-").replace("-", "_"))
                 for flag, field, _, _ in task_class.options if field}
    overrides.update(devices=args.devices, control=args.control, method=args.method,
                     transposable=args.transposable, permute=args.permute,
                     recalibrate_bn=args.recalibrate_bn)
    return apply_command_line(config, overrides, args)


def main(task_class, model: str, description: str, epilog: str,
         argv: list[str] | None = None) -> dict:
    """Parses the command line, runs the workflow in ``--workdir`` (default
    ``runs/<model>_<dataset>[_smoke]``) and prints the wall time."""
    args = build_parser(task_class, description, epilog).parse_args(argv)
    config = config_from_args(task_class, args, model)
    from recipes.engine import workflow

    suffixes = [name for name in (args.preset, "smoke" if args.smoke else None) if name]
    workdir = args.workdir or os.path.join(
        "runs", "_".join([f"{model}_{task_class.dataset_of(args)}", *suffixes]))
    started = time.time()
    if args.seeds != 1:
        from recipes.engine import seeds

        summary = seeds.run_seeds(functools.partial(workflow.train_and_evaluate, task_class),
                                  config, workdir, args.seeds, task_class.percent,
                                  resume=args.resume, overwrite=args.overwrite)
        print(f"total wall time {time.time() - started:.0f} s")
        return summary
    results = workflow.train_and_evaluate(task_class, config, workdir, resume=args.resume,
                                          overwrite=args.overwrite)
    print(f"total wall time {time.time() - started:.0f} s, CPU time {results['cpu_seconds']:.0f} s")
    return results
