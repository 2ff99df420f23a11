"""Checkpoints: compressed-tensors where a standard holds the model, else ours. No pickle.

A Hugging Face model whose compressed modules all have a compressed-tensors form (integer weights by
channel or group, FP8, INT8 W8A8, NVFP4, MXFP4: :func:`.ct_convert.ct_reason`) is written as
compressed-tensors, which transformers and vLLM load without torchcompress. Otherwise (GGUF blocks,
LoRA on a quantized base, low-rank factors, pruning masks, HQQ float zeros, dynamic act-order groups)
the ``config.json`` carries our manifest under ``quantization_config`` (``quant_method: torchcompress``)
and a ``model_type`` that plain transformers refuses with a message naming ``import torchcompress.hf``
(never a model with random weights); once that import registered us, ``from_pretrained`` rebuilds it.
Other modules get a ``torchcompress.json`` beside the weights.

Loading rebuilds the skeleton on the meta device, swaps in empty compressed modules from the
manifest, and loads the tensors with ``load_state_dict(assign=True)``: no float weights are ever
materialised and no quantization runs at load time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from ..errors import FormatError
from ..nn.quant_linear import QuantLinear, quant_linear_from_manifest, quant_linear_manifest
from ..targets import set_submodule
from .atomic import atomic_directory

FORMAT_VERSION = 1
QUANT_METHOD = "torchcompress"
# what plain transformers reads as the architecture of one of our own checkpoints: its "model type
# not recognised" error then says what to do; the real model_type is kept under BASE_MODEL_TYPE
OWN_MODEL_TYPE = "torchcompress (run `import torchcompress.hf` before from_pretrained)"
BASE_MODEL_TYPE = "torchcompress_model_type"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "torchcompress.json"

# manifest "type" -> (module class, describe, rebuild); later module kinds register here.
MODULE_KINDS = {"QuantLinear": (QuantLinear, quant_linear_manifest, quant_linear_from_manifest)}
from ..nn.gptq_linear import GPTQLinear, gptq_linear_from_manifest, gptq_linear_manifest  # noqa: E402

MODULE_KINDS["GPTQLinear"] = (GPTQLinear, gptq_linear_manifest, gptq_linear_from_manifest)
from ..nn.gguf_linear import GGUFLinear, gguf_linear_from_manifest, gguf_linear_manifest  # noqa: E402

MODULE_KINDS["GGUFLinear"] = (GGUFLinear, gguf_linear_manifest, gguf_linear_from_manifest)
from ..nn.pruned_linear import PrunedLinear, pruned_linear_from_manifest, pruned_linear_manifest  # noqa: E402

MODULE_KINDS["PrunedLinear"] = (PrunedLinear, pruned_linear_manifest, pruned_linear_from_manifest)
from ..nn.lowrank_linear import LowRankLinear, lowrank_linear_from_manifest, lowrank_linear_manifest  # noqa: E402

MODULE_KINDS["LowRankLinear"] = (LowRankLinear, lowrank_linear_manifest, lowrank_linear_from_manifest)
from ..nn.lora_linear import LoRALinear, lora_linear_from_manifest, lora_linear_manifest  # noqa: E402

MODULE_KINDS["LoRALinear"] = (LoRALinear, lora_linear_manifest, lora_linear_from_manifest)
from ..nn.hadamard_linear import HadamardInputLinear, hadamard_linear_from_manifest, hadamard_linear_manifest  # noqa: E402

MODULE_KINDS["HadamardInputLinear"] = (HadamardInputLinear, hadamard_linear_manifest, hadamard_linear_from_manifest)
from ..nn.scheme_linear import register_manifest_kinds  # noqa: E402  (FP8 / INT8 W8A8 / FP4, issue #21)

register_manifest_kinds(MODULE_KINDS)


def all_finite(t, chunk: int = 1 << 24) -> bool:
    """No NaN/Inf in a float tensor, checked 16M values at a time (``isfinite`` of a whole 8B-model
    embedding makes gigabytes of temporaries); float8 has no isfinite kernel: checked in float32."""
    if not t.is_floating_point():
        return True
    flat = t.detach().reshape(-1)
    for i in range(0, flat.numel(), chunk):
        part = flat[i: i + chunk]
        if part.element_size() == 1:
            part = part.float()
        if not bool(part.isfinite().all()):
            return False
    return True


def compressed_modules(module: nn.Module, prefix: str = "") -> dict:
    """``{prefix + name: manifest entry}`` for every compressed module under ``module`` (the block
    pipeline describes one block at a time with it; :func:`build_manifest` the whole model)."""
    kinds = {cls: describe for cls, describe, _ in MODULE_KINDS.values()}
    out = {}
    for name, m in module.named_modules():
        describe = kinds.get(type(m))
        if describe is not None:
            if isinstance(m, QuantLinear) and not m.is_packed:
                raise FormatError(f"{prefix}{name}".rstrip("."), "is a fake-quant QuantLinear; call freeze_(model) before saving")
            out[f"{prefix}{name}".rstrip(".")] = describe(m)
    return out


def build_manifest(model: nn.Module) -> dict:
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "modules": compressed_modules(model)}


def _dedupe_state_dict(model: nn.Module) -> tuple[dict, dict]:
    """Drop tensors that share storage with an earlier key (tied embeddings); return (sd, tied)."""
    sd, tied, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        sd[key] = t.detach().contiguous().cpu()
    return sd, tied


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained") and hasattr(model.config, "to_dict")


def write_hf_files(directory: Path, model: nn.Module, quantization_config: dict, tokenizer=None) -> None:
    """config.json (with ``quantization_config``), generation config and tokenizer of an HF model.
    Our own manifest gets :data:`OWN_MODEL_TYPE` (plain transformers refuses it by name)."""
    cfg = model.config.to_dict()
    cfg.pop(BASE_MODEL_TYPE, None)
    cfg["quantization_config"] = quantization_config
    if quantization_config.get("quant_method") == QUANT_METHOD:
        cfg[BASE_MODEL_TYPE], cfg["model_type"] = cfg["model_type"], OWN_MODEL_TYPE
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` (compressed in place by the verbs) to ``out_dir`` atomically.

    ``extra_files`` (name -> bytes) land in the same atomic swap (the CLI's run record)."""
    from safetensors.torch import save_file

    from .ct_convert import CTGroups, ct_ignore, state_to_ct

    manifest = build_manifest(model)
    sd, tied = _dedupe_state_dict(model)
    for key, t in sd.items():  # no NaN is ever written: a non-finite float tensor (a norm, a bias) is refused by name
        if not all_finite(t):
            from ..errors import NumericError

            raise NumericError(key, "holds NaN/Inf values; refusing to write the checkpoint")
    manifest["tied"] = tied
    standard = _is_hf(model) and standard_format_reason(manifest) is None
    if standard:  # compressed-tensors; tied copies are dropped (transformers re-ties from tie_word_embeddings)
        from ..pipeline.experts import disk_namer

        groups, rename = CTGroups(), disk_namer(model)  # MoE: the family's on-disk names (Mixtral's block_sparse_moe)
        sd = state_to_ct(sd, manifest["modules"], groups, rename)
        qcfg = groups.config(ct_ignore(model, set(manifest["modules"]), rename))
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "torchcompress": str(FORMAT_VERSION)})
        if standard:
            write_hf_files(tmp, model, qcfg, tokenizer)
        elif _is_hf(model):
            write_hf_files(tmp, model, manifest, tokenizer)
        else:
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out_dir


def standard_format_reason(manifest: dict) -> str | None:
    """None when every compressed module of ``manifest`` has a compressed-tensors form (and there is at
    least one), else why the checkpoint stays in our own format."""
    from .ct_convert import ct_reason

    if not manifest["modules"]:
        return "no compressed module"
    for name, entry in manifest["modules"].items():
        reason = ct_reason(name, entry)
        if reason is not None:
            return reason
    return None


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of a compressed directory (ours, or our module entries derived from a
    compressed-tensors checkpoint), or None if ``path`` is neither."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        manifest = _read_json(path / MANIFEST_NAME)
    elif (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        manifest = config.get("quantization_config")
        from .ct_convert import is_ct_config

        if is_ct_config(config):
            from ..pipeline.shards import Checkpoint

            return Checkpoint.open(path).manifest
        if not isinstance(manifest, dict) or manifest.get("quant_method") != QUANT_METHOD:
            return None
    else:
        return None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(path, f"checkpoint format_version {version!r}; this torchcompress reads {FORMAT_VERSION}")
    if not isinstance(manifest.get("modules"), dict):
        raise FormatError(path, "manifest has no 'modules' mapping")
    return manifest


def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(p, f"not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise FormatError(p, "top level is not a JSON object")
    return data


def module_manifest(model: nn.Module, manifest: dict) -> dict:
    """``manifest`` with its modules under ``model``'s module names: a compressed-tensors checkpoint of a
    MoE family names them as the family stores them (Mixtral's ``block_sparse_moe``, the module's ``mlp``)."""
    if not manifest.get("source_format"):
        return manifest
    from ..pipeline.experts import module_namer

    rename = module_namer(model)
    if rename is None:
        return manifest
    return {**manifest, "modules": {rename(k): v for k, v in manifest["modules"].items()}}


def apply_manifest(model: nn.Module, manifest: dict, device="meta", source: str = "manifest") -> nn.Module:
    """Swap empty compressed modules (on ``device``) into ``model`` where the manifest names them."""
    for name, entry in manifest["modules"].items():
        kind = entry.get("type") if isinstance(entry, dict) else None
        if not isinstance(kind, str) or kind not in MODULE_KINDS:
            raise FormatError(source, f"module {name!r}: unknown type {kind!r}")
        try:
            model.get_submodule(name)
        except AttributeError:
            raise FormatError(source, f"module {name!r} does not exist in the model") from None
        try:
            new = MODULE_KINDS[kind][2](entry, device=device)
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # Overflow: int(Infinity)
            raise FormatError(source, f"module {name!r}: bad manifest entry: {e}") from None
        set_submodule(model, name, new)
    return model


def _check_tied(tied, expected: set, sd: dict, source) -> dict:
    """``tied`` maps a dropped key to the stored key it aliases; both must make sense."""
    if not isinstance(tied, dict):
        raise FormatError(source, f"manifest 'tied' must be a mapping, got {type(tied).__name__}")
    for key, src in tied.items():
        if not isinstance(key, str) or not isinstance(src, str):
            raise FormatError(source, f"manifest 'tied' entry {key!r}: {src!r} is not a pair of tensor names")
        if key not in expected:
            raise FormatError(source, f"tied tensor {key!r} does not exist in the model")
        if src not in sd:
            raise FormatError(source, f"tied tensor {key!r} points at {src!r}, which is not in the checkpoint")
    return tied


def _check_dtypes(sd: dict, skeleton: dict, manifest: dict, source) -> None:
    """A header that lies about a dtype (same byte count, other type) must not load: packed codes,
    zero points and indices keep their exact integer dtype, a compressed module's scales the scheme's
    dtype; other float tensors may be any float dtype (a bf16 model keeps bf16 norms)."""
    compressed = tuple(f"{name}." for name in manifest["modules"])
    for key, t in sd.items():
        want = skeleton.get(key)
        if want is None or t.dtype == want.dtype:
            continue
        exact = not want.dtype.is_floating_point or (key.startswith(compressed) and not key.endswith(".bias"))
        if exact or not t.dtype.is_floating_point:
            raise FormatError(source, f"tensor {key!r} is {t.dtype}; the manifest implies {want.dtype}")


def load_state_into(model: nn.Module, path: Path, manifest: dict) -> nn.Module:
    """Load ``path/model.safetensors`` into ``model`` (skeleton with meta tensors) by assignment."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..pipeline.shards import INDEX_NAME, Checkpoint

    weights = path / WEIGHTS_NAME
    if manifest.get("source_format") or ((path / INDEX_NAME).is_file() and (path / "config.json").is_file()):
        ckpt = Checkpoint.open(path)  # sharded (the block pipeline's output) or compressed-tensors (converted)
        weights = path / (INDEX_NAME if (path / INDEX_NAME).is_file() else WEIGHTS_NAME)
        sd = {name: ckpt.get(name) for name in ckpt.tensors}
        if manifest.get("source_format"):
            from ..pipeline.experts import module_namer

            rename = module_namer(model)
            sd = sd if rename is None else {rename(k): v for k, v in sd.items()}
    elif not weights.is_file():
        raise FormatError(path, f"missing {WEIGHTS_NAME}")
    else:
        try:
            sd = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise FormatError(weights, f"unreadable safetensors: {e}") from None
    skeleton = model.state_dict()
    expected = set(skeleton)
    _check_dtypes(sd, skeleton, manifest, weights)
    tied = manifest.get("tied", {})
    if manifest.get("source_format"):  # compressed-tensors drops tied copies: transformers re-ties them
        from ..pipeline.skeleton import tied_sources

        tied = {k: v for k, v in tied_sources(model).items() if k not in sd and v in sd}
    tied = _check_tied(tied, expected, sd, weights)
    missing = sorted(expected - set(sd) - set(tied))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise FormatError(weights, f"tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        raise FormatError(weights, f"tensor shapes do not match the manifest: {str(e).splitlines()[-1].strip()}") from None
    for key, src in tied.items():
        mod_name, _, attr = key.rpartition(".")
        src_mod, _, src_attr = src.rpartition(".")
        owner = model.get_submodule(mod_name)
        old, new = getattr(owner, attr), getattr(model.get_submodule(src_mod), src_attr)
        float_pair = old is not None and old.is_floating_point() and new.is_floating_point()  # skeleton dtype: no data
        if old is not None and (old.shape != new.shape or (old.dtype != new.dtype and not float_pair)):
            raise FormatError(weights, f"tied tensor {key!r} {tuple(old.shape)} {old.dtype} cannot alias "
                                       f"{src!r} {tuple(new.shape)} {new.dtype}")
        setattr(owner, attr, new)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise FormatError(weights, f"tensor {name!r} was not in the checkpoint")
    return model.eval()


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a directory written by :func:`save_compressed`.

    Hugging Face checkpoints rebuild their own skeleton; for other modules pass ``model``, an
    instance of the original (uncompressed) architecture, e.g. built under ``torch.device("meta")``.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise FormatError(path, "not a torchcompress checkpoint (no torchcompress.json or quantization_config)")
    if model is None:
        from .hf import empty_hf_model

        model = empty_hf_model(path)
    from ..pipeline.experts import match_expert_layout

    match_expert_layout(model, path)  # compressed MoE experts are stored one linear per expert
    manifest = module_manifest(model, manifest)
    apply_manifest(model, manifest, source=str(path))
    return load_state_into(model, path, manifest)
