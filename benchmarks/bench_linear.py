"""QuantLinear CPU forward time as a ratio to an fp32 ``nn.Linear`` of the same shape.

All variants of a shape and batch are measured side by side in one process, interleaved
(fp32, W4 sym, W4 asym, W8, ..., W4 through the reference, fp32, ...) so that machine noise hits
them alike; each cell is the median over ``--repeats`` rounds. ``W4 ref`` is the W4 g128 sym layer
forced onto the pure-PyTorch reference in the same run, so native vs reference vs fp32 is one
table. ``GPTQ W4 act-order`` is a GPTQLinear (W4 g128 asym) whose ``g_idx`` follows a random column
order; GGUF columns are GGUFLinear layers (K-quants only where K is a multiple of 256). The
package never imports this file.

    python benchmarks/bench_linear.py                      # default shapes, batches 1 and 16
    python benchmarks/bench_linear.py --repeats 9 --shapes 576x1536,4096x4096
    python benchmarks/bench_linear.py --kernel reference   # the pure-PyTorch path only
    python benchmarks/bench_linear.py --gguf-gemv          # + GGUF through the GEMV alone (no panel kernel)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn as nn

from torchcompress import QuantLinear, QuantScheme

DEFAULT_SHAPES = "576x1536,4096x4096,4096x11008"  # in_features x out_features
SCHEMES = {
    "W4 g128 sym": QuantScheme(bits=4, group_size=128, symmetric=True),
    "W4 g128 asym": QuantScheme(bits=4, group_size=128, symmetric=False),
    "W8 channel": QuantScheme(bits=8, granularity="channel"),
    "W8 g128 sym": QuantScheme(bits=8, group_size=128, symmetric=True),
}
REFERENCE_OF = "W4 g128 sym"  # also timed through the pure-PyTorch reference, as "W4 ref"


def gguf_types() -> dict:
    """GGUF columns (legacy Q4_0/Q8_0, K-quants Q4_K/Q5_K/Q6_K), when the GGUF modules are present."""
    try:
        from torchcompress.primitives.gguf_common import GGMLType
    except ImportError:
        return {}
    return {name: GGMLType[name] for name in ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")}


def gptq_act_order(lin: nn.Linear, scheme: QuantScheme) -> nn.Module:
    """A GPTQLinear whose groups follow a random column order (act-order ``g_idx``): the RTN codes of
    the weight regrouped as act-order GPTQ would group them. Speed depends only on the layout."""
    from types import SimpleNamespace

    from torchcompress.nn.gptq_linear import GPTQLinear
    from torchcompress.primitives.affine import compute_qparams, quantize_with_qparams

    k, gs = lin.in_features, scheme.group_size
    order = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    w = lin.weight.detach()[:, order]  # columns in "quantization order"; groups are contiguous there
    scale, zero, _ = compute_qparams(w, scheme)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    codes[:, order] = quantize_with_qparams(w, scale, zero, scheme.bits, gs)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    mod = GPTQLinear(k, lin.out_features, lin.bias is not None, scheme, device="meta")
    mod.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    mod._set_buffers(SimpleNamespace(codes=codes, scale=scale, zero=zero, g_idx=g_idx))
    return mod


class ForcedReference(nn.Module):
    """Runs a QuantLinear with ``TORCHCOMPRESS_KERNEL=reference`` (read per call by the op), so that the
    native kernel and the reference are timed side by side in one process."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        old = os.environ.get("TORCHCOMPRESS_KERNEL")
        os.environ["TORCHCOMPRESS_KERNEL"] = "reference"
        try:
            return self.inner(x)
        finally:
            if old is None:
                del os.environ["TORCHCOMPRESS_KERNEL"]
            else:
                os.environ["TORCHCOMPRESS_KERNEL"] = old


class ForcedGemv(nn.Module):
    """Runs a GGUFLinear with the panel kernel switched off, so that batches up to
    ``GGUF_GEMV_MAX_BATCH`` take the fused GEMV (the path they took before the panel kernel): the
    two are timed side by side in one process."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        from torchcompress.ops import fastpath

        old = fastpath.GGUF_PANEL_MIN_BATCH
        fastpath.GGUF_PANEL_MIN_BATCH = {isa: {block: 1 << 30 for block in v} for isa, v in old.items()}
        try:
            return self.inner(x)
        finally:
            fastpath.GGUF_PANEL_MIN_BATCH = old


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            k, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: expected INxOUT[,INxOUT...], got {item!r}") from None
        if k <= 0 or n <= 0:
            raise SystemExit(f"--shapes: sizes must be positive, got {item!r}")
        shapes.append((k, n))
    return shapes


def per_call_seconds(fn, x, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - t0) / iters


def calibrate(fn, x, target_s: float) -> int:
    """Iterations so that one timed round takes about ``target_s`` (fastest of 3 single calls, so a
    stall during calibration does not shrink every later round to one call)."""
    t = min(per_call_seconds(fn, x, 1) for _ in range(3))
    return max(1, min(1000, math.ceil(target_s / max(t, 1e-7))))


def bench_shape(k: int, n: int, batch: int, repeats: int, warmup: int, target_s: float,
                gguf_gemv: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    lin = nn.Linear(k, n).eval()
    mods: dict[str, nn.Module] = {"fp32": lin}
    for name, scheme in SCHEMES.items():
        mods[name] = QuantLinear.from_linear(lin, scheme).eval()
    mods["W4 ref"] = ForcedReference(mods[REFERENCE_OF])
    mods["GPTQ W4 act-order"] = gptq_act_order(lin, SCHEMES["W4 g128 asym"]).eval()
    for name, qtype in gguf_types().items():  # ggml blocks through torchcompress::gguf_linear
        from torchcompress.nn.gguf_linear import GGUFLinear
        from torchcompress.primitives.gguf_common import LAYOUTS

        if k % LAYOUTS[qtype].block_size == 0:  # K-quants need rows of 256-weight super-blocks
            mods[name] = GGUFLinear.from_linear(lin, qtype).eval()
            if gguf_gemv:
                mods[f"{name} gemv"] = ForcedGemv(mods[name])
    x = torch.randn(batch, k)
    times: dict[str, list[float]] = {name: [] for name in mods}
    with torch.inference_mode():
        for m in mods.values():
            for _ in range(warmup):
                m(x)
        iters = {name: calibrate(m, x, target_s) for name, m in mods.items()}
        for _ in range(repeats):
            for name, m in mods.items():  # interleaved: every round measures every variant
                times[name].append(per_call_seconds(m, x, iters[name]))
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per cell (median is reported)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated INxOUT (default {DEFAULT_SHAPES})")
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per module first")
    ap.add_argument("--target-ms", type=float, default=50.0, help="approximate length of one timed round")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--kernel", choices=["auto", "reference"], default=None,
                    help="sets TORCHCOMPRESS_KERNEL for this run (default: leave the environment as is)")
    ap.add_argument("--gguf-gemv", action="store_true",
                    help="also time each GGUF layer with the panel kernel off ('<type> gemv' columns: the fused GEMV)")
    args = ap.parse_args(argv)
    if args.kernel:
        os.environ["TORCHCOMPRESS_KERNEL"] = args.kernel
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = parse_shapes(args.shapes)
    batches = [int(b) for b in args.batches.split(",")]

    kernel = os.environ.get("TORCHCOMPRESS_KERNEL", "auto")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, repeats {args.repeats} (median), "
          f"TORCHCOMPRESS_KERNEL={kernel}; ratio = QuantLinear time / fp32 nn.Linear time")
    gguf = list(gguf_types())
    cols = list(SCHEMES) + ["W4 ref", "GPTQ W4 act-order"] + gguf + ([f"{g} gemv" for g in gguf] if args.gguf_gemv else [])
    header = f"{'shape (in x out)':>17} {'batch':>5} {'fp32 ms':>9} " + " ".join(f"{c + ' ms (x)':>22}" for c in cols)
    print(header)
    print("-" * len(header))
    for k, n in shapes:
        for b in batches:
            med = bench_shape(k, n, b, args.repeats, args.warmup, args.target_ms / 1e3, args.gguf_gemv)
            base = med["fp32"]
            cells = " ".join(f"{med[c] * 1e3:>12.3f} ({med[c] / base:>6.1f}x)" if c in med else f"{'n/a':>22}"
                             for c in cols)
            print(f"{f'{k}x{n}':>17} {b:>5} {base * 1e3:>9.3f} {cells}", flush=True)
            speedups = ", ".join(f"{c} {base / med[c]:.2f}x" for c in cols if c in med)
            print(f"{'':>17} {'':>5} {'speedup vs fp32:':>9} {speedups}", flush=True)


if __name__ == "__main__":
    main()
