"""Does the imatrix help? SmolLM2 Q4_K_M (and pure Q4_K) with and without importance weights, run in llama.cpp.

    HF_HUB_OFFLINE=1 python benchmarks/gguf_imatrix_ppl.py --out out/gguf-imatrix --calib pydoc --samples 64

1. compute the imatrix (mean squared inputs of every linear layer) from ``--calib`` text;
2. export the default model with torchcompress to each file type, without and with it;
3. perplexity of every file in llama.cpp on held-out text (``--text``, default GPL-3, windows x seq-len).
On SmolLM2 (hidden size 576, not a multiple of 256) only ffn_down (1536 columns) can hold K-quant
blocks; every other matrix falls back to a 32-weight type, which is quantized without importance.
Needs ``pip install llama-cpp-python``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/gguf-imatrix")
    ap.add_argument("--calib", default="pydoc", help="calibration source for the imatrix (not the evaluation text)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--windows", type=int, default=14)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="Q4_K_M,Q4_K_S")
    ap.add_argument("--pure", action="store_true", help="the file type's block type for every tensor that can hold it")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gguf_llamacpp_ppl import perplexity

    from torchcompress.calibration.imatrix import imatrix_from_spec, save_imatrix
    from torchcompress.formats.gguf_write import export_gguf
    from torchcompress.models import default_gguf_path, load_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model("default")
    t = time.perf_counter()
    imat = imatrix_from_spec(a.calib, lm.model, lm.tokenizer, num_samples=a.samples, seq_len=a.seq_len)
    save_imatrix(imat, out / "smollm2.imatrix.safetensors")
    print(f"imatrix from {a.calib} ({a.samples} x {a.seq_len} tokens): {len(imat)} layers, {time.perf_counter() - t:.1f} s", flush=True)
    text = Path(a.text).read_text(encoding="utf-8", errors="replace")
    rows = []
    for qt in a.types.split(","):
        for label, imp in (("plain", None), ("imatrix", imat)):
            f = out / f"smollm2.{qt}{'.pure' if a.pure else ''}.{label}.gguf"
            t = time.perf_counter()
            res = export_gguf(lm.model, lm.tokenizer, f, qt, pure=a.pure, tokenizer_from=default_gguf_path(), importance=imp)
            dt = time.perf_counter() - t
            ppl, sample = perplexity(f, text, a.windows, a.seq_len, a.threads)
            kq = sum(1 for n, ty in res.types.items() if ty.name.endswith("_K") and n != "token_embd.weight")
            rows.append((qt, label, ppl, dt, kq, sample))
            print(f"{qt:8s} {label:8s} ppl {ppl:8.3f}  export {dt:5.1f} s  ({kq} K-quant matrices)  {sample!r}", flush=True)
    print(f"\nperplexity in llama.cpp on {a.text}, {a.windows} x {a.seq_len} tokens:")
    for qt in a.types.split(","):
        p = {lab: ppl for q, lab, ppl, *_ in rows if q == qt}
        print(f"  {qt:8s} plain {p['plain']:.3f}  imatrix {p['imatrix']:.3f}  ({(p['imatrix'] / p['plain'] - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
