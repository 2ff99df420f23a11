"""LoRA adapters in PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's: ``base_model.model.<module path>.lora_A.weight`` (r, K) and ``...lora_B.weight``
(N, r). ``peft.PeftModel.from_pretrained(model, dir)`` loads what :func:`save_adapter` writes, and
:func:`load_adapter` loads what ``PeftModel.save_pretrained`` writes (plain LoRA: no DoRA, no LoRA
bias, no ``fan_in_fan_out``, no ``modules_to_save``; those are refused with a typed error).

Example::

    save_adapter(model, "out/adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    load_adapter(other_model, "out/adapter")
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import FormatError, InputError
from ..formats.atomic import atomic_directory
from ..nn.lora_linear import LoRALinear
from ..targets import set_submodule
from .lora import lora_base_types, lora_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")


def _most_common(values: list):
    return Counter(values).most_common(1)[0][0]


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 task_type: str | None = "CAUSAL_LM") -> Path:
    """Write the LoRA adapters of ``model`` (unmerged) to ``out_dir`` atomically, in PEFT's format."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise InputError("save_adapter: the model has no LoRALinear layers (call add_lora_ first)")
    merged = [n for n, m in mods if m.merged]
    if merged:
        raise InputError(f"save_adapter: {merged[0]} is merged; unmerge before saving the adapter")
    rslora = {m.use_rslora for _, m in mods}
    if len(rslora) > 1:
        raise InputError("save_adapter: PEFT has one use_rslora per adapter; the layers mix both")
    drop = [m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0 for _, m in mods]
    r, alpha = _most_common([m.r for _, m in mods]), _most_common([m.alpha for _, m in mods])
    tensors = {}
    for name, m in mods:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous().clone()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous().clone()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(drop),
        "use_rslora": rslora.pop(),
        # exact paths: PEFT matches a list entry by equality (or suffix), so nothing else is adapted
        "target_modules": sorted(n for n, _ in mods),
        "rank_pattern": {n: m.r for n, m in mods if m.r != r},
        "alpha_pattern": {n: m.alpha for n, m in mods if m.alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _read_config(path: Path) -> dict:
    p = path / CONFIG_NAME
    if not p.is_file():
        raise FormatError(path, f"missing {CONFIG_NAME}")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(p, f"not readable JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise FormatError(p, "top level is not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise FormatError(p, f"peft_type {cfg.get('peft_type')!r}: only LORA adapters are supported")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("lora_bias", False)):
        if cfg.get(key, ok) not in (ok, None):
            raise FormatError(p, f"{key}={cfg[key]!r} is not supported (plain LoRA only)")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise FormatError(p, "adapters that train biases or save whole modules (bias / modules_to_save) are not supported")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise FormatError(p, f"field {key!r} must be a positive number, got {v!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise FormatError(p, f"field {key!r} must be a mapping")
    return cfg


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: a pattern key matches a module path that ends in it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FormatError(path, f"missing {WEIGHTS_NAME}")
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise FormatError(weights, f"unreadable safetensors: {e}") from None
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = _KEY.match(key)
        if m is None:
            raise FormatError(weights, f"tensor {key!r} is not a plain LoRA A/B weight")
        if t.ndim != 2 or not t.is_floating_point():
            raise FormatError(weights, f"tensor {key!r} must be a 2-D float matrix, got {tuple(t.shape)} {t.dtype}")
        if not torch.isfinite(t).all():
            raise FormatError(weights, f"tensor {key!r} holds NaN or Inf")
        per_module.setdefault(m.group(1), {})[m.group(2)] = t
    for name, pair in per_module.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise FormatError(weights, f"module {name!r} has {sorted(pair)}, needs both lora_A and lora_B")
    return per_module


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, *, freeze_base: bool = True) -> nn.Module:
    """Wrap the layers named in a PEFT adapter directory in :class:`LoRALinear` and load A and B."""
    path = Path(path)
    cfg = _read_config(path)
    tensors = _read_tensors(path)
    if not tensors:
        raise FormatError(path / WEIGHTS_NAME, "holds no LoRA tensors")
    weights = path / WEIGHTS_NAME
    kinds = lora_base_types()
    plan = []
    for name, pair in tensors.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise FormatError(weights, f"module {name!r} does not exist in the model") from None
        if isinstance(base, LoRALinear):
            raise InputError(f"{name}: already has a LoRA adapter")
        if not isinstance(base, kinds):
            raise FormatError(weights, f"module {name!r} is a {type(base).__name__}, not a Linear-like layer")
        a, b = pair["lora_A"], pair["lora_B"]
        r = a.shape[0]
        if a.shape != (r, base.in_features) or b.shape != (base.out_features, r):
            raise FormatError(weights, f"module {name!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                                       f"({base.out_features}, {base.in_features}) layer")
        expected_r = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
        if r != expected_r:
            raise FormatError(weights, f"module {name!r}: rank {r} in the tensors, {expected_r} in {CONFIG_NAME}")
        plan.append((name, base, r, _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"]), a, b))
    if freeze_base:
        model.requires_grad_(False)
    dropout = float(cfg.get("lora_dropout") or 0.0)
    for name, base, r, alpha, a, b in plan:
        lora = LoRALinear(base, r, alpha, dropout, bool(cfg.get("use_rslora", False)))
        lora.lora_A.weight.copy_(a)
        lora.lora_B.weight.copy_(b)
        set_submodule(model, name, lora)
    return model
