"""Running an exported ONNX decoder in onnxruntime (prefill + KV-cache decode) and in onnxruntime-genai,
and our own model's greedy tokens, for the ONNX export tests and benchmarks/bench_onnx.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def session(folder: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(Path(folder) / "model.onnx"), so, providers=["CPUExecutionProvider"])


def empty_past(config, batch: int) -> dict:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (batch, config.num_key_value_heads, 0, head_dim)
    return {f"past_key_values.{i}.{kv}": np.zeros(shape, np.float32)
            for i in range(config.num_hidden_layers) for kv in ("key", "value")}


def ort_logits(sess, config, ids: torch.Tensor) -> np.ndarray:
    """(1, S) token ids -> (1, S, V) logits of one prefill with an empty cache."""
    feeds = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": np.ones(ids.shape, np.int64),
             **empty_past(config, ids.shape[0])}
    return sess.run(["logits"], feeds)[0]


def ort_greedy(sess, config, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens: one prefill, then ``steps - 1`` single-token decode steps feeding present -> past."""
    names = [o.name for o in sess.get_outputs()]
    past = empty_past(config, 1)
    cur = ids.numpy().astype(np.int64)
    total = cur.shape[1]
    out = []
    for _ in range(steps):
        feeds = {"input_ids": cur, "attention_mask": np.ones((1, total), np.int64), **past}
        res = dict(zip(names, sess.run(names, feeds)))
        tok = int(res["logits"][0, -1].argmax())
        out.append(tok)
        past = {k.replace("present.", "past_key_values."): v for k, v in res.items() if k.startswith("present.")}
        cur = np.array([[tok]], np.int64)
        total += 1
    return out


@torch.no_grad()
def torch_greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    """Our model's greedy tokens (plain argmax, EOS included, as :func:`ort_greedy`) with its own KV cache."""
    import inspect

    from transformers import DynamicCache

    cache = DynamicCache()  # filled in place by each forward
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cur, out = ids, []
    for _ in range(steps):
        tok = int(model(cur, use_cache=True, **{kw: cache}).logits[0, -1].argmax())
        out.append(tok)
        cur = torch.tensor([[tok]])
    return out


def check_genai(got: list[int], want: list[int], eos) -> None:
    """onnxruntime-genai stops at EOS: its tokens are ours up to and including the first EOS."""
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    stop = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))
    assert got == want[:stop], (got, want)


def genai_greedy(folder: Path, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai loading the exported folder (its own config and cache);
    it stops at an EOS token of genai_config.json."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=ids.shape[1] + steps)
    gen = og.Generator(model, params)
    gen.append_tokens(ids[0].tolist())
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out
