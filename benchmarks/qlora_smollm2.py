"""A short (Q)LoRA run on SmolLM2-135M: held-out loss before/after, adapter size, peak memory.

Base ``w4``: every decoder Linear RTN-quantized to 4 bits (asymmetric, group 64) and frozen;
``float``: the float model frozen (plain LoRA, for the memory comparison). LoRA r=16, alpha=32 on
q/k/v/o/gate/up/down. Training text: license texts other than the GPL-3 used for perplexity
elsewhere (Apache-2.0, MPL-2.0, MPL-1.1), cut into 256-token windows; every 8th window is held out.
Peak memory is the process's max RSS (run each base in its own process; for QLoRA's memory, load a
saved W4 model with ``--base-dir`` so the float weights are never in memory)::

    HF_HUB_OFFLINE=1 python benchmarks/qlora_smollm2.py --base w4 --steps 30 --out qlora.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from torchcompress import QuantScheme, quantize_
from torchcompress.eval.size import model_bytes
from torchcompress.lowrank import LoRAConfig
from torchcompress.lowrank.lora import add_lora_, lora_parameters
from torchcompress.models import load_model

TEXTS = ["/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/MPL-2.0", "/usr/share/common-licenses/MPL-1.1"]
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def _loss(model, ids, bs=4) -> float:
    model.eval()
    total = 0.0
    for i in range(0, ids.shape[0], bs):
        total += float(model(input_ids=ids[i:i + bs], labels=ids[i:i + bs]).loss) * ids[i:i + bs].shape[0]
    return total / ids.shape[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", choices=("w4", "float"), default="w4")
    p.add_argument("--base-dir", help="w4: load this saved `compress` output (W4 g64 asym) instead of quantizing "
                   "the float model here, so the float weights never occupy memory (for peak RSS)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = load_model(a.base_dir if a.base == "w4" and a.base_dir else "default")
    model, tok = lm.model.eval(), lm.tokenizer
    text = "\n\n".join(open(t, encoding="utf-8").read() for t in TEXTS)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // a.seq_len
    windows = ids[: n * a.seq_len].view(n, a.seq_len)
    held = torch.arange(n) % 8 == 7
    train, test = windows[~held], windows[held]
    float_bytes = model_bytes(model) if not a.base_dir else None
    if a.base == "w4" and not a.base_dir:
        quantize_(model, QuantScheme(bits=4, group_size=64, symmetric=False))
    torch.manual_seed(0)
    add_lora_(model, LoRAConfig(targets=ALL, r=16, alpha=32))
    params = lora_parameters(model)
    before = _loss(model, test)
    opt = torch.optim.AdamW(params, lr=a.lr)
    g = torch.Generator().manual_seed(0)
    t0, curve = time.perf_counter(), []
    model.train()
    for step in range(a.steps):
        batch = train[torch.randint(0, train.shape[0], (a.batch,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(round(float(loss), 4))
        print(f"step {step} loss {float(loss):.4f}", flush=True)
    train_s = time.perf_counter() - t0
    after = _loss(model, test)
    row = {"base": a.base, "steps": a.steps, "lr": a.lr, "batch": a.batch, "seq_len": a.seq_len,
           "train_windows": int(train.shape[0]), "heldout_windows": int(test.shape[0]), "texts": TEXTS,
           "heldout_loss_before": round(before, 4), "heldout_loss_after": round(after, 4),
           "train_loss_curve": curve, "adapter_params": sum(x.numel() for x in params),
           "model_bytes": model_bytes(model), "float_model_bytes": float_bytes,
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "train_seconds": round(train_s, 1), "threads": torch.get_num_threads()}
    print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
