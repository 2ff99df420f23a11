"""Perplexity of SmolLM2-135M under the weight-and-activation schemes (FP8, INT8 W8A8 +- SmoothQuant,
NVFP4, MXFP4) beside float and W4 g32 RTN. Every run starts from a fresh copy of the float model; the
calibration data (activation maxima for SmoothQuant and NVFP4's activation global scales) is the
same for all. One JSON line per method (appended to ``--out``)::

    HF_HUB_OFFLINE=1 python benchmarks/schemes_ppl.py --out schemes_ppl.jsonl

Defaults: every Linear but lm_head; evaluation 32 x 512 windows of pydoc (the project eval text),
calibration 32 x 512 random windows of GPL-3 (disjoint from the evaluation text).
"""

from __future__ import annotations

import argparse
import copy
import json
import time


from torchcompress.calibration import CalibrationConfig, build_calibration
from torchcompress.config import QuantScheme, RTNConfig
from torchcompress.eval.perplexity import evaluate, make_windows
from torchcompress.eval.text import load_text
from torchcompress.models import load_model
from torchcompress.recipe.runner import compress
from torchcompress.recipe.schema import Recipe, Stage, load_recipe
from torchcompress.quant.scheme_config import FP4Config, FP8Config, SmoothQuantConfig, W8A8Int8Config


def _recipe(name: str, *cfgs) -> Recipe:
    ign = ("lm_head",)
    return Recipe(name, tuple(Stage(type(c).__name__, f"s{i}", c, ignore=ign) for i, c in enumerate(cfgs)))


METHODS = {
    "fp8-w8a8": lambda: load_recipe("fp8-w8a8"),
    "fp8-block": lambda: load_recipe("fp8-block"),
    "int8-w8a8": lambda: _recipe("int8-w8a8", W8A8Int8Config()),
    "int8-w8a8-sq0.5": lambda: load_recipe("w8a8-int8-smoothquant"),
    "int8-w8a8-sq0.8": lambda: _recipe("sq0.8", SmoothQuantConfig(0.8), W8A8Int8Config()),
    "nvfp4": lambda: load_recipe("nvfp4"),
    "nvfp4a16": lambda: _recipe("nvfp4a16", FP4Config("nvfp4", False)),
    "mxfp4": lambda: load_recipe("mxfp4"),
    "mxfp4a16": lambda: _recipe("mxfp4a16", FP4Config("mxfp4", False)),
    "w4-g32-rtn": lambda: _recipe("w4g32", RTNConfig(QuantScheme(bits=4, group_size=32, symmetric=True))),
    "fp8-w8a8-block-dyn": lambda: _recipe("fp8bd", FP8Config("block", "dynamic")),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(["float", *METHODS]))
    p.add_argument("--calib", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--text", default="pydoc")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--out", default=None)
    p.add_argument("--float-ppl", type=float, default=None, help="float perplexity from an earlier run (skips re-measuring)")
    a = p.parse_args(argv)
    lm = load_model("default")
    base = lm.model.eval()
    text, desc = load_text(a.text)
    windows = make_windows(lm.tokenizer, text, a.seq_len, a.windows, desc)
    calib = build_calibration(CalibrationConfig(sources=(a.calib,), num_samples=a.samples, seq_len=a.seq_len),
                              base, lm.tokenizer)
    ppl_float = a.float_ppl
    for name in a.methods.split(","):
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        if name != "float":
            compress(model, METHODS[name](), calib)
        t1 = time.perf_counter()
        res = evaluate(model, windows)
        if name == "float":
            ppl_float = res.perplexity
        row = {"method": name, "perplexity": round(res.perplexity, 4),
               "vs_float_pct": None if ppl_float is None else round(100 * (res.perplexity / ppl_float - 1), 2),
               "eval": f"{res.windows} x {res.seq_len} of {a.text}",
               "calibration": f"{a.calib} {a.samples} x {a.seq_len} sha256 {calib.sha256()[:12]}",
               "compress_seconds": round(t1 - t0, 1), "eval_seconds": round(time.perf_counter() - t1, 1)}
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
