"""Our SmolLM2 .gguf exports vs llama.cpp's own quantization of the same float weights, run in llama.cpp.

    HF_HUB_OFFLINE=1 python benchmarks/gguf_llamacpp_ppl.py --out out/gguf-cmp --windows 16 --seq-len 512

1. export the default model (float weights) to F32, Q8_0 and Q4_K_M with torchcompress;
2. quantize the F32 file to Q8_0 and Q4_K_M with llama.cpp (``llama_model_quantize``, llama-cpp-python);
3. load each file in llama.cpp and measure perplexity on the same token windows (llama.cpp's own
   tokenizer), print a short greedy completion, and count tensors whose bytes are identical.
Needs ``pip install llama-cpp-python`` (builds llama.cpp from source).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import time
from pathlib import Path

import numpy as np


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int) -> float:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = threads
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return time.perf_counter() - t


def perplexity(path: Path, text: str, windows: int, seq_len: int, threads: int) -> tuple[float, str]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=seq_len, n_batch=seq_len, logits_all=True, n_threads=threads, verbose=False)
    toks = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    nll, count = 0.0, 0
    for w in range(windows):
        chunk = toks[w * seq_len : (w + 1) * seq_len]
        if len(chunk) < seq_len:
            raise SystemExit(f"text too short for {windows} windows of {seq_len}")
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: seq_len], dtype=np.float64)  # (T, V)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        lp = logits[np.arange(seq_len - 1), chunk[1:]] - logz[: seq_len - 1]
        nll -= lp.sum()
        count += seq_len - 1
    llm.reset()
    out = llm("The capital of France is", max_tokens=16, temperature=0.0)["choices"][0]["text"]
    return math.exp(nll / count), out


def same_bytes(a: Path, b: Path) -> tuple[int, int, int]:
    from torchcompress.formats.gguf_read import read_gguf

    ga, gb = read_gguf(a), read_gguf(b)
    same = same_type = 0
    for name, ta in ga.tensors.items():
        tb = gb.tensors[name]
        if ta.qtype == tb.qtype:
            same_type += 1
            same += int(bool((ga.tensor_bytes(name) == gb.tensor_bytes(name)).all()))
    return same, same_type, len(ga.tensors)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/gguf-cmp")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from torchcompress.eval.text import load_text
    from torchcompress.formats.gguf_write import export_gguf
    from torchcompress.models import default_gguf_path, load_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model("default")
    files = {}
    for qt in ["F32", "Q8_0", "Q4_K_M"]:
        f = out / f"ours.{qt}.gguf"
        t = time.perf_counter()
        export_gguf(lm.model, lm.tokenizer, f, qt, tokenizer_from=default_gguf_path())
        print(f"torchcompress export {qt}: {time.perf_counter() - t:.1f} s, {f.stat().st_size} bytes (torch threads {torch.get_num_threads()})", flush=True)
        files[f"ours {qt}"] = f
    for qt, ft in [("Q8_0", 7), ("Q4_K_M", 15)]:
        f = out / f"llamacpp.{qt}.gguf"
        dt = llama_quantize(files["ours F32"], f, ft, a.threads)
        print(f"llama.cpp quantize F32 -> {qt}: {dt:.1f} s, {f.stat().st_size} bytes", flush=True)
        files[f"llama.cpp {qt}"] = f
    for qt in ["Q8_0", "Q4_K_M"]:
        s, st, n = same_bytes(files[f"ours {qt}"], files[f"llama.cpp {qt}"])
        print(f"{qt}: {st}/{n} tensors of the same type, {s} of them byte-identical", flush=True)
    text, desc = load_text("pydoc")
    print(f"perplexity: {desc}, {a.windows} windows x {a.seq_len} tokens, llama.cpp tokenizer and runtime")
    for label, f in files.items():
        ppl, sample = perplexity(f, text, a.windows, a.seq_len, a.threads)
        print(f"  {label:18s} ppl {ppl:8.4f}   'The capital of France is' -> {sample!r}", flush=True)


if __name__ == "__main__":
    main()
