"""How compression cost grows with model size: random-initialised Llama checkpoints of real shapes.

    python benchmarks/bench_scale.py --shapes 135m,1b,8b --jobs w4-rtn,gguf --root /tmp/scale
    python benchmarks/bench_scale.py --shapes 1b --jobs w4-gptq,w4-gptq-offload --root /tmp/scale

``--write`` (implied when a checkpoint is missing) writes each shape as bf16 safetensors shards with
an index, one tensor in memory at a time (values ~ N(0, 0.02), seeded), plus a pre-tokenized
calibration file (64 x 512 tokens of Python's documentation, ids folded into the vocabulary). Then
each job runs the CLI in a fresh process (``/usr/bin/time``-free: peak RSS from the child's
rusage) and prints wall time, peak RSS and the ratios to the smallest shape. Quality needs real
weights: it is measured on SmolLM2 elsewhere; these checkpoints measure memory and time only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# Llama-family shapes (hidden, intermediate, layers, heads, kv heads, vocab, tied). 1b: TinyLlama's
# blocks with SmolLM2's 49152-token vocabulary (2.34 GB in bf16), so the bundled tokenizer fits it.
SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
SHARD_BYTES = 2 * 2**30


def write_checkpoint(shape: str, out: Path, seed: int = 0, layers: int | None = None) -> Path:
    """``layers``: keep the shape's blocks but only that many of them (a shorter run of the same blocks)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from torchcompress.formats.atomic import atomic_directory
    from torchcompress.pipeline.shards import INDEX_NAME, write_safetensors

    spec = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    cfg = LlamaConfig(**spec, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      dtype="bfloat16")
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    names = [(k, tuple(t.shape)) for k, t in model.state_dict().items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    gen = torch.Generator().manual_seed(seed)
    with atomic_directory(out) as tmp:
        cfg.save_pretrained(tmp)
        shards, cur, size = [], [], 0
        for k, shp in names:  # group names into ~2 GB shards, in order
            n = 2 * int(torch.tensor(shp).prod())
            if cur and size + n > SHARD_BYTES:
                shards.append(cur)
                cur, size = [], 0
            cur.append((k, shp))
            size += n
        shards.append(cur)
        weight_map, total = {}, 0
        for i, group in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for k, shp in group:
                if k.endswith("norm.weight"):
                    tensors[k] = torch.ones(shp, dtype=torch.bfloat16)
                else:
                    tensors[k] = (torch.randn(shp, generator=gen) * 0.02).to(torch.bfloat16)
                weight_map[k] = fname
            total += sum(t.numel() * 2 for t in tensors.values())
            write_safetensors(tmp / fname, tensors, {"format": "pt"})
            del tensors
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        _copy_tokenizer(tmp)
    return out


def _copy_tokenizer(d: Path) -> None:
    """SmolLM2's tokenizer (the CLI wants one beside a model); the calibration file is pre-tokenized."""
    from transformers import AutoTokenizer

    from torchcompress.models import _default_dir

    AutoTokenizer.from_pretrained(str(_default_dir())).save_pretrained(d)


def write_calibration(path: Path, vocab: int, samples: int = 64, seq_len: int = 512) -> Path:
    import pydoc_data.topics
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from torchcompress.models import _default_dir

    tok = AutoTokenizer.from_pretrained(str(_default_dir()))
    text = "\n".join(pydoc_data.topics.topics.values())
    ids = tok(text, return_tensors="pt").input_ids[0][: samples * seq_len] % vocab
    ids = ids.view(samples, seq_len).clone()
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(path))
    return path


JOBS = {
    "w4-rtn": ["compress", "--recipe", "w4-rtn"],
    "w4-gptq": ["compress", "--recipe", "w4-gptq-g128", "--calib-samples", "64", "--seq-len", "512"],
    "w4-gptq-offload": ["compress", "--recipe", "w4-gptq-g128", "--calib-samples", "64", "--seq-len", "512", "--offload-dir", "{tmp}/act"],
    "gguf": ["export", "--format", "gguf", "--qtype", "Q4_K_M"],
}


def run_job(job: str, shape: str, root: Path, device: str) -> dict:
    ckpt = root / f"llama-{shape}"
    out = root / f"out-{shape}-{job}"
    args = [a.replace("{tmp}", str(root)) for a in JOBS[job]]
    cmd = [sys.executable, "-m", "torchcompress", *args, "--model", str(ckpt)]
    if job == "gguf":
        cmd += ["--out", f"{out}.gguf"]
    else:
        cmd += ["--out", str(out), "--device", device, "--json", f"{out}.json"]
        if "gptq" in job:
            cmd += ["--calib", str(root / f"calib-{shape}.safetensors")]
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = {"shape": shape, "job": job, "wall_s": wall, "peak_rss_gib": peak * 1024 / 2**30,
           "rss_note": "" if peak > before else "(peak not above an earlier child's)"}
    jf = Path(f"{out}.json")
    if jf.is_file():
        d = json.loads(jf.read_text())
        res["peak_rss_gib"] = d.get("peak_rss_bytes", peak * 1024) / 2**30  # the job's own peak
        if "peak_cuda_bytes" in d:
            res["peak_cuda_gib"] = d["peak_cuda_bytes"] / 2**30
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="135m,1b")
    ap.add_argument("--jobs", default="w4-rtn,gguf")
    ap.add_argument("--root", default="/tmp/torchcompress-scale")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write", action="store_true", help="rewrite the checkpoints even if present")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        ckpt = root / f"llama-{shape}"
        if args.write or not (ckpt / "config.json").is_file():
            t0 = time.perf_counter()
            write_checkpoint(shape, ckpt)
            print(f"wrote {ckpt} in {time.perf_counter() - t0:.0f}s", flush=True)
        calib = root / f"calib-{shape}.safetensors"
        if not calib.is_file():
            write_calibration(calib, SHAPES[shape]["vocab_size"])
        for job in args.jobs.split(","):
            rows.append(run_job(job, shape, root, args.device))
    params = {s: _params(s) for s in SHAPES}
    print("\n| shape | params | job | wall s | peak RSS GiB | wall / smallest | params / smallest |")
    print("|---|---|---|---|---|---|---|")
    first = {}
    for r in rows:
        f = first.setdefault(r["job"], r)
        print(f"| {r['shape']} | {params[r['shape']] / 1e9:.2f}B | {r['job']} | {r['wall_s']:.0f} | {r['peak_rss_gib']:.2f} | "
              f"{r['wall_s'] / f['wall_s']:.2f} | {params[r['shape']] / params[f['shape']]:.2f} |")


def _params(shape: str) -> int:
    s = SHAPES[shape]
    h, i, n, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * per + v * h * (1 if s["tie_word_embeddings"] else 2) + h


if __name__ == "__main__":
    main()
