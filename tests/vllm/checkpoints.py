"""The SmolLM2 checkpoints the vLLM tests serve: one per scheme, compressed with torchcompress and
written through the explicit export functions (``save_compressed_tensors`` / ``save_gptq``, what
``torchcompress export --format compressed-tensors|gptq`` calls), plus the transformers float32
reference run on the same exported directory.

Every SmolLM2 Linear width (576, 1536) is a multiple of 64, not of 128: the int group schemes use
group 64 (the exports refuse partial groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

_W4_G64 = """name: w4-g64-{sym_name}
stages:
  - kind: rtn
    name: linears-w4-g64
    scheme: {{bits: 4, granularity: group, group_size: 64, symmetric: {sym}, scale_dtype: float16}}
    targets: [Linear]
    ignore: [lm_head]
"""

_W8_CHANNEL = """name: w8-channel
stages:
  - kind: rtn
    name: linears-w8
    scheme: {bits: 8, granularity: channel, symmetric: true, scale_dtype: float16}
    targets: [Linear]
    ignore: [lm_head]
"""

# the bundled w4-gptq-g128 (static act-order groups, 1% damping, blocks of 128) at group 64
_GPTQ_G64 = """name: w4-gptq-g64
stages:
  - kind: gptq
    name: linears-w4-g64-gptq
    scheme: {bits: 4, granularity: group, group_size: 64, symmetric: true, scale_dtype: float16}
    block_size: 128
    damp: 0.01
    act_order: true
    static_groups: true
    targets: [Linear]
    ignore: [lm_head]
"""


@dataclass(frozen=True)
class Scheme:
    name: str
    recipe: str  # YAML text, or a bundled recipe's name
    export: str  # "compressed-tensors" | "gptq"


SCHEMES = {s.name: s for s in (
    Scheme("w4-g64-sym", _W4_G64.format(sym_name="sym", sym="true"), "compressed-tensors"),
    Scheme("w4-g64-asym", _W4_G64.format(sym_name="asym", sym="false"), "compressed-tensors"),
    Scheme("w8-channel", _W8_CHANNEL, "compressed-tensors"),
    Scheme("w4-gptq-g64", _GPTQ_G64, "gptq"),
    Scheme("fp8-w8a8", "fp8-w8a8", "compressed-tensors"),
    Scheme("int8-w8a8-smoothquant", "w8a8-int8-smoothquant", "compressed-tensors"),
)}

# Calibration for GPTQ / SmoothQuant: 16 x 256 tokens of pydoc (small, so the suite stays minutes; the
# tests compare engines on one checkpoint, not the checkpoint's quality)
CALIB_SAMPLES, CALIB_SEQ_LEN = 16, 256


def build(scheme: Scheme, out: Path) -> Path:
    """Compress SmolLM2 (float32) with ``scheme`` and export it to ``out``."""
    from torchcompress.calibration import CalibrationConfig, build_calibration
    from torchcompress.formats.compressed_tensors import save_compressed_tensors
    from torchcompress.formats.gptq import save_gptq
    from torchcompress.models import load_model
    from torchcompress.recipe.runner import compress
    from torchcompress.recipe.schema import load_recipe, parse_recipe

    recipe = parse_recipe(scheme.recipe, scheme.name) if "\n" in scheme.recipe else load_recipe(scheme.recipe)
    lm = load_model("default")
    calib = None
    if any(getattr(s.config, "needs_calibration", False) for s in recipe.stages):
        cfg = CalibrationConfig(sources=("pydoc",), num_samples=CALIB_SAMPLES, seq_len=CALIB_SEQ_LEN)
        calib = build_calibration(cfg, lm.model, lm.tokenizer)
    compress(lm.model, recipe, calib)
    save = save_gptq if scheme.export == "gptq" else save_compressed_tensors
    return save(lm.model, out, tokenizer=lm.tokenizer)


def load_reference(scheme: Scheme, path: Path):
    """The exported checkpoint in float32, loaded by transformers: compressed-tensors through
    transformers' own compressed-tensors quantizer (torchcompress not involved); GPTQ through
    torchcompress's reader (transformers needs gptqmodel for GPTQ, which is not installed)."""
    if scheme.export == "gptq":
        from torchcompress.formats.gptq import load_gptq

        return load_gptq(path).float().eval()
    import json

    groups = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"].values()
    if any((g.get("weights") or {}).get("symmetric") is False for g in groups):
        # transformers 5.25 + compressed-tensors 0.20.1 cannot load asymmetric pack-quantized (an upstream
        # defect: the zero point's packed shape): our reader of the same files, float32 compute
        from torchcompress.formats.checkpoint import load_compressed

        return load_compressed(path).float().eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens (EOS not special, as vLLM's ``ignore_eos``), full forward each step."""
    ids = torch.tensor([prompt])
    out = []
    for _ in range(n):
        nxt = int(model(ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@torch.no_grad()
def greedy_top(model, prompt: list[int], n: int, k: int = 5) -> tuple[list[int], list[tuple[list[int], list[float]]]]:
    """:func:`greedy`'s tokens, plus at each step the model's ``k`` most likely tokens and their
    log-probabilities (float32), best first: what tells a near-tie from a real disagreement."""
    ids = torch.tensor([prompt])
    out, tops = [], []
    for _ in range(n):
        logp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
        top = logp.topk(k)
        nxt = int(top.indices[0])
        out.append(nxt)
        tops.append((top.indices.tolist(), top.values.tolist()))
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, tops


@torch.no_grad()
def teacher_forced_logprobs(model, seq: list[int]) -> list[float]:
    """log p(seq[t] | seq[:t]) for t >= 1 (float32)."""
    ids = torch.tensor([seq])
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    return logp.gather(1, ids[0, 1:, None])[:, 0].tolist()
