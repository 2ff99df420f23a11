"""Compile every W4A16 Triton kernel configuration for a CUDA architecture, here, without a GPU.

    python scripts/triton_aot_check.py            # sm_90 (H100/H200), every autotuning configuration
    python scripts/triton_aot_check.py --arch 80  # sm_80 (A100)

Prints registers and spill bytes (ptxas -v), the 128-bit loads in the PTX (``ld.global.v4``, 16-byte
``cp.async``) and the async copies (a software-pipelined K loop) per kernel and configuration; exits 1 if any fails to
compile. Configurations that spill are candidates to drop from the autotuning lists before a GPU
session spends its minutes on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--first-only", action="store_true", help="only the first configuration of each list")
    args = ap.parse_args(argv)
    from torchcompress.ops.triton.aot import compile_kernel, gguf_kernel_variants, int_kernel_variants

    failed = 0
    t0 = time.time()
    variants = list(int_kernel_variants(configs=not args.first_only)) + list(gguf_kernel_variants(configs=not args.first_only))
    for fn, types, meta, warps, stages in variants:
        shown = ", ".join(f"{k}={v}" for k, v in meta.items() if k.startswith(("BLOCK", "LAYOUT", "DIRECT", "QTYPE")))
        try:
            c = compile_kernel(fn, types, meta, arch=args.arch, num_warps=warps, num_stages=stages)
        except Exception as e:  # report every failure, then exit 1
            failed += 1
            print(f"FAIL {fn.__name__:<16} {shown} warps={warps} stages={stages}: {type(e).__name__}: {e}"[:400])
            continue
        flag = "  SPILLS" if c.spill_bytes else ""
        print(f"ok   {fn.__name__:<16} {shown:<60} warps={warps} stages={stages} regs={c.registers} "
              f"spill={c.spill_bytes} 128-bit-loads={c.wide_loads} cp.async={c.async_copies}{flag}", flush=True)
    print(f"sm_{args.arch}: {len(variants) - failed}/{len(variants)} compiled in {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
