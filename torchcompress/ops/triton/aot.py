"""Compile the W4A16 Triton kernels for a CUDA architecture without a GPU (ahead of time).

The CPU test suite runs the kernels in Triton's interpreter, which accepts programs the real compiler
refuses and says nothing of registers. This compiles them the way a GPU run would (TTIR -> TTGIR ->
LLVM -> PTX -> cubin with the ptxas bundled in the triton wheel) for a target such as sm_90, and reads
ptxas' register and spill counts, so a session without a GPU can prove the kernels build for one and
flag launch configurations that spill. Used by ``scripts/triton_aot_check.py`` and the tests.

Needs ``TRITON_INTERPRET`` unset when triton is imported (the jit functions are then compilable).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Compiled:
    kernel: str
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: Optional[int]
    spill_bytes: Optional[int]  # spill stores + loads reported by ptxas
    wide_loads: int  # 128-bit loads in the PTX: ld.global ... .v4 and 16-byte cp.async
    async_copies: int  # cp.async global -> shared copies: the K loop is software-pipelined


def _ptxas_stats(ptx: str, arch: int) -> tuple[Optional[int], Optional[int]]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([str(ptxas), "-v", f"--gpu-name={sm}", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, check=False)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return (int(regs.group(1)) if regs else None), (sum(spills) if spills else None)


# what Triton's launcher specializes as divisible by 16 when the values are (pointers from torch's
# allocator; sizes and strides of 4096-like shapes): compiled that way, as a GPU run of those shapes would
DIVISIBLE = ("x_ptr", "qw_ptr", "b_ptr", "scale_ptr", "zero_ptr", "bias_ptr", "out_ptr", "N", "K", "row_len",
             "row_bytes", "s_rs", "stride_xm", "stride_om")


def compile_kernel(fn, types: dict, constexprs: dict, *, arch: int = 90, num_warps: int = 4,
                   num_stages: int = 3) -> Compiled:
    """``fn`` (a ``@triton.jit`` function) compiled for ``sm_<arch>``; ``types``: argument name ->
    Triton type (``*fp16``, ``i32`` ...; unnamed non-constexpr arguments are i32). Arguments named in
    :data:`DIVISIBLE` are declared divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in DIVISIBLE and sig[name] != "constexpr"}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    regs, spills = _ptxas_stats(ptx, arch)
    cp = re.findall(r"cp\.async\.c[ag]\.shared\.global[^\n]*", ptx)
    wide = len(re.findall(r"ld\.global[.a-z0-9]*\.v4\.", ptx)) + sum(", 0x10" in c or ", 16" in c for c in cp)
    return Compiled(fn.__name__, dict(constexprs), num_warps, num_stages, regs, spills, wide, len(cp))


def int_kernel_variants(dtype: str = "fp16", configs: bool = True):
    """(fn, types, constexprs, num_warps, num_stages) for the int kernels at W4 g128 (sym and asym),
    every autotuning configuration (or the first of each list with ``configs=False``)."""
    from . import int_linear as il

    base = dict(x_ptr=f"*{dtype}", qw_ptr="*i32", scale_ptr="*fp16", zero_ptr="*u8", bias_ptr=f"*{dtype}",
                out_ptr=f"*{dtype}")
    pick = (lambda cs: cs) if configs else (lambda cs: cs[:1])
    for cfg in pick(il._GEMV_CONFIGS):
        for block_m in (1, 8):
            for direct in (True, False):
                meta = dict(BITS=4, GS=128, HAS_ZERO=False, CROSS=False, VEC=True, LAYOUT=il.WORDS_NK, HAS_BIAS=False,
                            DIRECT=direct, BLOCK_M=block_m, **cfg.kwargs)
                yield il._gemv_kernel, dict(base, out_ptr=base["out_ptr"] if direct else "*fp32"), meta, \
                    cfg.num_warps, cfg.num_stages
    for cfg in pick(il._DOT_CONFIGS):
        for layout in (il.WORDS_NK, il.WORDS_KN):
            meta = dict(BITS=4, GS=128, HAS_ZERO=True, CROSS=False, VEC=True, LAYOUT=layout, HAS_BIAS=True, IEEE=False,
                        UPCAST=False, **cfg.kwargs)
            yield il._dot_kernel, base, meta, cfg.num_warps, cfg.num_stages
    for cfg in pick(il._DEQUANT_CONFIGS):
        meta = dict(BITS=4, GS=128, HAS_ZERO=False, CROSS=False, VEC=True, LAYOUT=il.WORDS_NK, **cfg.kwargs)
        yield il._dequant_kernel, base, meta, cfg.num_warps, cfg.num_stages


def gguf_kernel_variants(qtypes=(8, 12, 14), dtype: str = "fp16", configs: bool = True):
    """The GGUF kernels (Q8_0, Q4_K, Q6_K by default), every autotuning configuration (or the first)."""
    from . import gguf_linear as gl

    types = dict(x_ptr=f"*{dtype}", b_ptr="*u8", bias_ptr=f"*{dtype}", out_ptr=f"*{dtype}")
    pick = (lambda cs: cs) if configs else (lambda cs: cs[:1])
    for qt in qtypes:
        for c in pick(gl._GGUF_GEMV_CONFIGS):
            yield gl._gemv_kernel, types, dict(QTYPE=qt, HAS_BIAS=False, DIRECT=True, BLOCK_M=8, **c.kwargs), \
                c.num_warps, c.num_stages
        for c in pick(gl._GGUF_DOT_CONFIGS):
            yield gl._dot_kernel, types, dict(QTYPE=qt, HAS_BIAS=True, IEEE=False, UPCAST=False, **c.kwargs), \
                c.num_warps, c.num_stages
        for c in pick(gl._GGUF_DEQUANT_CONFIGS):
            yield gl._dequant_kernel, types, dict(QTYPE=qt, **c.kwargs), c.num_warps, c.num_stages
