"""One calibration variant -> GPTQ W{bits} g{group} (asym, act-order) on SmolLM2 -> held-out perplexity.

Used to choose the default self-sampled calibration settings (issue notes quote its output):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/calib_gptq_ppl.py --name doc --start document
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/calib_gptq_ppl.py --name bos --start bos
    ... --source '/usr/share/common-licenses/[ALM]*@117,...'   (in-domain text instead of 'self')

Appends one JSON line per run to --out.
"""
import argparse, json, time, torch
from torchcompress.models import load_model
from torchcompress.calibration import CalibrationConfig, build_calibration
from torchcompress.calibration.selfgen import SelfGenConfig
from torchcompress.calibration.runner import gptq_model
from torchcompress.config import GPTQConfig, QuantScheme
from torchcompress.eval.perplexity import make_windows, evaluate
from torchcompress.eval.text import load_text
p = argparse.ArgumentParser()
p.add_argument("--name"); p.add_argument("--source", default="self"); p.add_argument("--start", default="document")
p.add_argument("--temperature", type=float, default=1.0); p.add_argument("--top-p", type=float, default=0.95)
p.add_argument("--samples", type=int, default=32); p.add_argument("--damp", type=float, default=0.01)
p.add_argument("--bits", type=int, default=3); p.add_argument("--group", type=int, default=64)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--mse", action="store_true", help="GPTQConfig(mse=True): clip-searched group ranges")
p.add_argument("--static-groups", action="store_true",
               help="GPTQConfig(static_groups=True): act-order with per-contiguous-group parameters (the bundled recipes)")
p.add_argument("--method", choices=["gptq", "rtn"], default="gptq",
               help="rtn: no calibration, round-to-nearest of every decoder linear (with --mse: clip-searched ranges)")
p.add_argument("--heldout", default="/usr/share/common-licenses/GPL-3")
p.add_argument("--out", default="out/calib_gptq_ppl.jsonl")
a = p.parse_args()
torch.set_num_threads(a.threads)
lm = load_model("default"); tok = lm.tokenizer
if a.method == "rtn":
    from torchcompress.pipeline.skeleton import find_blocks
    from torchcompress.primitives.affine import compute_qparams, dequantize_affine, quantize_with_qparams, search_qparams
    sch = QuantScheme(bits=a.bits, group_size=a.group, symmetric=False)
    with torch.no_grad():
        for m in find_blocks(lm.model)[1].modules():
            if isinstance(m, torch.nn.Linear):
                s, z, gs = (search_qparams if a.mse else compute_qparams)(m.weight, sch)
                m.weight.copy_(dequantize_affine(quantize_with_qparams(m.weight, s, z, a.bits, gs), s, z, a.bits, gs))
    text, desc = load_text(a.heldout)
    r = evaluate(lm.model, make_windows(tok, text, 512, 16, desc))
    print(json.dumps(dict(vars(a), ppl=r.perplexity)))
    raise SystemExit(0)
t0 = time.time()
sg = SelfGenConfig(start=a.start, temperature=a.temperature, top_p=a.top_p)
from torchcompress.calibration.data import parse_sources
srcs, weights = parse_sources(a.source)
calib = build_calibration(CalibrationConfig(sources=srcs, weights=weights, num_samples=a.samples, seq_len=512, selfgen=sg), lm.model, tok)
t1 = time.time()
cfg = GPTQConfig(QuantScheme(bits=a.bits, group_size=a.group, symmetric=False), act_order=True, true_sequential=False, damp=a.damp, mse=a.mse,
                static_groups=a.static_groups)
gptq_model(lm.model, cfg, calib)
t2 = time.time()
text, desc = load_text(a.heldout)
w = make_windows(tok, text, 512, 16, desc)
r = evaluate(lm.model, w)
res = dict(vars(a), ppl=r.perplexity, windows=int(w.ids.shape[0]), gen_s=t1 - t0, gptq_s=t2 - t1)
print(json.dumps(res))
import os
os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
open(a.out, "a").write(json.dumps(res) + "\n")
