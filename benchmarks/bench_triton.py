"""Triton W4 g128 dequant-matmul vs torch fp16 matmul on CUDA, and as a fraction of memory bandwidth.

Runs only when CUDA is present (prints why not and exits 0 otherwise). For each shape and batch,
fp16 ``F.linear`` and ``torchcompress::int_linear`` (Triton path) are timed interleaved with CUDA
events, median over rounds. The bandwidth roofline is measured, not assumed: the time of a large
device-to-device copy gives the achievable bytes/s, and each kernel's bytes moved (packed weight,
scales, x, output) divided by its time is reported as a fraction of it. Each pair is timed twice:
eager (a Python loop of calls, so dispatch and launch overhead count) and replayed from a CUDA graph
(the GPU time of the kernels alone, as decode runs under CUDA graphs).

    python benchmarks/bench_triton.py --rounds 20
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (8192, 8192)]  # (in, out)
BATCHES = (1, 16)


def cuda_ms(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_ms(fn, iters: int, replays: int = 5) -> float:
    """Per-call time of ``fn`` replayed from a CUDA graph of ``iters`` calls: the kernels' own time,
    without Python/launch overhead (how decode loops run under CUDA graphs or torch.compile's
    reduce-overhead mode). ``fn`` must have run (and autotuned) before."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return min(cuda_ms(g.replay, 1) for _ in range(replays)) / iters


def copy_bandwidth() -> float:
    """Achievable device memory bandwidth in bytes/s (read + write of a 1 GiB copy)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = min(cuda_ms(lambda: dst.copy_(src), 10) for _ in range(3))
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--iters", type=int, default=50, help="calls per timed round")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device here; nothing measured (no numbers are reported without a GPU)")
        return
    from torchcompress import QuantScheme
    from torchcompress.primitives.affine import quantize_affine
    from torchcompress.primitives.packing import pack

    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s; eager: "
          f"median of {args.rounds} interleaved rounds x {args.iters} calls (Python dispatch and launches included); "
          f"graph: the same calls replayed from a CUDA graph (the kernels alone); % of BW from the graph times")
    print(f"{'shape (in x out)':>17} {'batch':>5} {'fp16 ms':>8} {'W4 ms':>8} {'speedup':>8} | {'fp16 ms':>8} {'W4 ms':>8} "
          f"{'speedup':>8} {'W4 % BW':>8} {'fp16 % BW':>9}")
    print(f"{'':>17} {'':>5} {'eager':>26} | {'CUDA graph':>44}")
    for k, n in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        q = quantize_affine(w.float(), QuantScheme(bits=4, group_size=128, scale_dtype="float16"))
        qw, scale = pack(q.codes, 4), q.scale
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            fns = {
                "fp16": lambda: F.linear(x, w),
                "w4": lambda: torch.ops.torchcompress.int_linear(x, qw, scale, None, None, 4, 128, k),
            }
            for f in fns.values():  # warm-up and autotune
                f()
            torch.cuda.synchronize()
            times = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, f in fns.items():
                    times[name].append(cuda_ms(f, args.iters))
            med = {name: statistics.median(v) for name, v in times.items()}
            gr = {name: graph_ms(f, args.iters) for name, f in fns.items()}
            io = 2 * (m * k + m * n)
            w4_bytes = qw.numel() + scale.numel() * 2 + io
            fp16_bytes = w.numel() * 2 + io
            pct = lambda b, ms: 100 * b / (ms / 1e3) / bw  # noqa: E731
            print(f"{f'{k}x{n}':>17} {m:>5} {med['fp16']:>8.4f} {med['w4']:>8.4f} {med['fp16'] / med['w4']:>7.2f}x | "
                  f"{gr['fp16']:>8.4f} {gr['w4']:>8.4f} {gr['fp16'] / gr['w4']:>7.2f}x {pct(w4_bytes, gr['w4']):>7.1f}% "
                  f"{pct(fp16_bytes, gr['fp16']):>8.1f}%", flush=True)


if __name__ == "__main__":
    main()
