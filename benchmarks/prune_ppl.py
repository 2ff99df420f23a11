"""Perplexity of SmolLM2-135M pruned by magnitude, Wanda and SparseGPT (50% unstructured and 2:4).

Every run starts from a fresh copy of the float model; calibration and evaluation data are the same
for all. Prints one JSON line per method (and appends it to ``--out``)::

    HF_HUB_OFFLINE=1 python benchmarks/prune_ppl.py --calib self --samples 32 --out prune_ppl.jsonl

Defaults: all linears of the decoder blocks (lm_head and embeddings left dense), calibration
32 x 512 tokens, held-out text /usr/share/common-licenses/GPL-3, 14 windows x 512 tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from torchcompress.api import prune_
from torchcompress.calibration import CalibrationConfig, build_calibration
from torchcompress.eval.perplexity import evaluate, make_windows
from torchcompress.models import load_model
from torchcompress.prune import (
    MagnitudePruneConfig,
    SparseGPTConfig,
    WandaConfig,
    sparsity_report,
)

METHODS = {
    "magnitude-50": MagnitudePruneConfig(0.5),
    "wanda-50": WandaConfig(0.5),
    "sparsegpt-50": SparseGPTConfig(0.5),
    "magnitude-2:4": MagnitudePruneConfig(n=2, m=4),
    "wanda-2:4": WandaConfig(n=2, m=4),
    "sparsegpt-2:4": SparseGPTConfig(n=2, m=4),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(["dense", *METHODS]))
    p.add_argument("--calib", default="self")
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
    calib = None
    for name in a.methods.split(","):
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        cfg = METHODS.get(name)
        if cfg is not None:
            if getattr(cfg, "needs_calibration", False) and calib is None:
                calib = build_calibration(CalibrationConfig(sources=(a.calib,), num_samples=a.samples, seq_len=a.seq_len),
                                          base, lm.tokenizer)
            prune_(model, cfg, calib_data=calib if getattr(cfg, "needs_calibration", False) else None)
        t1 = time.perf_counter()
        with torch.inference_mode():
            res = evaluate(model, windows)
        rep = sparsity_report(model)
        row = {"method": name, "config": repr(cfg), "perplexity": round(res.perplexity, 3),
               "eval": f"{res.windows} x {res.seq_len} of {a.text}", "linear_sparsity": round(rep.sparsity, 4),
               "calibration": None if calib is None or cfg is None or not getattr(cfg, "needs_calibration", False)
               else f"{a.calib} {a.samples} x {a.seq_len} sha256 {calib.sha256()[:12]}",
               "prune_seconds": round(t1 - t0, 1), "threads": torch.get_num_threads()}
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
