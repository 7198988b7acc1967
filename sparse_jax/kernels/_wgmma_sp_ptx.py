"""PTX text of one sparse ``wgmma`` for LLVM inline assembly (the kernel's building block).

Mosaic GPU emits its dense ``wgmma`` as ``llvm.inline_asm`` text
(``jax/experimental/mosaic/gpu/wgmma.py``, ``wgmma_m64``): accumulators as ``=f`` outputs
tied to inputs, the A descriptor (``l``) or four A registers (``r``), the B descriptor
(``l``), then immediates (``n``) for scale-d (through a predicate), scale-a, scale-b and the
transposes. `wgmma_sp_asm` builds the sparse form in the same conventions, adding the
metadata register (``r``) and the sparsity selector (an immediate) after the B descriptor;
the operand order is the one in `sparse_jax.kernels._wgmma_sp_layout` (rule 9). A kernel
written with ``plgpu.inline_mgpu`` would pass this text to ``llvm.inline_asm`` exactly as
``wgmma_m64`` does; that kernel is not written yet (it needs a GPU to test).

Checked here without a GPU: ``ptxas -arch=sm_90a`` from CUDA 13.0 assembles the text
(``tests/test_wgmma_sp_ptx.py``, skipped without ptxas); it also reports that sparse wgmma
with floating-point types needs ``.version 8.2`` or later and rejects selectors other than
0 and 1. Not checked: that the numbers it computes match the emulation (GPU).
"""

from __future__ import annotations

import dataclasses

_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "f16": "f16", "float16": "f16"}
MIN_PTX_VERSION = (8, 2)  # ptxas: "Sparse WGMMA with floating point types requires PTX ISA .version 8.2"


@dataclasses.dataclass(frozen=True)
class InlineAsm:
    """An inline-asm body with its LLVM constraint string and operand roles, in order."""

    text: str
    constraints: str
    operands: tuple[str, ...]  # role of $0, $1, ...: "acc<i>", "acc<i>(tied)", "a_desc", "a<r>", ...


def wgmma_sp_asm(n: int, dtype: str = "bf16", *, a_in_registers: bool = False) -> InlineAsm:
    """``wgmma.mma_async.sp.sync.aligned.m64n{n}k32.f32.{dtype}.{dtype}`` as inline asm.

    Operands: ``n / 2`` f32 accumulators (outputs, tied to the same number of inputs);
    A: one 64-bit descriptor, or four .b32 registers (``a_in_registers``); the B
    descriptor; the ``sp-meta`` register; then immediates: sparsity selector, scale-d
    (nonzero: accumulate), scale-a, scale-b, [transpose-a, only with A in shared memory],
    transpose-b.

    >>> asm = wgmma_sp_asm(8)
    >>> print(asm.text.split(";")[2].strip())
    wgmma.mma_async.sp.sync.aligned.m64n8k32.f32.bf16.bf16 {$0,$1,$2,$3}, $8, $9, $10, $11, p, $13, $14, $15, $16
    >>> asm.operands[8:]
    ('a_desc', 'b_desc', 'sp_meta', 'sp_sel', 'scale_d', 'scale_a', 'scale_b', 'trans_a', 'trans_b')
    """
    if not (8 <= n <= 256 and n % 8 == 0):
        raise ValueError(f"n={n}: wgmma m64nNk32 takes N a multiple of 8 in [8, 256]")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    ptx_type = _DTYPES[dtype]
    num_acc = n // 2
    roles = [f"acc{i}" for i in range(num_acc)] + [f"acc{i}(tied)" for i in range(num_acc)]
    constraints = ["=f"] * num_acc + [str(i) for i in range(num_acc)]
    if a_in_registers:
        roles += [f"a{r}" for r in range(4)]
        constraints += ["r"] * 4
    else:
        roles.append("a_desc")
        constraints.append("l")
    roles += ["b_desc", "sp_meta"]
    constraints += ["l", "r"]
    immediates = ["sp_sel", "scale_d", "scale_a", "scale_b"] + ([] if a_in_registers else ["trans_a"]) + ["trans_b"]
    roles += immediates
    constraints += ["n"] * len(immediates)
    slot = {role: f"${i}" for i, role in enumerate(roles)}
    acc = "{" + ",".join(slot[f"acc{i}"] for i in range(num_acc)) + "}"
    a = "{" + ",".join(slot[f"a{r}"] for r in range(4)) + "}" if a_in_registers else slot["a_desc"]
    tail = ", ".join(slot[r] for r in immediates if r not in ("sp_sel", "scale_d"))
    instruction = (
        f"wgmma.mma_async.sp.sync.aligned.m64n{n}k32.f32.{ptx_type}.{ptx_type} "
        f"{acc}, {a}, {slot['b_desc']}, {slot['sp_meta']}, {slot['sp_sel']}, p, {tail}"
    )
    text = f"{{ .reg .pred p; setp.ne.b32 p, {slot['scale_d']}, 0; {instruction}; }}"
    return InlineAsm(text=text, constraints=",".join(constraints), operands=tuple(roles))


def standalone_ptx(asm: InlineAsm, *, selector: int = 0, version: tuple[int, int] = MIN_PTX_VERSION) -> str:
    """A one-kernel PTX module issuing ``asm`` with placeholder operands, for ``ptxas``.

    Registers stand in for the register operands and literals for the immediates
    (``selector``; 1 for the scales; 0 for the transposes), so ``ptxas -arch=sm_90a`` can
    check the instruction's syntax and operand kinds without a GPU.
    """
    body = asm.text
    num_acc = sum(1 for r in asm.operands if r.startswith("acc") and not r.endswith("(tied)"))
    values = {"a_desc": "%rd1", "b_desc": "%rd2", "sp_meta": "%r5", "sp_sel": str(selector), "scale_d": "1",
              "scale_a": "1", "scale_b": "1", "trans_a": "0", "trans_b": "0"}
    values.update({f"a{r}": f"%r{r + 1}" for r in range(4)})
    values.update({f"acc{i}": f"%f{i}" for i in range(num_acc)})
    # Replace the highest-numbered placeholders first so "$1" does not clobber "$12".
    for i in sorted(range(len(asm.operands)), reverse=True):
        body = body.replace(f"${i}", values.get(asm.operands[i], ""))
    zero_acc = " ".join(f"mov.f32 %f{i}, 0f00000000;" for i in range(num_acc))
    return f"""
.version {version[0]}.{version[1]}
.target sm_90a
.address_size 64
.visible .entry wgmma_sp_probe(.param .u64 out)
{{
  .reg .f32 %f<{num_acc}>;
  .reg .b32 %r<6>;
  .reg .b64 %rd<4>;
  mov.b64 %rd1, 0; mov.b64 %rd2, 0;
  mov.b32 %r1, 0; mov.b32 %r2, 0; mov.b32 %r3, 0; mov.b32 %r4, 0; mov.b32 %r5, 0x44444444;
  {zero_acc}
  wgmma.fence.sync.aligned;
  {body}
  wgmma.commit_group.sync.aligned;
  wgmma.wait_group.sync.aligned 0;
  ld.param.u64 %rd3, [out];
  st.global.f32 [%rd3], %f0;
  ret;
}}
"""
