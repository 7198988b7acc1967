"""metrics.jsonl (one record per logged step) and curves.png (loss and accuracy per phase)."""

from __future__ import annotations

import json
import os
from typing import Any

PHASE_COLORS = {"dense": "tab:blue", "retrain": "tab:red", "control": "tab:gray"}


class MetricsLog:
    """Appends records ``{"phase", "step", "split", "loss", "metric", ...}`` to a JSONL file.

    Only process 0 writes, so that a multi-host run keeps one copy of each record.
    """

    def __init__(self, path: str):
        import jax

        self.path = path
        self.writer = jax.process_index() == 0

    def truncate(self, phase: str, after_step: int, later_phases: tuple[str, ...] = ()) -> None:
        """Drops records a resumed run will log again: ``phase`` beyond ``after_step``, later phases."""
        if not self.writer or not os.path.exists(self.path):
            return
        kept = [r for r in self.read()
                if not ((r["phase"] == phase and r["step"] > after_step) or r["phase"] in later_phases)]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict[str, Any]], path: str, title: str, metric_name: str = "top-1") -> None:
    """Train loss and train/eval accuracy against the step, one colour per phase.

    Retraining and the dense control start where dense training ended, so that the two
    continuations of the dense model overlay each other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense_steps = max((r["step"] for r in records if r["phase"] == "dense"), default=0)
    offsets = {"dense": 0, "retrain": dense_steps, "control": dense_steps}
    fig, (ax_loss, ax_acc, ax_zoom) = plt.subplots(1, 3, figsize=(15, 4))
    for phase, color in PHASE_COLORS.items():
        train = [r for r in records if r["phase"] == phase and r["split"] == "train"]
        evals = [r for r in records if r["phase"] == phase and r["split"] == "eval"]
        label = {"dense": "dense", "retrain": "2:4 sparse retraining",
                 "control": "dense control"}[phase]
        if train:
            steps = [offsets[phase] + r["step"] for r in train]
            ax_loss.plot(steps, [r["loss"] for r in train], color=color, label=label, lw=1)
            ax_acc.plot(steps, [100 * r["metric"] for r in train], color=color, lw=0.8, alpha=0.35)
        if evals:
            for ax in (ax_acc, ax_zoom):
                ax.plot([offsets[phase] + r["step"] for r in evals],
                        [100 * r["metric"] for r in evals], "o-", color=color, ms=3,
                        label=f"{label} (held-out)")
            final = 100 * evals[-1]["metric"]
            ax_zoom.axhline(final, color=color, lw=0.8, ls="--")
            ax_zoom.annotate(f"{final:.2f}", (offsets[phase] + evals[-1]["step"], final),
                             color=color, fontsize=8, xytext=(4, 2), textcoords="offset points")
    one_shot = [r for r in records if r["phase"] == "one_shot"]
    if one_shot:
        ax_acc.plot([dense_steps], [100 * one_shot[-1]["metric"]], "x", color="black", ms=8,
                    mew=2, label="one-shot 2:4 (no retraining)")
    if dense_steps:
        for ax in (ax_loss, ax_acc, ax_zoom):
            ax.axvline(dense_steps, color="black", lw=0.6, ls=":")
    ax_loss.set(xlabel="step", ylabel="train loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="step", ylabel=f"{metric_name} accuracy (%)",
               title="accuracy (line: train batches, dots: held-out)")
    ax_acc.set_ylim(0.0, 100.5)
    # Zoom on the second half of each phase, where the final accuracies are compared.
    late = [100 * r["metric"] for r in records if r["split"] == "eval" and r["phase"] in offsets
            and r["step"] >= 0.5 * max(x["step"] for x in records if x["phase"] == r["phase"])]
    if late:
        ax_zoom.set_ylim(min(late) - 1.0, min(100.2, max(late) + 1.0))
    ax_zoom.set(xlabel="step", ylabel=f"held-out {metric_name} (%)",
                title="held-out accuracy, zoomed (dashed: final)")
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8, loc="center right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
