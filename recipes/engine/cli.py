"""The command line every recipe script shares (the scripts only name their model)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import typing

from recipes.vision import configs, model_configs


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
    """A recipe config (a dataclass with ``replace``) with the given ``overrides`` (None: not
    given), then ``--distributed``, ``--no-progress`` and every ``--set FIELD=VALUE`` applied."""
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    if args.distributed:
        config = config.replace(distributed=True)
    if args.no_progress:
        config = config.replace(progress_bar=False)
    names = {f.name for f in dataclasses.fields(config)}
    for assignment in args.set:
        name, _, text = assignment.partition("=")
        if name not in names:
            raise SystemExit(f"--set {assignment}: unknown config field {name!r}")
        config = config.replace(**{name: parse_field_value(type(config), name, text)})
    return config


def add_run_arguments(parser: argparse.ArgumentParser, config_file: str, set_example: str) -> None:
    """The options every recipe shares: --resume, --overwrite, --distributed, --smoke,
    --no-progress and --set FIELD=VALUE (``set_example``: a sample, ``config_file``: where the
    fields are)."""
    parser.add_argument("--resume", action="store_true", help="continue the run in --workdir "
                        "from its last checkpoints (same result as an uninterrupted run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again even if --workdir holds an unfinished run")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host: call jax.distributed.initialize() first")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps: runs every "
                        "code path (all phases, checkpoints, plot) in well under a minute")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"override any config field, e.g. {set_example} (see {config_file})")


def add_device_arguments(parser: argparse.ArgumentParser, *, control_default: str,
                         exported: str | None, workers_note: str | None = "full recipe: 8") -> None:
    """--devices, --workers (unless ``workers_note`` is None: no grain pipeline), --control and
    (when ``exported`` says what is written) --export-onnx, with the recipe's own words:
    ``control_default`` says when the control phase is on."""
    parser.add_argument("--devices", type=int, help="use the first N local devices (default all)")
    if workers_note is not None:
        parser.add_argument("--workers", type=int, help=f"grain worker processes ({workers_note})")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                        help="also train the dense model for the retraining steps (the fair "
                        f"comparison; {control_default})")
    if exported is not None:
        parser.add_argument("--export-onnx", metavar="PATH", help=f"also export {exported} to "
                            "ONNX for TensorRT; needs the export extra (see README); check it "
                            "with sparse-jax-inspect PATH")


def build_parser(description: str, epilog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="ImageNet-style folder with train/<class>/*.JPEG and "
                        "val/<class>/*.JPEG; selects the full recipe. Without it: built-in MNIST")
    parser.add_argument("--workdir", help="output directory (default runs/<model>_<dataset>)")
    parser.add_argument("--init-from", help="dense weights instead of dense training: an orbax "
                        "checkpoint (a run directory or checkpoint step) or torchvision weights "
                        "as .safetensors with torchvision key names")
    parser.add_argument("--batch-size", type=int, help="global batch, split over all devices "
                        "(full recipe: 256; the learning rate scales with it)")
    parser.add_argument("--epochs", type=float, help="epochs of each phase (dense and retrain; "
                        "full recipe: 90, lr steps every third of it unless --set lr_step_epochs=)")
    parser.add_argument("--steps", type=int, help="steps of each phase (overrides --epochs)")
    parser.add_argument("--lr", type=float, help="learning rate per 256 images (default 0.1)")
    add_device_arguments(parser, control_default="on by default for built-in data, off for "
                         "ImageNet", exported="the final 2:4 model (eval mode, float32 NHWC input)")
    add_run_arguments(parser, "recipes/vision/configs.py",
                      "--set weight_decay=5e-5 --set compute_dtype=float32")
    return parser


def config_from_args(args: argparse.Namespace, model: str) -> configs.Config:
    config = model_configs.base_config(model, imagenet=bool(args.data_dir))
    config = config.replace(model=model, data_dir=args.data_dir)
    if args.data_dir is not None:
        config = config.replace(control=False)
    if args.smoke:
        config = model_configs.smoke_config(config)
    overrides = {"init_from": args.init_from, "batch_size": args.batch_size,
                 "num_epochs": args.epochs, "num_train_steps": args.steps,
                 "learning_rate_per_256": args.lr, "devices": args.devices,
                 "num_workers": args.workers, "control": args.control,
                 "export_onnx": args.export_onnx}
    return apply_command_line(config, overrides, args)


def run(train_and_evaluate, config, args: argparse.Namespace, model: str, dataset: str) -> dict:
    """Runs a recipe's ``train_and_evaluate`` in ``--workdir`` (default
    ``runs/<model>_<dataset>[_smoke]``) with ``--resume``/``--overwrite``; prints the wall time."""
    workdir = args.workdir or os.path.join("runs", f"{model}_{dataset}{'_smoke' if args.smoke else ''}")
    started = time.time()
    results = train_and_evaluate(config, workdir, resume=args.resume, overwrite=args.overwrite)
    print(f"total wall time {time.time() - started:.0f} s")
    return results


def main(model: str, description: str, epilog: str, argv: list[str] | None = None) -> dict:
    args = build_parser(description, epilog).parse_args(argv)
    config = config_from_args(args, model)
    # Imported late so that --help answers without loading jax.
    from recipes.vision import train

    return run(train.train_and_evaluate, config, args, model,
               "imagenet" if args.data_dir else "mnist_5k")
