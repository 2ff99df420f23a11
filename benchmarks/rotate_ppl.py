"""SmolLM2 held-out perplexity of GPTQ / RTN with and without the residual-stream rotation (issue #22 item 2).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/rotate_ppl.py --out out/rotate_ppl.jsonl

Calibration: 64 x 512 tokens of in-domain text (the other license texts, /usr/share/common-licenses/[ALM]*);
evaluation: GPL-3 (not among the calibration files), --windows x 512 tokens. Every method runs a bundled
recipe (or the same stages with a rotation in front) through ``compress`` on a fresh copy of the float
model, i.e. the QuantLinear / GPTQLinear path (SmolLM2's 576 inputs at group 128 leave a partial last
group of 64 columns, which this path handles; the GPTQ-format export would refuse it).
"""
import argparse
import copy
import dataclasses
import json
import os
import time

import torch

from torchcompress.calibration import CalibrationConfig, build_calibration, parse_sources
from torchcompress.eval.perplexity import evaluate, make_windows
from torchcompress.eval.text import load_text
from torchcompress.models import load_model
from torchcompress.quant.rotation import RotateConfig
from torchcompress.recipe.runner import compress
from torchcompress.recipe.schema import Recipe, Stage, load_recipe


def with_rotation(recipe: Recipe, seed: int, online_down: bool) -> Recipe:
    rot = Stage(kind="rotate", name="rotate-residual", config=RotateConfig(seed=seed, online_down=online_down))
    return dataclasses.replace(recipe, name=f"rotate+{recipe.name}", stages=(rot,) + recipe.stages)


p = argparse.ArgumentParser()
p.add_argument("--calib", default="/usr/share/common-licenses/[ALM]*")
p.add_argument("--samples", type=int, default=64)
p.add_argument("--heldout", default="/usr/share/common-licenses/GPL-3")
p.add_argument("--windows", type=int, default=32)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--only", default="", help="comma-separated method names (default: all)")
p.add_argument("--out", default="out/rotate_ppl.jsonl")
a = p.parse_args()
lm = load_model("default")
tok = lm.tokenizer
srcs, weights = parse_sources(a.calib)
calib = build_calibration(CalibrationConfig(sources=srcs, weights=weights, num_samples=a.samples, seq_len=512),
                          lm.model, tok)
text, desc = load_text(a.heldout)
windows = make_windows(tok, text, 512, a.windows, desc)
methods = {"float": None}
for r in ("w4-rtn", "w4-gptq-g128", "w3-gptq-g128"):
    methods[r] = load_recipe(r)
    methods[f"rotate+{r}"] = with_rotation(load_recipe(r), a.seed, False)
methods["rotate(online down)+w4-gptq-g128"] = with_rotation(load_recipe("w4-gptq-g128"), a.seed, True)
only = {s.strip() for s in a.only.split(",") if s.strip()}
os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
for name, recipe in methods.items():
    if only and name not in only:
        continue
    model = copy.deepcopy(lm.model).eval()
    t0 = time.perf_counter()
    if recipe is not None:
        compress(model, recipe, calib)
    wall = time.perf_counter() - t0
    ppl = evaluate(model, windows).perplexity
    res = dict(method=name, ppl=ppl, compress_s=round(wall, 1), calib=a.calib, calib_shape=list(calib.input_ids.shape),
               heldout=desc, windows=int(windows.ids.shape[0]), seq_len=512, threads=torch.get_num_threads())
    print(json.dumps(res), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    del model
