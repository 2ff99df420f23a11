"""GGUF quantization speed, side by side in one run (ratios, never assertions).

    HF_HUB_OFFLINE=1 python benchmarks/bench_gguf.py [--no-model] [--kquant-rows 1024]

1. a 4096x4096 tensor to Q4_0 and Q8_0: torchcompress (native kernels, and the PyTorch reference) vs
   gguf-py (NumPy), and whether the bytes are identical (goal: >= 3x faster, bit-identical);
2. K-quant throughput, native and PyTorch reference (gguf-py has no K-quant quantizer);
3. the whole default SmolLM2 export to Q4_K_M vs llama.cpp's ``llama_model_quantize`` of the same
   F32 .gguf (when llama-cpp-python is installed; goal: faster).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kquant-rows", type=int, default=1024, help="rows of 4096 for the K-quant throughput")
    ap.add_argument("--no-model", action="store_true", help="skip the SmolLM2 export comparison")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gguf

    from torchcompress.primitives.gguf_blocks import _native_op, quantize, quantize_reference
    from torchcompress.primitives.gguf_common import GGMLType

    from importlib.metadata import version

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; gguf-py {version('gguf')}; "
          f"native kernels: {'yes' if _native_op() is not None else 'NO (PyTorch reference)'}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 4096, generator=g) * 0.02
    xn = x.numpy()
    print("\n1. 4096x4096 float32 -> bytes (best of %d)" % a.repeat)
    print(f"   {'type':6s} {'torchcompress':>14s} {'(reference)':>12s} {'gguf-py':>10s} {'speedup':>8s}  identical")
    for name in ["Q4_0", "Q8_0"]:
        t_ours, ours = best_of(lambda: quantize(x, GGMLType[name]), a.repeat)
        t_pt, pt = best_of(lambda: quantize_reference(x, GGMLType[name]), a.repeat)
        t_ref, ref = best_of(lambda: gguf.quants.quantize(xn, gguf.GGMLQuantizationType[name]), a.repeat)
        same = np.array_equal(ours.numpy(), ref) and np.array_equal(pt.numpy(), ref)
        print(f"   {name:6s} {t_ours:12.3f} s {t_pt:10.3f} s {t_ref:8.3f} s {t_ref / t_ours:7.2f}x  {same}")

    print(f"\n2. K-quants, {a.kquant_rows}x4096 (gguf-py cannot produce these)")
    xk = x[: a.kquant_rows]
    imp = torch.rand(4096, generator=g) + 0.05
    xs = xk[:64]  # the PyTorch imatrix reference is slow: rate on 64 rows
    nk = xk.numel()
    print(f"   {'type':6s} {'native':>16s} {'imatrix':>16s} {'PyTorch reference':>20s} {'PyTorch imatrix':>16s}"
          "   (M weights/s)")
    for name in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]:
        t, out = best_of(lambda: quantize(xk, GGMLType[name]), a.repeat)
        ti, _ = best_of(lambda: quantize(xk, GGMLType[name], importance=imp), a.repeat) if _native_op() else (0.0, None)
        tr, ref = best_of(lambda: quantize_reference(xk, GGMLType[name]), 1)
        tri, refi = best_of(lambda: quantize_reference(xs, GGMLType[name], importance=imp), 1)
        same_i = torch.equal(quantize(xs, GGMLType[name], importance=imp), refi) if _native_op() else "-"
        rate = lambda s, n=nk: f"{n / s / 1e6:10.2f}" if s else f"{'-':>10s}"  # noqa: E731
        print(f"   {name:6s} {rate(t):>16s} {rate(ti):>16s} {rate(tr):>20s} {rate(tri, xs.numel()):>16s}"
              f"   identical: {torch.equal(out, ref)}, imatrix: {same_i}")

    if a.no_model:
        return
    try:
        import llama_cpp
    except ImportError:
        print("\n3. skipped: llama-cpp-python is not installed")
        return
    from torchcompress.formats.gguf_write import export_gguf
    from torchcompress.models import default_gguf_path, load_model

    lm = load_model("default")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        export_gguf(lm.model, lm.tokenizer, d / "f32.gguf", "F32", tokenizer_from=default_gguf_path())
        t_ours, _ = best_of(lambda: export_gguf(lm.model, lm.tokenizer, d / "ours.gguf", "Q4_K_M",
                                                tokenizer_from=default_gguf_path()), 1)
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        p.nthread = torch.get_num_threads()
        t = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(d / "f32.gguf").encode(), str(d / "lcpp.gguf").encode(), ctypes.byref(p))
        t_lcpp = time.perf_counter() - t
        assert rc == 0
        from torchcompress.formats.gguf_read import read_gguf

        ga, gb = read_gguf(d / "ours.gguf"), read_gguf(d / "lcpp.gguf")
        same = sum(bool(torch.equal(ga.tensor_bytes(n), gb.tensor_bytes(n))) for n in ga.tensors if n in gb.tensors)
        print(f"\n3. SmolLM2-135M -> Q4_K_M: torchcompress {t_ours:.1f} s (from the in-memory model), "
              f"llama.cpp {t_lcpp:.1f} s (from the F32 .gguf, {p.nthread} threads): ours is {t_lcpp / t_ours:.3f}x "
              f"llama.cpp's speed; {same}/{len(ga.tensors)} tensors byte-identical to llama.cpp's")


if __name__ == "__main__":
    main()
