"""Greedy decoding speed of SmolLM2-135M-Instruct on CPU through transformers: float vs W4 (and Q4_0).

Variants, all built from the same float model and timed interleaved in one process (round r times
every variant once), median over rounds:

* ``float``        the unmodified fp32 model;
* ``W4 g128``      every Linear but lm_head -> QuantLinear (RTN, 4 bits, group 128, symmetric), default
                   kernels (the native CPU extension when it builds);
* ``W4 g128 dispatcher``  the same modules and kernels, every call through the custom op's dispatcher
                   (in inference the modules call the op's implementation directly);
* ``W4 g128 ref``  the same modules, forced onto the pure-PyTorch reference (TORCHCOMPRESS_KERNEL);
* ``Q4_0``         every Linear but lm_head -> GGUFLinear Q4_0, when torchcompress.nn.gguf_linear exists;
* ``Q4_K_M``       every Linear but lm_head -> GGUFLinear with llama.cpp's Q4_K_M mix of block types;
* ``llama.cpp``    the bundled .gguf through llama-cpp-python, when installed (its own weights file,
                   so not the same quantization; printed for orientation only).

Decode tokens/s = (new_tokens - 1) / (time(new_tokens) - time(1 token)): the prompt's prefill is
subtracted out. The W4 outputs are also checked to be the same tokens with either kernel.

    HF_HUB_OFFLINE=1 python benchmarks/bench_generate.py --new-tokens 32 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn as nn

PROMPT = "Write a short paragraph about why the sky is blue, for a curious ten-year-old."


def quantize_w4(model: nn.Module) -> nn.Module:
    import torchcompress as tc

    return tc.quantize_(model, tc.RTNConfig(tc.QuantScheme(bits=4, group_size=128, symmetric=True)), ignore=["lm_head"])


def quantize_q4_0(model: nn.Module):
    try:
        from torchcompress.nn.gguf_linear import GGUFLinear
        from torchcompress.primitives.gguf_common import GGMLType
    except ImportError as e:
        return None, f"skipped ({e})"
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not full.endswith("lm_head"):
                setattr(mod, child_name, GGUFLinear.from_linear(child, GGMLType.Q4_0, name=full))
    return model, ""


def quantize_q4_k_m(model: nn.Module):
    """llama.cpp's Q4_K_M mix (torchcompress.quant.gguf): on SmolLM2 Q5_0 for the 576-wide inputs
    (not a multiple of 256), Q4_K/Q6_K for ffn_down, Q8_0 for some attn_v; lm_head stays float as
    in the other variants."""
    try:
        from torchcompress.quant.gguf import quantize_gguf_
        from torchcompress.quant.gguf_config import GGUFConfig
    except ImportError as e:
        return None, f"skipped ({e})"
    return quantize_gguf_(model, GGUFConfig("Q4_K_M"), ignore=["lm_head", "re:.*embed.*"]), ""


class Forced:
    """Runs with TORCHCOMPRESS_KERNEL set to ``kernel`` (the op reads it per call). ``"dispatcher"``:
    the default kernels, but QuantLinear sends every call through the custom op's dispatcher instead
    of calling the op's implementation directly (what inference did before it skipped the dispatcher)."""

    def __init__(self, kernel: str | None):
        self.kernel = kernel

    def __enter__(self):
        if self.kernel == "dispatcher":
            import torchcompress.nn.quant_linear as ql

            self.ql, self.run_op = ql, ql.run_op
            ql.run_op = lambda op, impl, x, *args: op(x, *args)
            return
        self.old = os.environ.get("TORCHCOMPRESS_KERNEL")
        if self.kernel is not None:
            os.environ["TORCHCOMPRESS_KERNEL"] = self.kernel

    def __exit__(self, *exc):
        if self.kernel == "dispatcher":
            self.ql.run_op = self.run_op
        elif self.old is None:
            os.environ.pop("TORCHCOMPRESS_KERNEL", None)
        else:
            os.environ["TORCHCOMPRESS_KERNEL"] = self.old


GRAD_MODE = torch.inference_mode  # --no-grad: torch.no_grad, the mode transformers' generate() sets itself


def generate(model, ids, n: int, kernel: str | None) -> tuple[float, torch.Tensor]:
    with Forced(kernel), GRAD_MODE():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, out[0, ids.shape[1]:]


def llama_cpp_runner(n: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None, "skipped (llama-cpp-python not installed)"
    from torchcompress.models import default_gguf_path

    path = default_gguf_path()
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
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
    ap.add_argument("--skip-reference", action="store_true", help="leave out the slow W4 reference variant")
    ap.add_argument("--no-grad", action="store_true",
                    help="generate under torch.no_grad (as a plain model.generate() call runs) instead of inference_mode")
    args = ap.parse_args(argv)
    global GRAD_MODE
    if args.no_grad:
        GRAD_MODE = torch.no_grad
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from torchcompress.models import load_model

    loaded = load_model("default")
    base = loaded.model.float().eval()
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    w4 = quantize_w4(copy.deepcopy(base)).eval()
    variants = {"float": (base, None), "W4 g128": (w4, None), "W4 g128 dispatcher": (w4, "dispatcher")}
    if not args.skip_reference:
        variants["W4 g128 ref"] = (w4, "reference")
    q4, why_q4 = quantize_q4_0(copy.deepcopy(base))
    if q4 is not None:
        variants["Q4_0"] = (q4.eval(), None)
    qkm, why_qkm = quantize_q4_k_m(copy.deepcopy(base))
    if qkm is not None:
        variants["Q4_K_M"] = (qkm.eval(), None)
    llama_run, llama_what = llama_cpp_runner(args.new_tokens)

    n = args.new_tokens
    for model, kernel in variants.values():  # warm-up (and the extension build, once)
        generate(model, ids, 2, kernel)
    if llama_run is not None:
        llama_run(2)
    per_tok: dict[str, list[float]] = {k: [] for k in variants}
    if llama_run is not None:
        per_tok["llama.cpp"] = []
    tokens = {}
    for _ in range(args.rounds):
        for name, (model, kernel) in variants.items():
            t_n, toks = generate(model, ids, n, kernel)
            t_1, _ = generate(model, ids, 1, kernel)
            per_tok[name].append((t_n - t_1) / (n - 1))
            tokens[name] = toks
        if llama_run is not None:
            per_tok["llama.cpp"].append((llama_run(n) - llama_run(1)) / (n - 1))

    print(f"SmolLM2-135M-Instruct, greedy, prompt {ids.shape[1]} tokens, {n} new tokens, {GRAD_MODE.__name__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    base_tps = 1.0 / statistics.median(per_tok["float"])
    print(f"{'variant':>18} {'tokens/s':>9} {'vs float':>9}")
    for name, v in per_tok.items():
        tps = 1.0 / statistics.median(v)
        print(f"{name:>18} {tps:>9.1f} {tps / base_tps:>8.2f}x")
    if q4 is None:
        print(f"Q4_0: {why_q4}")
    if qkm is None:
        print(f"Q4_K_M: {why_qkm}")
    else:
        kinds = sorted({m.qtype.name for m in qkm.modules() if hasattr(m, "qtype")})
        print(f"Q4_K_M block types used: {', '.join(kinds)}")
    if llama_run is None:
        print(f"llama.cpp: {llama_what}")
    else:
        print(f"llama.cpp ran {llama_what} (its own quantization; orientation only)")
    if "W4 g128 ref" in tokens:
        same = torch.equal(tokens["W4 g128"], tokens["W4 g128 ref"])
        print(f"W4 greedy tokens identical with native and reference kernels: {same}")
    same = torch.equal(tokens["W4 g128"], tokens["W4 g128 dispatcher"])
    print(f"W4 greedy tokens identical called directly and through the dispatcher: {same}")


if __name__ == "__main__":
    main()
