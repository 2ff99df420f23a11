"""Structured pruning of SmolLM2-135M: 25% of the MLP intermediate channels, physically removed.

Prints parameter counts, bytes, the CPU forward latency of the pruned model relative to the dense
one (both timed in this process, interleaved: dense, pruned, dense, ...; median of each), and the
perplexity before and after on held-out text::

    HF_HUB_OFFLINE=1 python benchmarks/bench_prune.py --calib self --samples 32

Importance: ``||X_j|| * ||W_down[:, j]||`` from calibration activations (the bundled
``structured-mlp-25`` recipe), or ``--importance l2`` (weights only, no calibration).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from torchcompress.api import prune_
from torchcompress.calibration import CalibrationConfig, build_calibration
from torchcompress.eval.perplexity import evaluate, make_windows
from torchcompress.eval.size import model_bytes
from torchcompress.models import load_model
from torchcompress.prune import StructuredPruneConfig


def _time(model, ids):
    with torch.inference_mode():
        t = time.perf_counter()
        model(input_ids=ids)
        return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--importance", default="activation", choices=["l1", "l2", "activation"])
    p.add_argument("--calib", default="self")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--windows", type=int, default=14)
    p.add_argument("--batch", type=int, default=1, help="latency input: batch x seq-len tokens")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = load_model("default")
    dense = lm.model.eval()
    pruned = copy.deepcopy(dense)
    cfg = StructuredPruneConfig(mlp_ratio=a.ratio, importance=a.importance)
    calib = None
    if cfg.needs_calibration:
        calib = build_calibration(CalibrationConfig(sources=(a.calib,), num_samples=a.samples, seq_len=a.seq_len),
                                  dense, lm.tokenizer)
    prune_(pruned, cfg, calib_data=calib)
    params = [sum(p.numel() for p in m.parameters()) for m in (dense, pruned)]
    nbytes = [model_bytes(m) for m in (dense, pruned)]
    ids = torch.randint(0, dense.config.vocab_size, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(0))
    _time(dense, ids), _time(pruned, ids)  # warm-up
    td, tp = [], []
    for _ in range(a.reps):
        td.append(_time(dense, ids))
        tp.append(_time(pruned, ids))
    with open(a.text, encoding="utf-8") as f:
        windows = make_windows(lm.tokenizer, f.read(), a.seq_len, a.windows, a.text)
    with torch.inference_mode():
        ppl = [evaluate(m, windows).perplexity for m in (dense, pruned)]
    row = {
        "config": repr(cfg),
        "calibration": None if calib is None else f"{a.calib} {a.samples} x {a.seq_len} sha256 {calib.sha256()[:12]}",
        "intermediate_size": [dense.config.intermediate_size, pruned.config.intermediate_size],
        "params": params, "params_ratio": round(params[1] / params[0], 4),
        "bytes": nbytes, "bytes_ratio": round(nbytes[1] / nbytes[0], 4),
        "latency_s_median": [round(statistics.median(td), 4), round(statistics.median(tp), 4)],
        "latency_ratio_pruned_over_dense": round(statistics.median(tp) / statistics.median(td), 4),
        "latency_input": f"{a.batch} x {a.seq_len} tokens, {a.reps} interleaved reps, {torch.get_num_threads()} threads",
        "perplexity": [round(x, 3) for x in ppl], "eval": f"{windows.ids.shape[0]} x {a.seq_len} of {a.text}",
    }
    for k, v in row.items():
        print(f"{k:32} {v}")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
