"""Export to (and read back) the GPTQ checkpoint format that AutoGPTQ/GPTQModel, transformers and
vLLM load (``quant_method: gptq``, ``checkpoint_format: gptq``, the "v1" zero-point convention).

Per quantized Linear ``name`` (weight (N, K), G groups):

* ``name.qweight`` int32 (K*b/32, N): for each output column, the unsigned codes along K as one
  little-endian bit stream in 32-bit words (for 3 bits, 32 codes fill 3 words, codes 10 and 21
  straddling words), i.e. our :func:`..primitives.packing.pack` stream of the row, transposed;
* ``name.qzeros`` int32 (G, N*b/32): ``zero - 1`` (the v1 convention; loaders add 1 back) packed
  the same way along N; symmetric layers store ``2^(b-1) - 1``;
* ``name.scales`` fp16 (G, N); ``name.g_idx`` int32 (K,): the group of every input column;
* ``name.bias`` when the layer has one.

Asymmetric layers whose zero point is 0 somewhere cannot be written in v1 (``0 - 1`` wraps) and are
refused, as are widths where ``K*b`` or ``N*b`` is not a multiple of 32, and layers whose width is
not a multiple of the group size (a partial last group, which vLLM's GPTQ loader rejects).

``quantize_config`` describes the run from the layers' ``gptq_info`` (see ``nn/gptq_linear.py``):
``damp_percent``, ``true_sequential``, ``static_groups``, ``act_order`` and ``observer`` as the stage
ran; ``desc_act`` is true only where some layer's ``g_idx`` is not ``arange(K) // group_size``
(dynamic act-order groups; static groups keep it trivial, the layout vLLM serves). RTN layers
(``quantizer: rtn``) claim no GPTQ settings.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Granularity
from ..errors import FormatError
from ..nn.gptq_linear import GPTQLinear
from ..nn.quant_linear import QuantLinear
from ..primitives.packing import pack, unpack
from .atomic import atomic_directory
from .checkpoint import write_hf_files

log = logging.getLogger(__name__)
_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)


def _trivial_g_idx(m: QuantLinear) -> bool:
    if not isinstance(m, GPTQLinear):
        return True
    return bool(torch.equal(m.g_idx.cpu(), torch.arange(m.in_features, dtype=torch.int32) // m.group_size))


def _check_whole_groups(quant: dict) -> None:
    widths = [m.in_features for m in quant.values()]
    common = math.gcd(*widths)
    for name, m in quant.items():
        gs = m.scheme.group_size
        if m.in_features % gs:
            fits = ", ".join(str(g) for g in _GROUP_SIZES if common % g == 0) or "none of 16-1024"
            raise FormatError(name, f"in_features {m.in_features} is not a multiple of group_size {gs}: a partial "
                              f"last group, which GPTQ loaders (vLLM) reject; group sizes that divide every "
                              f"quantized layer's width here: {fits}")


def _run_metadata(quant: dict) -> dict:
    """quantize_config keys that describe how the layers were made (one value per key, or refused)."""
    infos = [getattr(m, "gptq_info", None) for m in quant.values()]
    desc_act = not all(_trivial_g_idx(m) for m in quant.values())
    if all(i is None for i in infos):
        return {"desc_act": desc_act, "static_groups": False, "quantizer": "rtn"}
    if any(i is None for i in infos):
        rtn = [n for n, m in quant.items() if getattr(m, "gptq_info", None) is None]
        raise FormatError(rtn[0], f"is RTN-quantized while other layers are GPTQ ({len(rtn)} RTN layer(s)); "
                          "the GPTQ config describes one run")
    out = {"desc_act": desc_act, "quantizer": "gptq"}
    keys = {"damp": "damp_percent", "true_sequential": "true_sequential", "static_groups": "static_groups",
            "act_order": "act_order", "observer": "observer"}
    for key, field in keys.items():
        values = {json.dumps(i.get(key)) for i in infos if key in i}
        if len(values) > 1:
            raise FormatError(field, f"the layers were quantized with different {key} settings {sorted(values)}; "
                              "the GPTQ config holds one")
        if values:
            value = json.loads(values.pop())
            if field == "damp_percent" and not (0 < value < 1):  # loaders (transformers) accept (0, 1) only
                out["torchcompress_damp"] = value
                continue
            out[field] = value
    fell = [n for n, m in quant.items() if m.gptq_info.get("fallback_rtn")]
    if fell:
        out["rtn_fallback_layers"] = fell
    if desc_act:
        log.warning("GPTQ export with dynamic act-order groups (desc_act true): vLLM refuses such checkpoints; "
                    "quantize with static_groups: true for a layout it serves")
    return out


def _words(stream: torch.Tensor) -> torch.Tensor:
    """(R, B) uint8 little-endian bit stream (B a multiple of 4) -> (R, B/4) int32."""
    return stream.contiguous().view(torch.int32)


def _bytes(words: torch.Tensor) -> torch.Tensor:
    return words.contiguous().view(torch.uint8)


def gptq_tensors(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    s, n, k = m.scheme, m.out_features, m.in_features
    bits = s.bits
    if s.granularity is not Granularity.GROUP:
        raise FormatError(name, "the GPTQ format holds group-wise layers only (use granularity: group)")
    if (k * bits) % 32 or (n * bits) % 32:
        raise FormatError(name, f"{n}x{k} at {bits} bits does not fill whole 32-bit words (GPTQ packing)")
    if m.scale.dtype != torch.float16:
        raise FormatError(name, f"GPTQ stores fp16 scales; this layer has {m.scale.dtype} (use scale_dtype: float16)")
    if m.zero is not None and m.zero.dtype != torch.uint8:
        raise FormatError(name, "has float zero points (HQQ float_zero); the GPTQ format holds integer zero points "
                          "only (quantize with float_zero: false)")
    codes = unpack(m.qweight, bits, k)  # (N, K)
    g = m.scale.shape[1]
    if m.zero is None:
        zero = torch.full((n, g), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zero = m.zero
        if bool((zero == 0).any()):
            raise FormatError(name, "has zero points equal to 0, which the GPTQ v1 format cannot store "
                              "(zero - 1 wraps); use symmetric quantization for this export")
    g_idx = m.g_idx if isinstance(m, GPTQLinear) else torch.arange(k, dtype=torch.int32) // m.group_size
    out = {f"{name}.qweight": _words(pack(codes, bits)).T.contiguous(),  # (K*b/32, N)
           f"{name}.qzeros": _words(pack((zero - 1).T.contiguous(), bits)),  # (G, N*b/32)
           f"{name}.scales": m.scale.T.to(torch.float16).contiguous(),  # (G, N)
           f"{name}.g_idx": g_idx.to(torch.int32).clone()}
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().to(torch.float16).clone()
    return out


def read_gptq_tensors(tensors: dict, name: str, bits: int, in_features: int, out_features: int):
    """Inverse of :func:`gptq_tensors`: ``(codes (N, K) uint8, scale (N, G), zero (N, G) uint8, g_idx)``."""
    try:
        qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
        scales, g_idx = tensors[f"{name}.scales"], tensors[f"{name}.g_idx"]
    except KeyError as e:
        raise FormatError(name, f"GPTQ tensors incomplete: missing {e}") from None
    codes = unpack(_bytes(qweight.T), bits, in_features)
    zero = (unpack(_bytes(qzeros), bits, out_features).to(torch.int16) + 1).T  # (N, G), v1: +1
    if bool((zero >= (1 << bits)).any()):
        raise FormatError(name, "zero point out of range after the v1 +1 (not a v1 GPTQ checkpoint?)")
    return codes, scales.T.contiguous(), zero.to(torch.uint8).contiguous(), g_idx.to(torch.int32)


def save_gptq(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a Hugging Face model with packed QuantLinear/GPTQLinear layers in the GPTQ format."""
    from safetensors.torch import save_file

    if not (hasattr(model, "config") and hasattr(model.config, "to_dict")):
        raise FormatError(str(out_dir), "GPTQ export needs a Hugging Face model (with .config)")
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise FormatError(str(out_dir), "the model has no quantized Linear layer to export")
    schemes = {(m.scheme.bits, m.scheme.group_size, m.scheme.symmetric) for m in quant.values()}
    if len(schemes) != 1:
        raise FormatError(str(out_dir), f"the GPTQ config holds one scheme; the model mixes {sorted(schemes)}")
    bits, group, sym = schemes.pop()
    for name, m in quant.items():
        if m.scheme.granularity is not Granularity.GROUP:
            raise FormatError(name, "the GPTQ format holds group-wise layers only (use granularity: group)")
    _check_whole_groups(quant)
    meta = _run_metadata(quant)
    tensors = {}
    for name, m in quant.items():
        tensors.update(gptq_tensors(name, m))
    skip = tuple(f"{n}." for n in quant)
    seen = set()
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key.startswith(skip) or (ident in seen and t.numel()):
            continue
        seen.add(ident)
        tensors[key] = t.detach().contiguous().cpu()
    qcfg = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": group,
            "sym": sym, "lm_head": False, **meta}
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_hf_files(tmp, model, qcfg, tokenizer)
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_gptq(path: str | os.PathLike) -> nn.Module:
    """Read a GPTQ-format directory (as written by :func:`save_gptq`) into a model with
    :class:`GPTQLinear` layers (exact: the same codes, scales, zero points and ``g_idx``)."""
    from safetensors.torch import load_file

    from ..config import QuantScheme
    from ..targets import set_submodule
    from .hf import empty_hf_model

    path = Path(path)
    try:
        qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
        bits, group, sym = int(qcfg["bits"]), int(qcfg["group_size"]), bool(qcfg["sym"])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise FormatError(path, f"not a GPTQ checkpoint: {e}") from None
    if qcfg.get("quant_method") != "gptq" or qcfg.get("checkpoint_format", "gptq") != "gptq":
        raise FormatError(path, "expected quant_method gptq with checkpoint_format gptq (v1)")
    sd = load_file(str(path / "model.safetensors"))
    model = empty_hf_model(path)
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym, scale_dtype="float16")
    names = [k[: -len(".qweight")] for k in sd if k.endswith(".qweight")]
    for name in names:
        old = model.get_submodule(name)
        codes, scale, zero, g_idx = read_gptq_tensors(sd, name, bits, old.in_features, old.out_features)
        mod = GPTQLinear(old.in_features, old.out_features, old.bias is not None, scheme, device="meta")
        result = type("R", (), {"codes": codes, "scale": scale, "zero": None if sym else zero, "g_idx": g_idx})
        mod._set_buffers(result)
        if old.bias is not None:
            mod.bias = nn.Parameter(sd.pop(f"{name}.bias").float(), requires_grad=False)
        set_submodule(model, name, mod)
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            sd.pop(f"{name}.{key}")
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left or unexpected:
        raise FormatError(path, f"tensors do not match the model: missing {left[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
