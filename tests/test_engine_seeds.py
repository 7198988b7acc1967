"""--seeds K: per-seed runs and their mean / spread (recipes/engine/seeds.py)."""

import dataclasses
import json
import os

import numpy as np
import pytest

from recipes.engine import seeds


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    seed: int = 3

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def fake_results(dense, one_shot, sparse, control):
    return {"model": "m", "dataset": "d", "metric": "top1", "dense": dense,
            "one_shot": one_shot, "sparse": sparse, "control": control}


RUNS = [fake_results(0.9, 0.1, 0.91, 0.93), fake_results(0.8, 0.2, 0.85, 0.84),
        fake_results(0.7, 0.3, 0.72, 0.75)]


def test_summary_equals_numpy():
    summary = seeds.summarize(RUNS)
    for name, column in (("dense", [0.9, 0.8, 0.7]), ("sparse", [0.91, 0.85, 0.72]),
                         ("sparse_minus_control", [0.91 - 0.93, 0.85 - 0.84, 0.72 - 0.75])):
        values = np.array(column, np.float64)
        assert summary[name]["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert summary[name]["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        assert summary[name]["min"] == pytest.approx(values.min())
        assert summary[name]["max"] == pytest.approx(values.max())
        assert summary[name]["runs"] == 3


def test_missing_control_gives_no_difference_and_one_run_no_spread():
    runs = [fake_results(0.5, 0.1, 0.6, None)]
    summary = seeds.summarize(runs)
    assert summary["control"] is None and summary["sparse_minus_control"] is None
    assert summary["sparse"]["std"] == 0.0
    table = seeds.seeds_table([0], runs, percent=True)
    assert "| 0 | 50.00 | 10.00 | 60.00 | - | - |" in table


def test_run_seeds_runs_each_seed_in_its_own_workdir(tmp_path, capsys):
    calls = []

    def run(config, workdir, **kwargs):
        calls.append((config.seed, workdir, kwargs))
        return RUNS[len(calls) - 1]

    summary = seeds.run_seeds(run, FakeConfig(), str(tmp_path), 3, True, resume=True)
    assert [c[0] for c in calls] == [3, 4, 5]
    assert [c[1] for c in calls] == [os.path.join(str(tmp_path), f"seed{s}") for s in (3, 4, 5)]
    assert all(c[2] == {"resume": True} for c in calls)
    written = json.loads((tmp_path / "seeds.json").read_text())
    assert written["seeds"] == [3, 4, 5] and written["summary"] == summary["summary"]
    printed = capsys.readouterr().out
    assert "| 4 | 80.00 | 20.00 | 85.00 | 84.00 | 1.00 |" in printed
    assert "| spread (max - min) | 20.00 |" in printed


def test_zero_seeds_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--seeds 0"):
        seeds.run_seeds(lambda *a, **k: {}, FakeConfig(), str(tmp_path), 0, True)


@pytest.mark.slow
def test_seeds_option_on_a_recipe_smoke(tmp_path):
    from recipes.vision import classification_task

    summary = classification_task.main(
        "resnet50", "test", "", ["--smoke", "--seeds", "2", "--workdir", str(tmp_path),
                                 "--no-progress"])
    results = [json.loads((tmp_path / f"seed{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [json.loads((tmp_path / f"seed{s}" / "config.json").read_text())["seed"]
            for s in (0, 1)] == [0, 1]
    assert summary["summary"]["dense"]["mean"] == pytest.approx(
        np.mean([r["dense"] for r in results]))
    assert (tmp_path / "seeds.json").exists()
