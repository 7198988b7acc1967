"""The sparse wgmma inline-asm text: operand roles, and ptxas (sm_90a) accepts it."""

import doctest
import glob
import os
import shutil
import subprocess

import pytest

from sparse_jax.kernels import _wgmma_sp_ptx as wp


def _ptxas() -> str | None:
    found = shutil.which("ptxas")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]
    for root in roots:
        candidate = os.path.join(root, "bin", "ptxas")
        if root and os.path.isfile(candidate):
            return candidate
    return None


PTXAS = _ptxas()
needs_ptxas = pytest.mark.skipif(PTXAS is None, reason="no ptxas (CUDA toolkit) here")


def _assemble(ptx: str, tmp_path) -> subprocess.CompletedProcess:
    source = tmp_path / "probe.ptx"
    source.write_text(ptx)
    return subprocess.run([PTXAS, "-arch=sm_90a", str(source), "-o", str(tmp_path / "probe.cubin")],
                          capture_output=True, text=True, check=False)


def test_docstring_examples():
    result = doctest.testmod(wp, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("a_in_registers", [False, True])
def test_operand_roles_and_constraints_line_up(a_in_registers):
    asm = wp.wgmma_sp_asm(64, "f16", a_in_registers=a_in_registers)
    constraints = asm.constraints.split(",")
    assert len(constraints) == len(asm.operands)
    for role, constraint in zip(asm.operands, constraints):
        if role.endswith("(tied)"):
            assert asm.operands[int(constraint)] == role.removesuffix("(tied)")
        elif role.startswith("acc"):
            assert constraint == "=f"
        elif role in ("a_desc", "b_desc"):
            assert constraint == "l"
        elif role == "sp_meta" or role.startswith("a"):
            assert constraint == "r"
        else:
            assert constraint == "n", role
    # Every operand but the tied inputs appears in the text exactly once.
    for i, role in enumerate(asm.operands):
        if not role.endswith("(tied)"):
            assert asm.text.count(f"${i},") + asm.text.count(f"${i}}}") + asm.text.count(f"${i};") \
                + asm.text.count(f"${i} ") == 1, role
    assert ("trans_a" in asm.operands) is (not a_in_registers)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n=12"):
        wp.wgmma_sp_asm(12)
    with pytest.raises(ValueError, match="dtype='f32'"):
        wp.wgmma_sp_asm(8, "f32")


@needs_ptxas
@pytest.mark.parametrize("n,dtype,a_in_registers,selector", [
    (8, "bf16", False, 0), (128, "bf16", True, 1), (256, "f16", False, 1), (64, "f16", True, 0)])
def test_ptxas_assembles_the_instruction(tmp_path, n, dtype, a_in_registers, selector):
    asm = wp.wgmma_sp_asm(n, dtype, a_in_registers=a_in_registers)
    result = _assemble(wp.standalone_ptx(asm, selector=selector), tmp_path)
    assert result.returncode == 0, result.stderr


@needs_ptxas
def test_ptxas_rejects_what_the_isa_forbids(tmp_path):
    """The check is discriminating: the assembler refuses a bad selector, an old PTX
    version, and the metadata and selector operands swapped."""
    asm = wp.wgmma_sp_asm(8)
    assert _assemble(wp.standalone_ptx(asm, selector=2), tmp_path).returncode != 0
    assert _assemble(wp.standalone_ptx(asm, version=(8, 0)), tmp_path).returncode != 0
    swapped = wp.standalone_ptx(asm).replace("%r5, 0, p", "0, %r5, p")
    assert swapped != wp.standalone_ptx(asm)
    assert _assemble(swapped, tmp_path).returncode != 0
