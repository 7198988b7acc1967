"""``--seeds K``: one recipe run per seed, then the mean and spread of every headline number.

A single run cannot tell a real accuracy loss from seed noise; ``run_seeds`` repeats the whole
workflow with seeds ``seed, seed + 1, ..., seed + K - 1`` (each in ``workdir/seed<s>``, each
resumable on its own) and writes ``workdir/seeds.json`` with the per-seed values and, for dense,
one-shot, retrained, control and (retrained - control), the mean, the sample standard deviation,
the minimum and the maximum.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from typing import Any

COLUMNS = ("dense", "one_shot", "sparse", "control", "sparse_minus_control")
HEADERS = ("dense", "2:4 one-shot", "2:4 retrained", "dense control", "2:4 - control")


def per_seed_values(results: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of one run's results.json, with (retrained - control)."""
    values = {name: results.get(name) for name in COLUMNS[:-1]}
    both = values["sparse"] is not None and values["control"] is not None
    values["sparse_minus_control"] = values["sparse"] - values["control"] if both else None
    return values


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float] | None]:
    """Mean, sample std (0 for one run), min and max of each column over the runs that have it
    (None where no run has it)."""
    summary: dict[str, dict[str, float] | None] = {}
    for name in COLUMNS:
        values = [v[name] for v in map(per_seed_values, runs) if v[name] is not None]
        summary[name] = None if not values else {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "runs": len(values)}
    return summary


def seeds_table(seeds: list[int], runs: list[dict[str, Any]], percent: bool) -> str:
    """Markdown: one row per seed, then mean +- std and the spread (max - min)."""
    scale = 100.0 if percent else 1.0

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{scale * value:.2f}"

    lines = ["| seed | " + " | ".join(HEADERS) + " |", "|---" * (len(HEADERS) + 1) + "|"]
    for seed, results in zip(seeds, runs):
        values = per_seed_values(results)
        lines.append(f"| {seed} | " + " | ".join(cell(values[c]) for c in COLUMNS) + " |")
    summary = summarize(runs)
    lines.append("| mean +- std | " + " | ".join(
        "-" if s is None else f"{cell(s['mean'])} +- {cell(s['std'])}"
        for s in map(summary.get, COLUMNS)) + " |")
    lines.append("| spread (max - min) | " + " | ".join(
        "-" if s is None else cell(s["max"] - s["min"]) for s in map(summary.get, COLUMNS)) + " |")
    return "\n".join(lines)


def run_seeds(run: Callable[..., dict[str, Any]], config, workdir: str, num_seeds: int,
              percent: bool, **kwargs: Any) -> dict[str, Any]:
    """``run(config with seed s, workdir/seed<s>, **kwargs)`` for ``num_seeds`` seeds; writes and
    returns the summary (``seeds.json``) and prints the table."""
    if num_seeds < 1:
        raise ValueError(f"--seeds {num_seeds}: expected at least 1")
    seeds = [config.seed + k for k in range(num_seeds)]
    runs = [run(config.replace(seed=s), os.path.join(workdir, f"seed{s}"), **kwargs) for s in seeds]
    summary = {"seeds": seeds, "per_seed": [per_seed_values(r) for r in runs],
               "summary": summarize(runs), "metric": runs[0].get("metric"),
               "model": runs[0].get("model"), "dataset": runs[0].get("dataset")}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "seeds.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{summary['model']} on {summary['dataset']}, {summary['metric']}, "
          f"{num_seeds} seeds:\n" + seeds_table(seeds, runs, percent))
    print(f"wrote {workdir}/seeds.json")
    return summary
