"""Perplexity and parameter count of SmolLM2-135M after SVD of the MLPs: plain vs activation-aware.

Every run starts from a fresh copy of the float model; the activation statistics (``X^T X`` of every
MLP Linear's inputs, from the float model) are gathered once and shared by all activation-aware
runs. Prints one JSON line per run (and appends it to ``--out``)::

    HF_HUB_OFFLINE=1 python benchmarks/svd_ppl.py --ratios 0.9,0.75,0.5 --calib pydoc --out svd_ppl.jsonl

Defaults: gate/up/down of every decoder block; calibration 32 x 512 tokens of pydoc text; held-out
text /usr/share/common-licenses/GPL-3, 14 windows x 512 tokens. ``ratio`` = fraction of each MLP
layer's weight parameters kept (uniform), or of all MLP weights (``--global``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from torchcompress.calibration import CalibrationConfig, build_calibration
from torchcompress.eval.perplexity import evaluate, make_windows
from torchcompress.lowrank import SVDConfig
from torchcompress.lowrank.svd import input_second_moments, lowrank_
from torchcompress.models import load_model
from torchcompress.nn.lowrank_linear import LowRankLinear
from torchcompress.targets import select_modules

MLP = ["re:.*mlp\\.(gate|up|down)_proj"]


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", default="0.9,0.75,0.5")
    p.add_argument("--modes", default="dense,plain,aware")
    p.add_argument("--global", dest="global_", action="store_true", help="one budget over all MLP layers")
    p.add_argument("--calib", default="pydoc")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--windows", type=int, default=14)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = load_model("default")
    base = lm.model.eval()
    with open(a.text, encoding="utf-8") as f:
        windows = make_windows(lm.tokenizer, f.read(), a.seq_len, a.windows, a.text)
    names = [n for n, _ in select_modules(base, MLP)]
    mlp_params = sum(base.get_submodule(n).weight.numel() for n in names)
    modes = a.modes.split(",")
    xtx, calib_desc = None, None
    if "aware" in modes:
        t0 = time.perf_counter()
        calib = build_calibration(CalibrationConfig(sources=(a.calib,), num_samples=a.samples, seq_len=a.seq_len),
                                  base, lm.tokenizer)
        xtx = input_second_moments(base, names, calib)
        calib_desc = {"source": a.calib, "samples": a.samples, "seq_len": a.seq_len, "tokens": calib.num_tokens,
                      "seconds": round(time.perf_counter() - t0, 1)}
    runs = [("dense", None)] if "dense" in modes else []
    for r in (float(x) for x in a.ratios.split(",")):
        runs += [(m, r) for m in ("plain", "aware") if m in modes]
    for mode, ratio in runs:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        if ratio is not None:
            cfg = SVDConfig(param_ratio=ratio, activation_aware=mode == "aware",
                            allocation="global" if a.global_ else "uniform")
            lowrank_(model, cfg, targets=MLP, second_moments=xtx)
        mods = [model.get_submodule(n) for n in names]  # LowRankLinear, or nn.Linear where kept dense
        kept_mlp = sum(m.rank * (m.in_features + m.out_features) if isinstance(m, LowRankLinear) else m.weight.numel()
                       for m in mods)
        res = evaluate(model, windows)
        row = {"mode": mode, "param_ratio": ratio, "allocation": "global" if a.global_ else "uniform",
               "perplexity": round(res.perplexity, 3), "params": _params(model), "params_float": _params(base),
               "mlp_weight_params": kept_mlp, "mlp_weight_params_float": mlp_params,
               "eval": {"text": a.text, "windows": res.windows, "seq_len": res.seq_len},
               "calibration": calib_desc if mode == "aware" else None,
               "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
