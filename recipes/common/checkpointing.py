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
from typing import Any

import jax
import orbax.checkpoint as ocp

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


def load_dense_weights(source: str, model) -> tuple[dict, dict, str]:
    """Params and batch stats from a recipe checkpoint, shaped like ``model``'s.

    ``source`` may be a run directory, a phase's manager directory, or one step directory.
    Returns ``(params, batch_stats, step_directory)`` as pure dicts.
    """
    from flax import nnx

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
    like_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    like_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(like_params)),
        batch_stats=ocp.args.StandardRestore(_abstract(like_stats))))
    manager.close()
    return restored["params"], restored["batch_stats"], os.path.join(manager_dir, str(step))
