"""metrics.jsonl (one record per logged step) and curves.png (loss and accuracy per phase)."""

from __future__ import annotations

import json
import os
from typing import Any

PHASE_COLORS = {"dense": "tab:blue", "retrain": "tab:red", "sr-ste": "tab:orange",
                "control": "tab:gray"}


class MetricsLog:
    """Appends records ``{"phase", "step", "split", "loss", "metric", ...}`` to a JSONL file.

    Only process 0 writes, so that a multi-host run keeps one copy of each record.
    """

    def __init__(self, path: str):
        import jax

        self.path = path
        self.writer = jax.process_index() == 0
        self.written: list[dict[str, Any]] = []  # this process's records of this session

    def truncate(self, phase: str, after_step: int, later_phases: tuple[str, ...] = ()) -> None:
        """Drops records a resumed run will log again: ``phase`` beyond ``after_step``, later phases."""
        if not self.writer or not os.path.exists(self.path):
            return
        kept = [r for r in self.read()
                if not ((r["phase"] == phase and r["step"] > after_step) or r["phase"] in later_phases)]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        self.written.append(record)
        if not self.writer:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict[str, Any]], path: str, title: str, label: str = "top-1",
                percent: bool = True) -> None:
    """Train (and held-out) loss and the headline metric against the step, one colour per phase.

    Retraining and the dense control start where dense training ended, so that the two
    continuations of the dense model overlay each other; the one-shot model is a cross.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100.0 if percent else 1.0
    dense_steps = max((r["step"] for r in records if r["phase"] == "dense"), default=0)
    offsets = {"dense": 0, "retrain": dense_steps, "sr-ste": 0, "control": dense_steps}
    names = {"dense": "dense", "retrain": "2:4 sparse retraining", "sr-ste": "2:4 SR-STE",
             "control": "dense control"}
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for phase, color in PHASE_COLORS.items():
        train = [r for r in records if r["phase"] == phase and r["split"] == "train"]
        held_out = [r for r in records if r["phase"] == phase and r["split"] != "train"]
        if train:
            steps = [offsets[phase] + r["step"] for r in train]
            ax_loss.plot(steps, [r["loss"] for r in train], color=color, lw=1, label=names[phase])
            if train[0].get("metric") is not None:
                ax_metric.plot(steps, [scale * r["metric"] for r in train], color=color, lw=0.8,
                               alpha=0.35)
        with_loss = [r for r in held_out if r.get("loss") is not None]
        if with_loss:
            ax_loss.plot([offsets[phase] + r["step"] for r in with_loss],
                         [r["loss"] for r in with_loss], "o--", color=color, ms=3, lw=0.8,
                         label=f"{names[phase]} (held-out)")
        scored = [r for r in held_out if r.get("metric") is not None]
        if scored:
            x = [offsets[phase] + r["step"] for r in scored]
            ax_metric.plot(x, [scale * r["metric"] for r in scored], "o-", color=color, ms=3,
                           label=f"{names[phase]} (held-out)")
            ax_metric.annotate(f"{scale * scored[-1]['metric']:.2f}", (x[-1], scale * scored[-1][
                "metric"]), color=color, fontsize=8, xytext=(4, 2), textcoords="offset points")
    one_shot = [r for r in records if r["phase"] == "one_shot" and r.get("metric") is not None]
    if one_shot:
        ax_metric.plot([dense_steps], [scale * one_shot[-1]["metric"]], "x", color="black", ms=8,
                       mew=2, label="one-shot 2:4 (no retraining)")
    for ax in (ax_loss, ax_metric):
        if dense_steps:
            ax.axvline(dense_steps, color="black", lw=0.6, ls=":")
        ax.legend(fontsize=8)
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    ax_metric.set(xlabel="step", ylabel=label + (" (%)" if percent else ""),
                  title=f"{label} (line: train batches, dots: held-out)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
