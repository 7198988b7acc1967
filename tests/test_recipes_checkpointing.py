"""recipes/engine/checkpointing.open_phase: the start of every recipe's ``run_phase``."""

import os
import sys
from types import SimpleNamespace

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from recipes.engine import checkpointing, metrics  # noqa: E402

PHASES = ("dense", "retrain", "control")


class FakeIterator:
    def __init__(self):
        self.states = []

    def set_state(self, state):
        self.states.append(state)


def state_at(step):
    return {"params": {"w": np.full((4,), step, np.float32)},
            "opt_state": {"mu": np.full((2, 2), -step, np.float32)}, "masks": None}


def progress_at(step, evaluation=None):
    return {"phase": "retrain", "step": step, "seconds": float(step), "eval": evaluation,
            "data_state": {"position": step}}


def test_open_phase_restores_the_latest_step_truncates_the_log_and_says_when_done(tmp_path):
    printed = []
    log = metrics.MetricsLog(str(tmp_path / "metrics.jsonl"))
    wf = SimpleNamespace(workdir=str(tmp_path), config=SimpleNamespace(max_checkpoints_to_keep=2),
                         mesh=Mesh(np.asarray(jax.devices()), ("data",)), log=log,
                         print=printed.append)
    directory = os.path.join(str(tmp_path), "checkpoints", "retrain")
    saver = checkpointing.PhaseCheckpoints(directory)
    for step in (2, 4):
        saver.save(step, state_at(step), progress_at(step))
    records = [{"phase": "dense", "step": 6}, {"phase": "retrain", "step": 2},
               {"phase": "retrain", "step": 4}, {"phase": "retrain", "step": 5},
               {"phase": "control", "step": 2}]
    for record in records:
        log.write(record)
    fresh = {"phase": "retrain", "step": 0, "seconds": 0.0, "eval": None}

    def open_phase(total_steps, resume, iterator=None, **kwargs):
        return checkpointing.open_phase(wf, "retrain", PHASES, state_at(0), dict(fresh),
                                        total_steps, resume, data_iterator=iterator, **kwargs)

    # Not resuming: the fresh state and progress, nothing printed, the log untouched.
    iterator = FakeIterator()
    ckpt, state, progress, done = open_phase(6, False, iterator)
    assert ckpt is not None and not done and progress == fresh and iterator.states == []
    np.testing.assert_array_equal(state["params"]["w"], np.zeros(4))
    ckpt.close()
    assert printed == [] and log.read() == records

    # Resuming: the latest of the two steps, the data position, replicated; later records go.
    ckpt, state, progress, done = open_phase(6, True, iterator)
    assert not done and progress == progress_at(4) and iterator.states == [{"position": 4}]
    assert printed == [f"[retrain] resumed from {os.path.abspath(directory)}/4"]
    np.testing.assert_array_equal(state["params"]["w"], np.full(4, 4.0))
    np.testing.assert_array_equal(state["opt_state"]["mu"], np.full((2, 2), -4.0))
    assert state["masks"] is None
    assert state["params"]["w"].sharding.is_equivalent_to(NamedSharding(wf.mesh, P()), 1)
    assert len(state["params"]["w"].sharding.device_set) == len(jax.devices())
    assert log.read() == records[:3]
    # The phase goes on and saves its last step, without a final evaluation yet.
    ckpt.save(6, state_at(6), progress_at(6))
    ckpt.close()

    # All steps run but no final evaluation: not done, unless the phase has none.
    ckpt, _, progress, done = open_phase(6, True)
    assert not done and progress["step"] == 6
    ckpt.close()
    ckpt, _, _, done = open_phase(6, True, final_key=None)
    assert done and ckpt is None

    # The final evaluation recorded: done, the checkpoints closed, the log left as it is.
    saver.save(8, state_at(8), progress_at(8, {"top1": 0.5}))
    saver.close()
    log.write({"phase": "control", "step": 1})
    before = log.read()
    ckpt, state, progress, done = open_phase(8, True)
    assert done and ckpt is None and progress["eval"] == {"top1": 0.5}
    np.testing.assert_array_equal(state["params"]["w"], np.full(4, 8.0))
    assert log.read() == before
    ckpt, _, _, done = open_phase(8, True, final_key="bleu")  # a field that is not set
    assert not done
    ckpt.close()
