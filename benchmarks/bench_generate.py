"""CPU greedy decoding speed of SmolLM2-135M-Instruct: our decoder beside llama.cpp on the same file.

SmolLM2 is exported to Q4_0 by our own exporter (``export --format gguf --qtype Q4_0``); that one
file is decoded by llama.cpp (llama-cpp-python, where installed) and by us, loaded with its blocks
kept (``load_model(..., keep_quantized=True)``: GGUFLinear layers and a Q8_0 output projection, as
llama.cpp quantizes it). Variants, all timed interleaved in one process (round r times every variant
once), median over rounds:

* ``llama.cpp Q4_0``      the exported file through llama.cpp;
* ``Q4_0 runtime``        the same file through :mod:`torchcompress.runtime` (static KV cache, each
                          decode step one native call: ``DecodePlan``, one OpenMP region per step);
* ``Q4_0 per-op``         the same decoder with the step run op by op from Python (layers bound to the
                          native kernels, one parallel region per linear layer): ``TORCHCOMPRESS_DECODE_STEP=0``;
* ``Q4_0 generate``       the same modules through transformers' ``generate()``;
* ``W4 g128 runtime``     the float model quantized in memory: RTN 4 bits, group 128, symmetric, on
                          every Linear, with the output projection at 8 bits per channel (the tied
                          embedding stays float for the lookup);
* ``float runtime`` / ``float generate``   the unquantized fp32 model.

Decode tokens/s = (new_tokens - 1) / (time(new_tokens) - time(1 token)): the prompt's prefill is
subtracted out. Printed: tokens/s, the ratio to llama.cpp's, and the process CPU time per token
(steadier than wall time when other work shares the cores). Checked: every runtime variant's tokens
equal transformers' ``generate()`` with the pure-PyTorch reference kernels on the same modules
(``TORCHCOMPRESS_KERNEL=reference``).

    HF_HUB_OFFLINE=1 python benchmarks/bench_generate.py --new-tokens 32 --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "Write a short paragraph about why the sky is blue, for a curious ten-year-old."


class Forced:
    """TORCHCOMPRESS_KERNEL set to ``kernel`` for the duration (the ops read it per call)."""

    def __init__(self, kernel: str | None):
        self.kernel = kernel

    def __enter__(self):
        self.old = os.environ.get("TORCHCOMPRESS_KERNEL")
        if self.kernel is not None:
            os.environ["TORCHCOMPRESS_KERNEL"] = self.kernel

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("TORCHCOMPRESS_KERNEL", None)
        else:
            os.environ["TORCHCOMPRESS_KERNEL"] = self.old


def hf_generate(model, ids, n: int, eos: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=eos)
    return out[0, ids.shape[1]:]


def runtime_generate(model, ids, n: int, eos: int) -> torch.Tensor:
    from torchcompress.runtime import generate

    return generate(model, ids, n, eos_token_id=eos, min_new_tokens=n)[0, ids.shape[1]:]


def per_op_generate(model, ids, n: int, eos: int) -> torch.Tensor:
    old = os.environ.get("TORCHCOMPRESS_DECODE_STEP")
    os.environ["TORCHCOMPRESS_DECODE_STEP"] = "0"
    try:
        return runtime_generate(model, ids, n, eos)
    finally:
        if old is None:
            os.environ.pop("TORCHCOMPRESS_DECODE_STEP")
        else:
            os.environ["TORCHCOMPRESS_DECODE_STEP"] = old


def quantize_w4_w8_head(model):
    import torchcompress as tc

    tc.quantize_(model, tc.RTNConfig(tc.QuantScheme(bits=8, granularity="channel", symmetric=True)),
                 targets=["lm_head"], ignore=[])
    return tc.quantize_(model, tc.RTNConfig(tc.QuantScheme(bits=4, group_size=128, symmetric=True)), ignore=["lm_head"])


def llama_cpp_runner(path: Path, threads: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None, "skipped (llama-cpp-python not installed)"
    # n_batch 1: the prompt goes through llama.cpp's one-token path too (a multi-token batch crashed
    # llama-cpp-python 0.3.36's AMX build on this machine); decode speed is unaffected, and the
    # prefill is subtracted out below
    llm = Llama(model_path=str(path), n_ctx=512, n_batch=1, n_ubatch=1, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    toks = llm.tokenize(PROMPT.encode())

    def run(k: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        for i, _ in enumerate(llm.generate(toks, top_k=1, temp=0.0)):
            if i + 1 >= k:
                break
        return time.perf_counter() - t0

    return run, path.name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-reference", action="store_true", help="leave out the token check on the reference kernels")
    ap.add_argument("--skip-generate", action="store_true", help="leave out the transformers generate() variants")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from torchcompress.cli import main as cli
    from torchcompress.models import load_model

    tmp = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    gguf = tmp / "smollm2-q4_0.gguf"
    assert cli(["export", "--model", "default", "--format", "gguf", "--qtype", "Q4_0", "--out", str(gguf)]) == 0
    q4 = load_model(gguf, keep_quantized=True)
    ids = q4.tokenizer(PROMPT, return_tensors="pt").input_ids
    eos = int(q4.model.config.eos_token_id)
    base = load_model("default").model.float().eval()
    w4 = quantize_w4_w8_head(copy.deepcopy(base)).eval()

    variants = {"Q4_0 runtime": (runtime_generate, q4.model), "Q4_0 per-op": (per_op_generate, q4.model),
                "W4 g128 runtime": (runtime_generate, w4), "W4 g128 per-op": (per_op_generate, w4),
                "float runtime": (runtime_generate, base)}
    if not args.skip_generate:
        variants.update({"Q4_0 generate": (hf_generate, q4.model), "float generate": (hf_generate, base)})
    llama_run, llama_what = llama_cpp_runner(gguf, torch.get_num_threads())

    n = args.new_tokens
    for fn, model in variants.values():  # warm-up (and the extension build, once)
        fn(model, ids, 2, eos)
    if llama_run is not None:
        llama_run(2)
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    if llama_run is not None:
        wall["llama.cpp Q4_0"], cpu["llama.cpp Q4_0"] = [], []
    tokens = {}
    for _ in range(args.rounds):
        for name, (fn, model) in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            toks = fn(model, ids, n, eos)
            c1, t1 = time.process_time(), time.perf_counter()
            fn(model, ids, 1, eos)
            c2, t2 = time.process_time(), time.perf_counter()
            wall[name].append(((t1 - t0) - (t2 - t1)) / (n - 1))
            cpu[name].append(((c1 - c0) - (c2 - c1)) / (n - 1))
            tokens[name] = toks
        if llama_run is not None:
            c0 = time.process_time()
            a = llama_run(n)
            c1 = time.process_time()
            b = llama_run(1)
            c2 = time.process_time()
            wall["llama.cpp Q4_0"].append((a - b) / (n - 1))
            cpu["llama.cpp Q4_0"].append(((c1 - c0) - (c2 - c1)) / (n - 1))

    print(f"SmolLM2-135M-Instruct, greedy, prompt {ids.shape[1]} tokens, {n} new tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    ref = 1.0 / statistics.median(wall["llama.cpp Q4_0"]) if llama_run is not None else None
    print(f"{'variant':>18} {'tokens/s':>9} {'vs llama.cpp':>13} {'CPU ms/token':>13}")
    for name in wall:
        tps = 1.0 / statistics.median(wall[name])
        rel = f"{tps / ref:.2f}x" if ref else "-"
        print(f"{name:>18} {tps:>9.1f} {rel:>13} {statistics.median(cpu[name]) * 1e3:>13.1f}")
    if llama_run is None:
        print(f"llama.cpp: {llama_what}")
    else:
        print(f"llama.cpp ran {llama_what}, the file our Q4_0 variants load")
    if not args.skip_reference:
        with Forced("reference"):
            for name, model in (("Q4_0 runtime", q4.model), ("Q4_0 per-op", q4.model), ("W4 g128 runtime", w4),
                                ("W4 g128 per-op", w4), ("float runtime", base)):
                same = torch.equal(tokens[name], hf_generate(model, ids, n, eos))
                print(f"{name}: tokens equal transformers generate() on the reference kernels: {same}")


if __name__ == "__main__":
    main()
