"""Decode speed of SmolLM2-135M-Instruct exported to ONNX (MatMulNBits) beside our own CPU path and llama.cpp.

For each bit width (W4 g32 symmetric ~ llama.cpp Q4_0; W8 g32 symmetric ~ Q8_0), from the same float model:

* ``torchcompress``    transformers + our QuantLinear (default kernels), its own KV cache;
* ``onnxruntime``      the exported model.onnx in an InferenceSession, present -> past fed back by hand;
* ``onnxruntime-genai`` the exported folder through og.Generator (its own shared-buffer KV cache);
* ``llama.cpp``        our own GGUF export (Q4_0 / Q8_0 of the same float weights) through llama-cpp-python,
                       only where ``llama_cpp`` is installed.

Decode tokens/s = tokens / time of ``--new-tokens`` single-token steps after a prefill of the prompt, median of
``--rounds`` rounds; the engines are timed interleaved (each round runs every engine once) so load
changes on this shared machine hit all of them alike. Printed as ratios to torchcompress.
Threads: ``--threads`` (default OMP_NUM_THREADS / 2, at least 1) for every engine.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/bench_onnx.py --new-tokens 32 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.formats.onnx_run import empty_past  # noqa: E402  (the same feeds the tests use)
from tests.formats.test_onnx_smollm2 import PROMPTS  # noqa: E402

PROMPT = "Write a short paragraph about why the sky is blue, for a curious ten-year-old."


@torch.no_grad()
def decode_torch(model, ids, n):
    from transformers import DynamicCache

    cache = DynamicCache()  # filled in place by each forward
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers >= 5.2x renamed it
    out = model(ids, use_cache=True, **{kw: cache})
    tok = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(tok, use_cache=True, **{kw: cache})
        tok = out.logits[:, -1:].argmax(-1)
    return n / (time.perf_counter() - t0)


def decode_ort(sess, config, ids, n):
    names = [o.name for o in sess.get_outputs()]
    cur, total, past = ids.numpy().astype(np.int64), ids.shape[1], empty_past(config, 1)
    t0 = None
    for step in range(n + 1):  # step 0 is the prefill, not timed
        if step == 1:
            t0 = time.perf_counter()
        res = dict(zip(names, sess.run(names, {"input_ids": cur, "attention_mask": np.ones((1, total), np.int64), **past})))
        cur = np.array([[int(res["logits"][0, -1].argmax())]], np.int64)
        past = {k.replace("present.", "past_key_values."): v for k, v in res.items() if k.startswith("present.")}
        total += 1
    return n / (time.perf_counter() - t0)


def decode_genai(model, ids, n):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=ids.shape[1] + n + 1, min_length=ids.shape[1] + n + 1)
    gen = og.Generator(model, params)
    gen.append_tokens(ids[0].tolist())
    gen.generate_next_token()  # the prefill's token
    t0 = time.perf_counter()
    for _ in range(n):
        gen.generate_next_token()
    return n / (time.perf_counter() - t0)


def decode_llama_cpp(llm, ids, n):
    llm.reset()
    llm.eval(ids[0].tolist())
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 2)) // 2))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    import onnxruntime_genai as og

    import torchcompress as tc
    from torchcompress.formats.onnx_export import export_onnx
    from torchcompress.models import default_gguf_path, load_model

    have_llama = importlib.util.find_spec("llama_cpp") is not None
    lm = load_model("default")
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    print(f"SmolLM2-135M-Instruct, prompt {ids.shape[1]} tokens, {args.new_tokens} decode steps, median of "
          f"{args.rounds} interleaved rounds, {args.threads} thread(s) per engine, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, onnxruntime-genai {og.__version__}; shared machine (other jobs running): "
          "compare ratios within one run, not across runs")
    if not have_llama:
        print("llama.cpp: llama_cpp (llama-cpp-python) is not installed here; its column is left out")
    for bits, qtype in ((4, "Q4_0"), (8, "Q8_0")):
        with tempfile.TemporaryDirectory() as tmp:
            model = copy.deepcopy(lm.model)
            tc.quantize_(model, tc.QuantScheme(bits=bits, group_size=32, symmetric=True), ignore=["lm_head"])
            export_onnx(model, lm.tokenizer, Path(tmp) / "onnx")
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(Path(tmp) / "onnx" / "model.onnx"), so, providers=["CPUExecutionProvider"])
            gcfg = og.Config(str(Path(tmp) / "onnx"))
            gcfg.clear_providers()  # CPU
            gcfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
            gmodel = og.Model(gcfg)
            engines = {"torchcompress": lambda: decode_torch(model, ids, args.new_tokens),
                       "onnxruntime": lambda: decode_ort(sess, model.config, ids, args.new_tokens),
                       "onnxruntime-genai": lambda: decode_genai(gmodel, ids, args.new_tokens)}
            if have_llama:
                from llama_cpp import Llama

                from torchcompress.formats.gguf_write import export_gguf

                gguf = Path(tmp) / f"smollm2-{qtype}.gguf"
                export_gguf(lm.model, lm.tokenizer, gguf, qtype, pure=True, leave_output=True,
                            tokenizer_from=default_gguf_path())
                llm = Llama(str(gguf), n_threads=args.threads, n_ctx=512, logits_all=True, verbose=False)
                engines["llama.cpp"] = lambda: decode_llama_cpp(llm, ids, args.new_tokens)
            rel = 0.0  # agreement first: onnxruntime's logits vs ours on the tests' 8 prompts
            for p in PROMPTS:
                pids = lm.tokenizer(p, return_tensors="pt").input_ids
                with torch.no_grad():
                    want = model(pids).logits.numpy()
                got = sess.run(["logits"], {"input_ids": pids.numpy(), "attention_mask": np.ones(pids.shape, np.int64),
                                            **empty_past(model.config, 1)})[0]
                rel = max(rel, float(np.abs(got - want).max() / np.abs(want).max()))
            print(f"W{bits} g32 sym: onnxruntime vs torchcompress logits, 8 prompts: max |diff| / max |logit| = {rel:.2e}")
            for fn in engines.values():  # warm-up: kernels, prepacking, allocator
                fn()
            rates = {k: [] for k in engines}
            for _ in range(args.rounds):
                for k, fn in engines.items():
                    rates[k].append(fn())
            med = {k: statistics.median(v) for k, v in rates.items()}
            base = med["torchcompress"]
            print(f"W{bits} g32 sym (llama.cpp {qtype}): " + ", ".join(
                f"{k} {v:.1f} tok/s ({v / base:.2f}x)" for k, v in med.items()))


if __name__ == "__main__":
    main()
