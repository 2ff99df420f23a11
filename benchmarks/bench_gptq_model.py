"""GPTQ on the whole default SmolLM2, ours beside the public reference (IST-DASLab/gptq), on CPU.

    git clone https://github.com/IST-DASLab/gptq /tmp/gptq-ref     # or any copy of gptq.py + quant.py
    HF_HUB_OFFLINE=1 python benchmarks/bench_gptq_model.py --ref /tmp/gptq-ref \
        [--samples 128 --seq-len 512 --bits 4 --group 128 --act-order --threads 1 --parallel --order-seed 0,1,2,3]

Each implementation runs in its own fresh process (so peak memory is its own), one after the other
(side by side, one core each, with ``--parallel``), on the same calibration tokens (pydoc windows: deterministic, nothing to generate) and the same
scheme (asymmetric, per-group, 1% damping, block size 128, true-sequential order). Printed: the GPTQ
wall time, the peak resident memory during GPTQ (VmHWM reset after loading the model and data) and
for the whole process, and held-out perplexity (GPL-3, 14 x 512) of both, with ratios ours/reference.

GPTQ's rounding decisions are chaotic in the last bits of the Hessian (bench_gptq.py: the same
layer gives identical codes in both implementations from the same float32 Hessian, but a third of
them change when the Hessian is rounded differently, at equal layer error). The two runners
accumulate the Hessian differently (ours: float64 sums of per-batch float32 products; reference:
a float32 running mean), so one run of each is one draw: ``--order-seed 0,1,2,3`` feeds the same
windows in other orders (only the summation order changes) and prints mean, min and max over them.

The reference is driven the way its ``llama.py`` (``llama_sequential``) drives it: inputs of the first
decoder layer captured once; per layer and per true-sequential group, Hessians accumulated by its
``GPTQ.add_batch`` hooks over every sample, ``fasterquant`` per linear, then the layer re-run to make
the next layer's inputs. Only the call into the decoder layer is adapted to today's transformers
(rotary ``position_embeddings`` are passed as keyword arguments, captured from the model's own call).
Its code is imported from ``--ref`` at run time and never copied here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn as nn

HELDOUT = "/usr/share/common-licenses/GPL-3"
REF_SEQUENTIAL = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
                  ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak-RSS counter (Linux)


@torch.no_grad()
def run_reference(model, ids: torch.Tensor, ref_dir: str, bits: int, group: int, act_order: bool) -> None:
    sys.path.insert(0, ref_dir)
    torch.cuda.synchronize = lambda *a, **k: None  # the reference syncs CUDA unconditionally
    torch.cuda.empty_cache = lambda *a, **k: None
    import gptq as ref_gptq  # noqa: E402  (the reference's gptq.py)
    import quant as ref_quant  # noqa: E402  (the reference's quant.py)

    layers = model.model.layers
    n = ids.shape[0]
    inps = torch.zeros(n, ids.shape[1], model.config.hidden_size)
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp[0]
            cache["i"] += 1
            kwargs.pop("past_key_values", None)
            kwargs["use_cache"] = False
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for j in range(n):
        with contextlib.suppress(ValueError):
            model(ids[j:j + 1], use_cache=False)
    layers[0] = layers[0].module
    kwargs = cache["kwargs"]
    outs = torch.zeros_like(inps)

    def fwd(layer, x):
        out = layer(x.unsqueeze(0), **kwargs)
        return (out[0] if isinstance(out, (tuple, list)) else out)[0]

    for layer in layers:
        full = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for names in REF_SEQUENTIAL:
            gq = {}
            for name in names:
                gq[name] = ref_gptq.GPTQ(full[name])
                gq[name].quantizer = ref_quant.Quantizer()
                gq[name].quantizer.configure(bits, perchannel=True, sym=False, mse=False)
            handles = [full[name].register_forward_hook(
                (lambda nm: lambda _m, inp, out: gq[nm].add_batch(inp[0].data, out.data))(name)) for name in names]
            for j in range(n):
                outs[j] = fwd(layer, inps[j])
            for h in handles:
                h.remove()
            for name in names:
                with contextlib.redirect_stdout(io.StringIO()):  # it prints its own timing and error
                    gq[name].fasterquant(percdamp=0.01, groupsize=group, actorder=act_order, static_groups=False)
                gq[name].free()
        for j in range(n):
            outs[j] = fwd(layer, inps[j])
        inps, outs = outs, inps


def child(a) -> dict:
    torch.set_num_threads(a.threads)
    from torchcompress.calibration import CalibrationSet
    from torchcompress.calibration.runner import gptq_model
    from torchcompress.config import GPTQConfig, QuantScheme
    from torchcompress.eval.perplexity import evaluate, make_windows
    from torchcompress.eval.text import load_text
    from torchcompress.models import load_model

    lm = load_model("default")
    model, tok = lm.model, lm.tokenizer
    # full-length windows (the reference's data loaders cut random windows from one long text):
    # seeded random windows of the concatenated pydoc text, the same for both implementations
    ptext, _ = load_text("pydoc")
    stream = tok(ptext, return_tensors="pt").input_ids[0]
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, stream.numel() - a.seq_len, (a.samples,), generator=g)
    ids = torch.stack([stream[s:s + a.seq_len] for s in starts.tolist()])
    if int(a.order_seed):  # the same windows in another order: only the floating-point summation order changes
        ids = ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(int(a.order_seed)))]
    calib = CalibrationSet(ids, torch.ones_like(ids), sources=[{"source": "pydoc", "windows": "random"}])
    text, desc = load_text(HELDOUT)
    windows = make_windows(tok, text, 512, 14, desc)
    base_mib = _hwm_mib()
    _reset_hwm()
    t0 = time.perf_counter()
    if a.impl == "ours":
        cfg = GPTQConfig(QuantScheme(bits=a.bits, group_size=a.group, symmetric=False, scale_dtype="float32"),
                         act_order=a.act_order, damp=0.01, block_size=128, true_sequential=True)
        gptq_model(model, cfg, calib, batch_size=a.batch)
    else:
        run_reference(model, calib.input_ids, a.ref, a.bits, a.group, a.act_order)
    secs = time.perf_counter() - t0
    gptq_mib = _hwm_mib()
    ppl = evaluate(model, windows).perplexity
    return {"impl": a.impl, "gptq_s": secs, "peak_gptq_mib": gptq_mib, "rss_before_mib": base_mib,
            "peak_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ppl": ppl,
            "calib": calib.describe()["sha256"][:16]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", required=True, help="directory holding the reference gptq.py and quant.py")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="our runner's calibration batch size")
    p.add_argument("--order-seed", default="0",
                   help="shuffle the calibration windows' order with this seed (0: as drawn), or a comma list of "
                        "seeds, one run of each implementation per seed and a summary; GPTQ's rounding "
                        "decisions are chaotic in the Hessian's last bits, so runs over a few seeds show the "
                        "perplexity spread of numerically equivalent runs")
    p.add_argument("--parallel", action="store_true",
                   help="run the two processes side by side (one core each) instead of one after the other")
    p.add_argument("--impl", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--order", default="ours,reference", help="which runs first (comma list)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.impl:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return 0
    seeds = [int(x) for x in str(a.order_seed).split(",")]
    print(f"GPTQ W{a.bits} g{a.group} asym act_order={a.act_order} on SmolLM2, {a.samples} x {a.seq_len} pydoc tokens "
          f"(order seeds {seeds}), {a.threads} thread(s) each, {'side by side' if a.parallel else 'one after the other'}; "
          f"torch {torch.__version__}")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    impls = a.order.split(",")
    keys = [("gptq_s", "GPTQ wall time (s)"), ("peak_gptq_mib", "peak RSS in GPTQ (MiB)"),
            ("peak_process_mib", "peak RSS process (MiB)"), ("ppl", "held-out perplexity")]
    runs = []
    for seed in seeds:
        # the child gets one seed: argparse keeps the last --order-seed given
        cmds = {impl: [sys.executable, __file__, *sys.argv[1:], "--order-seed", str(seed), "--impl", impl]
                for impl in impls}
        if a.parallel:
            procs = {i: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for i, c in cmds.items()}
            done = {i: (p.communicate(), p.returncode) for i, p in procs.items()}
        else:
            done = {}
            for i, c in cmds.items():
                r = subprocess.run(c, capture_output=True, text=True, env=env)
                done[i] = ((r.stdout, r.stderr), r.returncode)
        res = {}
        for impl in impls:
            (out, err), rc = done[impl]
            line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
            if rc != 0 or line is None:
                print(f"{impl} failed (exit {rc}):\n{err[-3000:]}")
                return 1
            res[impl] = json.loads(line[7:])
            print(json.dumps(dict(res[impl], order_seed=seed)), flush=True)
        o, f = res["ours"], res["reference"]
        assert o["calib"] == f["calib"]
        print(f"\norder seed {seed}:\n{'':24s} {'ours':>10s} {'reference':>10s} {'ours/ref':>9s}")
        for key, label in keys:
            print(f"{label:24s} {o[key]:10.2f} {f[key]:10.2f} {o[key] / f[key]:9.3f}")
        runs.append(res)
    if len(runs) > 1:
        print(f"\nover {len(runs)} order seeds: mean [min, max]")
        for key, label in keys:
            vals = {i: [r[i][key] for r in runs] for i in ("ours", "reference")}
            mo, mf = (sum(v) / len(v) for v in vals.values())
            print(f"{label:24s} ours {mo:9.2f} [{min(vals['ours']):.2f}, {max(vals['ours']):.2f}]  reference "
                  f"{mf:9.2f} [{min(vals['reference']):.2f}, {max(vals['reference']):.2f}]  ours/ref {mo / mf:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
