"""Several processes: explicit coordinator options, and a smoke run as two processes over loopback.

The two-process run uses JAX's CPU collectives (gloo) on one machine, the way a cluster without
auto-detection would be started: every process gets the same command with its own
``--process-id``; both must finish, and agree with each other on every result.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from recipes.engine import workflow  # noqa: E402
from recipes.vision import configs  # noqa: E402

TIMING = ("seconds", "training_seconds", "cpu_seconds")


def test_partial_coordinator_options_are_refused_before_initializing(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    config = configs.Config(distributed=True, coordinator_address="127.0.0.1:1234")
    with pytest.raises(ValueError, match="not num_processes, process_id"):
        workflow.initialize_distributed(config)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="not process_id"):
        workflow.initialize_distributed(config)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_smoke_run_as_two_processes_over_loopback(tmp_path):
    workdir = str(tmp_path / "run")
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    processes = [subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, "recipes", "resnet50.py"), "--smoke",
         "--no-progress", "--workdir", workdir, "--coordinator-address", address,
         "--num-processes", "2", "--process-id", str(index)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in (0, 1)]
    outputs = [p.communicate(timeout=1500)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        first = json.load(f)
    with open(os.path.join(workdir, "results_process1.json")) as f:
        second = json.load(f)
    assert first["devices"] == 2 and first["exactly_nm_sparse"]
    assert {k: v for k, v in first.items() if k not in TIMING} == \
        {k: v for k, v in second.items() if k not in TIMING}
    assert first["steps"] == {"dense": 6, "retrain": 6, "control": 6}
