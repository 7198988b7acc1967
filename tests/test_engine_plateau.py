"""--preset converged and the engine's plateau evaluations (recipes/engine/workflow.py, cli.py)."""

import json

import numpy as np
import pytest

from recipes.engine import cli, workflow


def test_plateau_steps_cover_the_second_half_evenly():
    assert workflow.plateau_steps(8, 4) == {4, 5, 6, 7, 8}
    assert workflow.plateau_steps(1000, 4) == {500, 625, 750, 875, 1000}
    assert workflow.plateau_steps(1000, 0) == set()
    for total in (1, 2, 3, 7, 101):  # every step inside the phase's second half
        steps = workflow.plateau_steps(total, 3)
        assert steps and all(total / 2 - 0.5 <= s <= total and s >= 1 for s in steps)
        assert max(steps) == total


def test_last_quarter_by_hand():
    records = [
        {"phase": "dense", "step": 100, "split": "train", "metric": 0.1},  # train: ignored
        {"phase": "dense", "step": 50, "split": "eval", "metric": 0.50},  # before 3/4: ignored
        {"phase": "dense", "step": 75, "split": "eval", "metric": 0.80},
        {"phase": "dense", "step": 90, "split": "valid", "metric": 0.90},
        {"phase": "dense", "step": 95, "split": "valid", "metric": None},  # loss only: ignored
        {"phase": "dense", "step": 100, "split": "eval", "metric": 0.85},
        {"phase": "retrain", "step": 100, "split": "eval", "metric": 0.2},
        {"phase": "one_shot", "step": 0, "split": "eval", "metric": 0.3},
    ]
    quarter = workflow.last_quarter(records, "dense", 100)
    assert quarter["steps"] == [75, 90, 100]
    assert quarter["values"] == [0.80, 0.90, 0.85]
    assert quarter["change"] == pytest.approx(0.05)
    assert quarter["spread"] == pytest.approx(0.10)
    in_percent = workflow.last_quarter(records, "dense", 100, lambda r: 100 * r["metric"])
    assert in_percent["values"] == pytest.approx([80.0, 90.0, 85.0])
    assert in_percent["change"] == pytest.approx(5.0)
    assert workflow.last_quarter(records, "retrain", 100) is None  # one evaluation only
    assert workflow.last_quarter(records, "control", 100) is None


class CountingTask:
    """Evaluates to the step it was asked at; its own schedule evaluates every 4th step."""

    headline = "top1"

    def __init__(self):
        self.evaluated, self.seen = [], []

    def evaluate(self, state, phase):
        self.evaluated.append(state["step"])
        if state.get("seen"):
            self.seen.append(state["step"])
        return {"top1": state["step"] / 100}

    def eval_record(self, result):
        return {"split": "eval", "loss": None, "metric": result["top1"]}

    def eval_during(self, state, phase, step):
        if step % 4:
            return None, None
        return self.eval_record(self.evaluate(state, phase)), None


def test_plateau_evaluations_only_where_the_task_gives_no_headline():
    task = CountingTask()
    during = workflow.with_plateau_evals(task, task.eval_during, 10, 4,
                                         evaluated=lambda state: {**state, "seen": True})
    records = {}
    for step in range(1, 11):
        record, _ = during({"step": step}, "dense", step)
        if record is not None:
            records[step] = record["metric"]
    # The task's own steps 4 and 8, and the plateau steps {5, 6, 8, 9, 10} (8 only once).
    assert sorted(records) == [4, 5, 6, 8, 9, 10]
    assert task.evaluated == [4, 5, 6, 8, 9, 10]
    assert records[9] == pytest.approx(0.09)
    assert task.seen == [5, 6, 9, 10]  # the plateau evaluations saw evaluated(state)
    assert workflow.with_plateau_evals(task, task.eval_during, 10, 0) == task.eval_during


def test_preset_on_the_command_line():
    from recipes.vision import classification_task as vision

    task = vision.ClassificationTask
    default = cli.config_from_args(task, cli.build_parser(task, "", "").parse_args([]), "resnet50")
    args = cli.build_parser(task, "", "").parse_args(["--preset", "converged"])
    config = cli.config_from_args(task, args, "resnet50")
    assert config.num_epochs == 2 * default.num_epochs
    assert config.lr_step_epochs == 2 * default.lr_step_epochs
    assert config.control and config.plateau_evals == 4 and default.plateau_evals == 0
    resnext = cli.config_from_args(task, args, "resnext101_32x8d")
    assert resnext.control
    full = cli.build_parser(task, "", "").parse_args(["--preset", "converged", "--data-dir", "x"])
    with pytest.raises(SystemExit, match="built-in data only.*--data-dir"):
        cli.config_from_args(task, full, "resnet50")


def test_every_built_in_default_runs_the_dense_control():
    """Every table that reports "retrained" sets it beside a dense model trained as long."""
    from recipes.detection import maskrcnn_task, ssd_task
    from recipes.text import qa_task, translation_task
    from recipes.vision import classification_task as vision

    for model in ("resnet50", "resnext101_32x8d", "xception"):
        args = cli.build_parser(vision.ClassificationTask, "", "").parse_args([])
        assert cli.config_from_args(vision.ClassificationTask, args, model).control, model
    for module in (translation_task, qa_task, ssd_task, maskrcnn_task):
        assert module.builtin_config().control, module.__name__


@pytest.mark.parametrize("task_name", ["maskrcnn_task", "ssd_task"])
def test_detection_preset_ends_on_its_final_lr(task_name):
    """The last lr step lies before the last quarter, so that a flat held-out metric there means
    the phase converged at its final lr rather than a step yet to come."""
    import importlib

    module = importlib.import_module(f"recipes.detection.{task_name}")
    config = module.converged_config(module.builtin_config())
    if task_name == "ssd_task":  # SSD's phase length comes from its epochs and the data set
        total = workflow.phase_steps(config, config.builtin_train_images)
        final_lr = config.learning_rate * config.lr_decay ** len(config.lr_milestones)
    else:
        total = config.num_train_steps
        final_lr = config.learning_rate * 0.01
    schedule = module.learning_rate_schedule(config, total)
    lrs = [float(schedule(step)) for step in range(int(0.75 * total), total)]
    np.testing.assert_allclose(lrs, final_lr, rtol=1e-6)


def test_translation_cooldown_by_hand():
    from recipes.text import translation_task

    config = translation_task.TranslationConfig(learning_rate=3e-3, warmup_steps=100,
                                                num_train_steps=1500, cooldown_fraction=0.4)
    schedule = translation_task.inverse_sqrt_schedule(config)
    fairseq = translation_task.inverse_sqrt_schedule(config.replace(cooldown_fraction=0.0))
    for count in (0, 50, 400, 899):  # before the cooldown: fairseq's lr
        assert float(schedule(count)) == float(fairseq(count))
    # Count 1200 is halfway through the 600-step cooldown: half of 3e-3 * sqrt(100 / 1201).
    np.testing.assert_allclose(float(schedule(1200)), 0.5 * 3e-3 * np.sqrt(100 / 1201), rtol=1e-6)
    np.testing.assert_allclose(float(schedule(1499)), 3e-3 * np.sqrt(100 / 1500) / 600, rtol=1e-5)
    assert float(schedule(1500)) == 0.0
    with pytest.raises(ValueError, match="cooldown_fraction 1.5"):
        translation_task.inverse_sqrt_schedule(config.replace(cooldown_fraction=1.5))
    with pytest.raises(ValueError, match="cooldown_floor 1.0"):
        translation_task.inverse_sqrt_schedule(config.replace(cooldown_floor=1.0))


def _fairseq_lr(peak: float, warmup: int, count: int) -> float:
    """fairseq's inverse_sqrt after its warm-up, by hand: ``peak * sqrt(warmup / update)`` with
    update = count + 1."""
    return peak * np.sqrt(warmup / (count + 1))


def test_translation_cooldown_ending_early_holds_its_floor():
    """A cooldown over steps 600 .. 1200 of 1600 down to a floor of 0.1, by hand: fairseq's lr
    until 600, 0.55 of it at 900, 0.1 of it from 1200 to the end."""
    from recipes.text import translation_task

    config = translation_task.TranslationConfig(
        learning_rate=2e-3, warmup_steps=400, num_train_steps=1600, cooldown_fraction=0.375,
        cooldown_end=0.75, cooldown_floor=0.1)
    schedule = translation_task.inverse_sqrt_schedule(config)
    for count, scale in ((399, 1.0), (600, 1.0), (900, 0.55), (1200, 0.1), (1400, 0.1),
                         (1599, 0.1)):
        np.testing.assert_allclose(float(schedule(count)),
                                   scale * _fairseq_lr(2e-3, 400, count), rtol=1e-5)


def test_translation_preset_ends_on_its_final_lr():
    """Like the detection presets: the lr over the last quarter is the final floor times
    fairseq's lr, so that a flat BLEU there is not a cooldown still under way."""
    from recipes.text import translation_task

    config = translation_task.converged_config(translation_task.builtin_config())
    total = config.num_train_steps
    schedule = translation_task.inverse_sqrt_schedule(config)
    for count in range(int(0.75 * total), total, 25):
        fairseq = _fairseq_lr(config.learning_rate, config.warmup_steps, count)
        np.testing.assert_allclose(float(schedule(count)), config.cooldown_floor * fairseq,
                                   rtol=1e-5)
    assert config.cooldown_floor <= 0.1


def test_a_task_without_the_preset_says_so():
    from recipes.text import gpt_task

    task = gpt_task.GPTTask
    args = cli.build_parser(task, "", "").parse_args(["--preset", "converged"])
    with pytest.raises(SystemExit, match="has none"):
        cli.config_from_args(task, args, "gpt")


@pytest.mark.slow
def test_preset_smoke_reports_the_last_quarter(tmp_path):
    from recipes.vision import classification_task

    results = classification_task.main(
        "resnet50", "test", "", ["--preset", "converged", "--smoke", "--no-progress",
                                 "--workdir", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    total = results["steps"]["dense"]
    held_out = {r["step"]: r["metric"] for r in records
                if r["phase"] == "dense" and r["split"] != "train" and r["step"] > 0}
    assert workflow.plateau_steps(total, 4) <= set(held_out)
    quarter = results["last_quarter"]["dense"]
    expected = [held_out[s] for s in sorted(held_out) if s >= 0.75 * total]
    assert quarter["values"] == pytest.approx(expected)
    assert quarter["spread"] == pytest.approx(max(expected) - min(expected))
    assert set(results["last_quarter"]) == {"dense", "retrain", "control"}


def test_the_logged_headline_reads_back_in_results_units():
    from recipes.text import qa_task
    from recipes.vision import classification_task

    qa = qa_task.QuestionAnsweringTask.__new__(qa_task.QuestionAnsweringTask)
    result = {"f1": 91.25, "exact_match": 90.0}  # percentages, as results.json has them
    assert qa.record_headline(qa.eval_record(result)) == pytest.approx(91.25)
    image = classification_task.ClassificationTask.__new__(classification_task.ClassificationTask)
    result = {"top1": 0.975, "top5": 1.0, "loss": 0.1}  # fractions
    assert image.record_headline(image.eval_record(result)) == pytest.approx(0.975)
