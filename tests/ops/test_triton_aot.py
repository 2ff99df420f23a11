"""The Triton kernels compiled for sm_90 here, without a GPU (the interpreter accepts programs the
compiler refuses): every regime's kernel for int W4 g128 and GGUF Q8_0/Q4_K/Q6_K at the first
configuration of each autotuning list (what TORCHCOMPRESS_TRITON_AUTOTUNE=0 runs), down to a cubin
with the ptxas of the triton wheel. None spills registers; the int kernels read their packed words
with 128-bit loads, and the tl.dot kernel's K loop is software-pipelined (async copies). In a
subprocess: the kernels must be imported with TRITON_INTERPRET unset, and this test process has it set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_sm90():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        if not Path(get_ptxas(90).path).exists():
            pytest.skip("no ptxas in this triton install")
    except Exception as e:  # a triton build without the NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is unavailable: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[2] / "scripts" / "triton_aot_check.py"
    res = subprocess.run([sys.executable, str(script), "--first-only"], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(("ok ", "FAIL"))]
    assert len(lines) == 16 and all(ln.startswith("ok ") for ln in lines), res.stdout[-3000:]
    assert not [ln for ln in lines if "SPILLS" in ln], "\n".join(ln for ln in lines if "SPILLS" in ln)

    def num(line, key):
        return int(re.search(rf"{key}=(\d+)", line).group(1))

    ints = [ln for ln in lines if "QTYPE" not in ln]
    assert len(ints) == 7
    assert all(num(ln, "128-bit-loads") > 0 for ln in ints), "\n".join(ints)
    assert all(num(ln, "cp.async") > 0 for ln in ints if "_dot_kernel" in ln), "\n".join(ints)
