"""Triton W4 g128 kernels vs fp16 ``torch.matmul``, FP8 W8A8 vs bf16, eager dispatch overhead: one JSON.

For each shape (in x out) and batch, fp16 ``F.linear`` and the W4 kernels are timed side by side in one
run: the dispatcher's choice (``auto``, through ``torchcompress::int_linear``) and each regime forced
(``gemv`` split-K GEMV, ``dot`` tl.dot tiles on the checkpoint layout, ``dot_kn`` on the K-major copy,
``dequant`` dequantize + GEMM) where it is a candidate. On CUDA the times are replays of a CUDA graph of
``--iters`` calls (the kernels alone, as decode runs under CUDA graphs), best of 5, plus an eager
median for fp16 and ``auto``. The memory roofline is measured (a 1 GiB device copy), and each W4
kernel's bytes (packed weight, scales, x, output) over its time is reported as a fraction of it. The
regime times give the crossovers this device measured (``suggested_crossovers``; coarse: only at the
batches run), written next to the dispatcher table in effect.

    python benchmarks/bench_triton.py                  # CUDA: benchmarks/results/<device>-<date>.json
    TRITON_INTERPRET=1 python benchmarks/bench_triton.py --dry   # CPU: tiny shapes through every path;
                                                        # the JSON goes to a tmp path, marked "dry"

A dry run proves the script and every kernel path run end to end; its times are the interpreter's and
mean nothing. Without CUDA and without ``--dry`` nothing is measured or written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--dry" in sys.argv:  # Triton reads this when first imported (torch may import it early)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096)]  # (in, out)
BATCHES = (1, 8, 16, 64, 128, 2048)
FP8_BATCHES = (256, 2048)
DRY_SHAPES = [(256, 96), (128, 80)]
DRY_BATCHES = (1, 8, 16, 40)
DRY_FP8_BATCHES = (256,)
GROUP = 128
RESULTS = Path(__file__).resolve().parent / "results"


# -- timing ---------------------------------------------------------------------------------------

def cuda_ms(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_ms(fn, iters: int, replays: int = 5) -> float:
    """Per-call time of ``fn`` replayed from a CUDA graph of ``iters`` calls (``fn`` has run before)."""
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


def host_ms(fn, iters: int, rounds: int = 3) -> float:
    """Median wall time per call (CPU, or the host side of a CUDA call), synchronizing at the end."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3 / iters)
    return statistics.median(out)


def over_budget(args, what: str) -> bool:
    """Past ``--budget-s``: skip ``what`` (recorded in the JSON) so the run ends and writes its JSON
    instead of being killed by the caller's timeout with nothing written."""
    if time.monotonic() - args.t0 <= args.budget_s:
        return False
    args.skipped.append(what)
    print(f"bench_triton: {what} skipped, past the {args.budget_s:.0f} s budget", flush=True)
    return True


def kernel_ms(fn, args) -> float:
    fn()  # warm-up, autotune, compile
    return graph_ms(fn, args.iters) if not args.dry else host_ms(fn, 2, 1)


def copy_bandwidth() -> float:
    """Achievable device memory bandwidth in bytes/s (read + write of a 1 GiB copy)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = min(cuda_ms(lambda: dst.copy_(src), 10) for _ in range(3))
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


# -- the measurements --------------------------------------------------------------------------------

def w4_rows(args, dev, shapes, batches, bw):
    from torchcompress import QuantScheme
    from torchcompress.ops.int_linear import dequantize_packed
    from torchcompress.ops.regimes import Regime, regime_for
    from torchcompress.ops.triton.int_linear import triton_int_linear
    from torchcompress.primitives.affine import quantize_affine
    from torchcompress.primitives.kernel_layout import to_kmajor
    from torchcompress.primitives.packing import pack

    rows = []
    for k, n in shapes:
        if over_budget(args, f"W4 {k}x{n}"):
            continue
        w = torch.randn(n, k, device=dev, dtype=torch.float16)
        q = quantize_affine(w.float(), QuantScheme(bits=4, group_size=GROUP, scale_dtype="float16"))
        qw, scale = pack(q.codes, 4), q.scale
        qkn = to_kmajor(qw, 4, k)
        w4_weight_bytes = qw.numel() + scale.numel() * scale.element_size()
        w_hat = dequantize_packed(qw, scale, None, 4, GROUP, k, torch.float32)  # what every W4 kernel must compute
        for m in batches:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)

            def regime(path, kn=None):
                return lambda: triton_int_linear(x, qw, scale, None, None, 4, GROUP, k, path, kn)

            fns = {"fp16": lambda: F.linear(x, w)}
            if dev.type == "cuda":  # through the op: what a model runs
                fns["auto"] = lambda: torch.ops.torchcompress.int_linear(x, qw, scale, None, None, 4, GROUP, k)
            else:  # dry: the op would take the native CPU kernel; the dispatcher's Triton choice instead
                fns["auto"] = regime("auto")
            if m <= 16:
                fns["gemv"] = regime("gemv")
            if 8 <= m <= 256:
                fns["dot"], fns["dot_kn"] = regime("dot"), regime("dot", qkn)
            if m >= 16:
                fns["dequant"] = regime("dequant")
            ms = {name: kernel_ms(f, args) for name, f in fns.items()}
            ref = F.linear(x.float(), w_hat)
            err = {name: float((f().float() - ref).abs().max() / ref.abs().max()) for name, f in fns.items() if name != "fp16"}
            row = {"in": k, "out": n, "batch": m, "auto_regime": regime_for(m, dev).value, "ms": ms, "max_rel_err": err,
                   "ratio_vs_fp16": {name: ms["fp16"] / t for name, t in ms.items() if name != "fp16"}}
            if not args.dry:
                row["eager_ms"] = {name: statistics.median(cuda_ms(fns[name], args.iters) for _ in range(args.rounds))
                                   for name in ("fp16", "auto")}
            if bw:
                io = 2 * (m * k + m * n)
                row["hbm_fraction"] = {"auto": (w4_weight_bytes + io) / (ms["auto"] / 1e3) / bw,
                                       "fp16": (w.numel() * 2 + io) / (ms["fp16"] / 1e3) / bw}
            rows.append(row)
            frac = f" {100 * row['hbm_fraction']['auto']:5.1f}% BW" if bw else ""
            print(f"W4 g{GROUP} {k:>5}x{n:<5} batch {m:>4}: auto={row['auto_regime']:<7} "
                  + " ".join(f"{name} {r:5.2f}x" for name, r in row["ratio_vs_fp16"].items()) + frac
                  + f" (max err {max(err.values()):.1e})", flush=True)
    if args.dry:  # the interpreter's times would make a meaningless table: the bench only proves it runs
        return rows, None
    return rows, suggested_crossovers(rows, Regime)


def suggested_crossovers(rows, Regime) -> dict:
    """Best regime per batch (geometric mean of its speedup over the shapes); the crossovers are the
    largest batch where the GEMV, then the tl.dot kernels, were best (only at the batches run)."""
    best = {}
    for m in sorted({r["batch"] for r in rows}):
        means = {}
        for name in ("gemv", "dot", "dot_kn", "dequant"):
            vals = [r["ratio_vs_fp16"][name] for r in rows if r["batch"] == m and name in r["ratio_vs_fp16"]]
            if vals:
                means[name] = math.exp(sum(map(math.log, vals)) / len(vals))
        best[m] = max(means, key=means.get)
    gemv = max([m for m, b in best.items() if b == "gemv"], default=0)
    dot = max([m for m, b in best.items() if b in ("dot", "dot_kn")] + [gemv])
    return {"gemv_max_m": gemv, "dot_max_m": dot, "best_by_batch": best}


def fp8_rows(args, dev, shapes, batches):
    from torchcompress.nn.scheme_linear import FP8Linear
    from torchcompress.ops.backend import selected_backend
    from torchcompress.ops.scheme_linear import fp8_kernel
    from torchcompress.quant.scheme_config import FP8Config

    cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    rows = []
    for k, n in shapes:
        if over_budget(args, f"FP8 {k}x{n}"):
            continue
        lin = torch.nn.Linear(k, n, bias=False, device=dev)
        fp8 = FP8Linear.from_linear(lin, FP8Config())
        w = lin.weight.detach().to(torch.bfloat16)
        path = fp8_kernel(dev.type, cap, (n, k), None, True, selected_backend())
        for m in batches:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ms = {"bf16": kernel_ms(lambda: F.linear(x, w), args), "fp8": kernel_ms(lambda: fp8(x), args)}
            rows.append({"in": k, "out": n, "batch": m, "fp8_path": path, "ms": ms, "ratio_vs_bf16": ms["bf16"] / ms["fp8"]})
            print(f"FP8 W8A8 {k:>5}x{n:<5} batch {m:>4}: {path} {rows[-1]['ratio_vs_bf16']:5.2f}x bf16", flush=True)
    return rows


# issue 23's acceptance, W4 g128 through the dispatcher (``auto``) vs fp16, per batch: (goal at 8192x8192,
# goal at the other shapes); FP8 W8A8 vs bf16 at batch >= 256
W4_GOALS = {1: (2.5, 2.0), 16: (2.0, 2.0), 64: (1.3, 1.3), 2048: (0.95, 0.95)}
FP8_GOAL = 1.5
HBM_GOAL = 0.70


def acceptance(report: dict) -> list:
    """Each goal against the measured ratio (None where that cell was not run)."""
    out = []
    for r in report["w4_g128"]:
        goals = W4_GOALS.get(r["batch"])
        if goals:
            goal = goals[0] if (r["in"], r["out"]) == (8192, 8192) else goals[1]
            got = r["ratio_vs_fp16"]["auto"]
            out.append({"what": f"W4 g128 {r['in']}x{r['out']} batch {r['batch']} vs fp16", "goal": goal,
                        "measured": got, "met": got >= goal})
        if r["batch"] == 1 and "hbm_fraction" in r:
            got = r["hbm_fraction"]["auto"]
            out.append({"what": f"W4 g128 {r['in']}x{r['out']} batch 1 HBM fraction", "goal": HBM_GOAL,
                        "measured": got, "met": got >= HBM_GOAL})
    for r in report["fp8_w8a8"]:
        out.append({"what": f"FP8 W8A8 {r['in']}x{r['out']} batch {r['batch']} vs bf16 ({r['fp8_path']})",
                    "goal": FP8_GOAL, "measured": r["ratio_vs_bf16"], "met": r["ratio_vs_bf16"] >= FP8_GOAL})
    return out


def dispatch_overhead(dev) -> dict:
    """Eager per-call microseconds at a tiny shape (64 -> 64, batch 1): host time, launch included."""
    import torchcompress as tc
    from torchcompress.nn.quant_linear import QuantLinear

    lin = torch.nn.Linear(64, 64, bias=False, device=dev).half()
    seq = torch.nn.Sequential(lin)
    tc.quantize_(seq, tc.QuantScheme(bits=4, group_size=32, scale_dtype="float16"))
    ql: QuantLinear = seq[0]
    x = torch.randn(1, 64, device=dev, dtype=torch.float16)
    op = torch.ops.torchcompress.int_linear
    calls = {"F.linear fp16": lambda: F.linear(x, lin.weight),
             "QuantLinear module": lambda: ql(x),
             "torch.ops.torchcompress.int_linear": lambda: op(x, ql.qweight, ql.scale, None, None, 4, 32, 64)}
    out = {}
    with torch.inference_mode():
        for name, f in calls.items():
            f()
            out[name] = host_ms(f, 200 if dev.type == "cuda" else 50) * 1e3
    for name, us in out.items():
        print(f"eager dispatch {name:<36} {us:8.1f} us/call ({dev.type})", flush=True)
    return out


# -- the report ------------------------------------------------------------------------------------------

def environment(dev, dry: bool) -> dict:
    import triton

    from torchcompress.ops.regimes import DEFAULT_CROSSOVERS, DEVICE_CROSSOVERS, crossovers_for, device_name

    name = device_name(dev) if dev.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    return {"device": name, "dry": dry, "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "capability": list(torch.cuda.get_device_capability(dev)) if dev.type == "cuda" else None,
            "dispatcher": {"table": {k: v.as_dict() for k, v in DEVICE_CROSSOVERS.items()},
                           "default": DEFAULT_CROSSOVERS.as_dict(),
                           "env_override": os.environ.get("TORCHCOMPRESS_CROSSOVERS"),
                           "in_effect": crossovers_for(device_name(dev)).as_dict()}}


def output_path(env: dict, out: str | None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    if out:
        path = Path(out)
    elif env["dry"]:
        path = Path(tempfile.gettempdir()) / "torchcompress-bench" / f"{slug}-{env['date']}-dry.json"
    else:
        path = RESULTS / f"{slug}-{env['date']}.json"
    if env["dry"] and path.resolve().is_relative_to(RESULTS.resolve()):
        raise SystemExit(f"bench_triton: a dry run never writes into {RESULTS} (its numbers are not GPU numbers)")
    return path


def main(argv=None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="eager rounds (median)")
    ap.add_argument("--iters", type=int, default=20, help="calls per timed round / per CUDA graph")
    ap.add_argument("--dry", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes; JSON to a tmp path")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="stop starting new shapes after this many seconds (skipped ones are listed in the JSON)")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/<device>-<date>.json; dry: a tmp path)")
    args = ap.parse_args(argv)
    args.t0, args.skipped = time.monotonic(), []
    if not args.dry and not torch.cuda.is_available():
        print("bench_triton: no CUDA device here; nothing measured (no numbers are reported without a GPU; --dry "
              "runs every path on CPU)")
        return None
    if args.dry and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("bench_triton --dry needs TRITON_INTERPRET=1 (set before triton is imported)")
    import torchcompress.ops.int_linear  # noqa: F401  (registers torchcompress::int_linear)

    dev = torch.device("cpu" if args.dry else "cuda")
    env = environment(dev, args.dry)
    path = output_path(env, args.out)
    bw = None if args.dry else copy_bandwidth()
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}"
          + (f", copy bandwidth {bw / 1e9:.0f} GB/s" if bw else ", DRY RUN (interpreter; times mean nothing)")
          + f"; crossovers in effect {env['dispatcher']['in_effect']}", flush=True)
    shapes, batches = (DRY_SHAPES, DRY_BATCHES) if args.dry else (SHAPES, BATCHES)
    report = dict(env, copy_bandwidth_gbs=None if bw is None else bw / 1e9)
    report["dispatch_overhead_us"] = dispatch_overhead(dev)
    report["fp8_w8a8"] = fp8_rows(args, dev, shapes, DRY_FP8_BATCHES if args.dry else FP8_BATCHES)  # quick: first
    report["w4_g128"], report["suggested_crossovers"] = w4_rows(args, dev, shapes, batches, bw)
    report["skipped_over_budget"] = args.skipped
    report["acceptance"] = acceptance(report)  # in a dry run too (exercised), with meaningless values
    met = sum(a["met"] for a in report["acceptance"])
    print(("DRY (meaningless) " if args.dry else "") + f"acceptance: {met}/{len(report['acceptance'])} goals met; not met: "
          + "; ".join(f"{a['what']} {a['measured']:.2f} < {a['goal']}" for a in report["acceptance"] if not a["met"]))
    report["wall_s"] = time.monotonic() - args.t0
    from torchcompress.formats.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
    print(f"wrote {path}" + (" (dry)" if args.dry else ""))
    return path


if __name__ == "__main__":
    main()
