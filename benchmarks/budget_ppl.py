"""Mixed precision under a size budget vs uniform widths on SmolLM2-135M: perplexity against measured
bits per weight (issue #22 item 5). One JSON line per run appended to ``--out``; a table at the end.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/budget_ppl.py --out out/budget_ppl.jsonl

Every run starts from a fresh copy of the float model and quantizes every decoder Linear (lm_head and
the tied embedding stay float). Calibration: ``--samples`` x ``--seq-len`` random windows of in-domain
text (the other licence texts, ``/usr/share/common-licenses/[ALM]*``); evaluation: ``--windows``
windows of GPL-3, a text the calibration does not contain. Uniform baselines: asymmetric RTN and GPTQ
(act-order, static groups, 1% damping) at the widths/group sizes around the targets; the budget runs
use the same quantizers per layer (``--target-bpw`` = the bits of codes + scales + zeros per weight
of those Linears, measured here from the modules, which is what the saved files hold).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch


def _bpw(model) -> float:
    from torchcompress.nn.quant_linear import QuantLinear

    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(m.weight_bits() for m in qs) / sum(m.in_features * m.out_features for m in qs)


def main() -> None:
    from torchcompress.calibration import CalibrationConfig, build_calibration
    from torchcompress.calibration.data import parse_sources
    from torchcompress.config import GPTQConfig, QuantScheme, RTNConfig
    from torchcompress.eval.perplexity import evaluate, make_windows
    from torchcompress.eval.text import load_text
    from torchcompress.models import load_model
    from torchcompress.quant.budget import budget_model
    from torchcompress.quant.budget_config import BudgetConfig
    from torchcompress.quant.gptq import gptq_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", default="/usr/share/common-licenses/[ALM]*")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--targets", default="3.5,4.0,4.5")
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--rtn-uniform", default="3:128,3:64,3:32,4:128,4:64,4:32", help="bits:group of the RTN baselines")
    p.add_argument("--gptq-uniform", default="3:64,4:128,4:64", help="bits:group of the GPTQ baselines")
    p.add_argument("--hessian", default="diag", choices=["diag", "full"])
    p.add_argument("--raw-proxy", action="store_true", help="sum raw layer output errors (BudgetConfig(relative=False)) "
                   "instead of each divided by the layer's output energy")
    p.add_argument("--only", default="", help="run only the rows whose name contains one of these (comma-separated)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/budget_ppl.jsonl")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    lm = load_model("default")
    srcs, weights = parse_sources(a.calib)
    t0 = time.perf_counter()
    calib = build_calibration(CalibrationConfig(sources=srcs, weights=weights, num_samples=a.samples,
                                                seq_len=a.seq_len), lm.model, lm.tokenizer)
    print(f"# calibration {calib.describe()['samples']} x {a.seq_len} from {a.calib} in {time.perf_counter() - t0:.1f}s",
          flush=True)
    text, desc = load_text(a.text)
    windows = make_windows(lm.tokenizer, text, a.seq_len, a.windows, desc)

    def scheme(bits, group):
        return QuantScheme(bits=bits, group_size=group, symmetric=False)

    def uniform_rtn(bits, group):
        def run(m):
            import torchcompress as tc

            tc.quantize_(m, RTNConfig(scheme(bits, group)), ignore=["lm_head"])
        return run

    def uniform_gptq(bits, group):
        return lambda m: gptq_model(m, GPTQConfig(scheme(bits, group), act_order=True, static_groups=True), calib,
                                    ignore=["lm_head"])

    def mixed(method, target):
        cfg = BudgetConfig(target_bpw=target, method=method, hessian=a.hessian, symmetric=False, act_order=True,
                           static_groups=True, relative=not a.raw_proxy)
        return lambda m: budget_model(m, cfg, calib, ignore=["lm_head"])

    rows = {"float": None}
    methods = a.methods.split(",")
    for spec, fn, name in ((a.rtn_uniform, uniform_rtn, "rtn"), (a.gptq_uniform, uniform_gptq, "gptq")):
        if name in methods:
            for s in filter(None, spec.split(",")):
                b, g = map(int, s.split(":"))
                rows[f"{name} uniform W{b} g{g}"] = fn(b, g)
    for method in methods:
        for t in map(float, filter(None, a.targets.split(","))):
            rows[f"{method} budget {t:g} bpw"] = mixed(method, t)
    only = [s for s in a.only.split(",") if s]
    results = []
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    for name, fn in rows.items():
        if only and not any(o in name for o in only):
            continue
        m = copy.deepcopy(lm.model).eval()
        t0 = time.perf_counter()
        if fn is not None:
            with torch.no_grad():
                fn(m)
        wall = time.perf_counter() - t0
        bpw = _bpw(m) if fn is not None else 32.0
        ppl = evaluate(m, windows).perplexity
        r = {"method": name, "bpw": bpw, "perplexity": ppl, "quantize_s": wall, "eval": desc,
             "windows": int(windows.ids.shape[0]), "seq_len": a.seq_len, "calib": a.calib, "samples": a.samples,
             "hessian": a.hessian, "relative": not a.raw_proxy, "threads": a.threads}
        results.append(r)
        print(f"{name:<28} bpw {bpw:6.3f}  ppl {ppl:8.4f}  quantize {wall:7.1f} s", flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(r) + "\n")
        del m
    base = next((r["perplexity"] for r in results if r["method"] == "float"), None)
    print(f"\nSmolLM2-135M, eval {desc} {a.windows} x {a.seq_len}; calib {a.samples} x {a.seq_len} of {a.calib}")
    print("| method | bits/weight | perplexity | x float | quantize (s) |\n|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["method"].split()[0], r["bpw"])):
        rel = f"{r['perplexity'] / base:.3f}" if base else "-"
        print(f"| {r['method']} | {r['bpw']:.3f} | {r['perplexity']:.4f} | {rel} | {r['quantize_s']:.1f} |")


if __name__ == "__main__":
    main()
