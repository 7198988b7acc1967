"""The hardware probe's driver: its verdicts on simulated hardware (CPU), and the real run (GPU)."""

import ctypes
import importlib.util
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.kernels import _wgmma_sp_layout as wl

ROOT = Path(__file__).resolve().parents[1]


def _probe_module():
    spec = importlib.util.spec_from_file_location("wgmma_sp_probe", ROOT / "benchmarks" / "wgmma_sp_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = _probe_module()


def _array(ptr, dtype, shape):
    ctype = {np.uint32: ctypes.c_uint32, np.uint16: ctypes.c_uint16, np.float32: ctypes.c_float}[dtype]
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctype)), shape=shape)


class SimulatedHardware:
    """Stands in for the probe library: computes D by the emulation after ``meta_fn``, i.e.
    hardware that reads the metadata the way that alternative hypothesis says."""

    def __init__(self, meta_fn=lambda m: m):
        self.meta_fn = meta_fn

    def wgmma_sp_probe(self, a_regs, a_kept, meta, b, d, selector, a_from_smem, err, err_len):
        as_f32 = lambda bits: np.asarray(bits.view(jnp.bfloat16).astype(np.float32))  # noqa: E731
        regs = _array(a_regs, np.uint32, (128, 4))
        halves = np.stack([regs & 0xFFFF, regs >> 16], axis=-1).astype(np.uint16).reshape(128, 8)
        a = as_f32(_array(a_kept, np.uint16, (64, 16)).copy()) if a_from_smem else as_f32(halves)
        out = wl.emulate_wgmma_sp(a, self.meta_fn(_array(meta, np.uint32, (128,)).copy()),
                                  as_f32(_array(b, np.uint16, (32, 16)).copy()), selector=selector,
                                  a_source="smem" if a_from_smem else "registers")
        _array(d, np.float32, (128, 8))[:] = out
        return 0


def test_probe_accepts_hardware_that_matches_the_emulation(capsys):
    assert probe.run(SimulatedHardware())
    assert capsys.readouterr().out.count("-> OK") == 6


def test_probe_names_the_alternative_the_hardware_follows(capsys):
    swap_halves = probe.HYPOTHESES["metadata halves swapped (rows r / r + 8)"][0]
    assert not probe.run(SimulatedHardware(swap_halves))
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "hardware matches: ['metadata halves swapped (rows r / r + 8)']" in out


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda-13.0/bin/nvcc").is_file(),
                    reason="no nvcc here")
def test_probe_source_compiles_for_sm90a(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda-13.0/bin/nvcc"
    result = subprocess.run([nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-std=c++17", "--ptx",
                             str(probe.SOURCE), "-o", str(tmp_path / "probe.ptx")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "probe.ptx").read_text().count("wgmma.mma_async.sp.sync.aligned.m64n16k32") == 6


@pytest.mark.gpu
def test_hardware_matches_the_emulation():
    """Needs a Hopper GPU and nvcc: the verdict the GPU session is waiting for."""
    nvcc = shutil.which("nvcc")
    if nvcc is None and not probe.LIBRARY.is_file():
        pytest.skip("no nvcc to build the probe")
    assert probe.main(["--build", "--nvcc", nvcc] if nvcc else []) == 0
