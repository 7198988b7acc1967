"""Orbax checkpoints of the three training phases, one ``CheckpointManager`` per phase.

``<workdir>/checkpoints/<phase>/<step>/`` holds the items ``params``, ``batch_stats``,
``opt_state``, ``masks`` (retraining only) and ``progress`` (JSON: the phase step, the
data-iterator state, evaluations so far and elapsed seconds). Keeping the phases apart means the
dense weights survive the retraining (the control run starts from them) and that
``--init-from <workdir>`` can pick the dense model of any finished run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class PhaseCheckpoints:
    """Saves and restores one phase's training state and progress."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                 create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], progress: dict[str, Any]) -> None:
        """Saves ``state`` (a dict of params, batch_stats, opt_state and optionally masks) and the JSON ``progress``."""
        items = {name: ocp.args.StandardSave(value) for name, value in state.items()
                 if value is not None}
        items["progress"] = ocp.args.JsonSave(progress)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores the items present in ``like`` (same structures, shapes and dtypes)."""
        items = {name: ocp.args.StandardRestore(_abstract(value)) for name, value in like.items()
                 if value is not None}
        items["progress"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = {name: restored[name] if value is not None else None for name, value in like.items()}
        return state, restored["progress"]

    def progress(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(
            progress=ocp.args.JsonRestore()))["progress"]

    def close(self) -> None:
        self.manager.close()


def open_phase(wf: Any, phase: str, phases: Sequence[str], state: dict[str, Any],
               progress: dict[str, Any], total_steps: int, resume: bool, *,
               data_iterator: Any = None, final_key: str | None = "eval",
               ) -> tuple[PhaseCheckpoints | None, dict[str, Any], dict[str, Any], bool]:
    """Opens a phase's checkpoints and, when resuming, restores the phase's latest one.

    The start of every recipe's ``run_phase``. With ``resume`` and a checkpoint on disk, the
    state and progress are restored from its latest step (printing ``[<phase>] resumed from
    <directory>/<step>``) and the data iterator continues where the checkpoint left it. A
    resumed phase that is not done drops from the metrics log the records it will log again:
    its own after the restored step and all those of the phases after it. The state is then
    replicated over ``wf.mesh``.

    Args:
        wf: the recipe's workflow. Uses ``wf.workdir`` (the checkpoints are in
            ``<workdir>/checkpoints/<phase>/``), ``wf.config.max_checkpoints_to_keep``,
            ``wf.mesh``, ``wf.log`` (a ``metrics.MetricsLog``) and ``wf.print``.
        phase: the phase's name, one of ``phases``.
        phases: the recipe's phases in the order they run.
        state: the phase's fresh state (a dict of pytrees; ``None`` items are not saved): what
            the phase starts from, and the structures, shapes and dtypes to restore into.
        progress: the phase's fresh progress dict (at step 0), kept when nothing is restored.
        total_steps: the phase's number of steps.
        resume: restore the latest checkpoint, if there is one, and truncate the metrics log.
        data_iterator: the phase's training batches; when a checkpoint is restored, its
            ``set_state`` gets the saved ``progress["data_state"]``.
        final_key: the progress field that the phase's final evaluation fills in, or ``None``
            for a phase with no final evaluation.

    Returns:
        ``(ckpt, state, progress, done)``: the phase's open ``PhaseCheckpoints`` (``None`` when
        done: it is closed then), the replicated state, the progress dict and whether the
        phase already finished (``total_steps`` reached and, with ``final_key``, its final
        evaluation recorded), in which case no step is left to run.
    """
    ckpt = PhaseCheckpoints(os.path.join(wf.workdir, "checkpoints", phase),
                            wf.config.max_checkpoints_to_keep)
    latest = ckpt.latest_step() if resume else None
    if latest is not None:
        state, progress = ckpt.restore(latest, state)
        if data_iterator is not None:
            data_iterator.set_state(progress["data_state"])
        wf.print(f"[{phase}] resumed from {ckpt.directory}/{latest}")
    done = progress["step"] >= total_steps and (
        final_key is None or progress.get(final_key) is not None)
    if resume and not done:
        # Records logged after the checkpoint (and by later phases) will be logged again.
        wf.log.truncate(phase, progress["step"], tuple(phases[phases.index(phase) + 1:]))
    state = jax.device_put(state, NamedSharding(wf.mesh, P()))
    if done:
        ckpt.close()
        ckpt = None
    return ckpt, state, progress, done


def load_dense_state(source: str, like: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The items of ``like`` (e.g. ``{"params": ...}``, same structures) from a recipe's dense
    checkpoint: ``source`` is a run directory, a phase's manager directory or one step directory.
    Returns the restored items and the step directory."""
    source = os.path.abspath(source)
    if os.path.isdir(os.path.join(source, "checkpoints", "dense")):
        source = os.path.join(source, "checkpoints", "dense")
    if re.fullmatch(r"\d+", os.path.basename(source)):
        manager_dir, step = os.path.dirname(source), int(os.path.basename(source))
    else:
        manager_dir, step = source, None
    if not os.path.isdir(manager_dir):
        raise FileNotFoundError(f"--init-from {source!r}: no such checkpoint directory")
    manager = ocp.CheckpointManager(manager_dir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"--init-from {source!r}: no checkpoint steps found")
    restored = manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in like.items()}))
    manager.close()
    return {name: restored[name] for name in like}, os.path.join(manager_dir, str(step))


def load_dense_weights(source: str, model) -> tuple[dict, dict, str]:
    """Params and batch stats from a recipe checkpoint, shaped like ``model``'s (pure dicts)."""
    from flax import nnx

    restored, where = load_dense_state(source, {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))})
    return restored["params"], restored["batch_stats"], where
