"""Our checkpoint tensors <-> compressed-tensors, one module at a time.

``compress`` and :func:`~.checkpoint.save_compressed` write compressed-tensors whenever every compressed
module has a compressed-tensors form (:func:`ct_reason`), so plain transformers (with the
``compressed-tensors`` package) and vLLM load the output without torchcompress. Reading goes the other
way: :class:`CTCheckpoint` presents a compressed-tensors directory (ours or llm-compressor's) under our
module and tensor names, so :func:`~.checkpoint.load_compressed`, the block pipeline and the streamed
evaluation rebuild our modules (and our kernels) from it with no dense weight in between.

Both directions work on one module's tensors, so the block pipeline converts its output shard by shard.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Granularity, QuantScheme
from ..errors import FormatError
from ..primitives.packing import pack, packed_len, unpack

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
GPTQ_KEY = "torchcompress_gptq"  # extra quantization_config key (compressed-tensors ignores extra keys)
_SCHEME_TYPES = ("FP8Linear", "Int8Linear", "FP4Linear")


# -- writing ---------------------------------------------------------------------------------------

def ct_reason(name: str, entry: dict) -> str | None:
    """Why the manifest ``entry`` of module ``name`` has no compressed-tensors form (None: it has one)."""
    kind = entry.get("type")
    if kind in _SCHEME_TYPES:
        return None
    if kind == "QuantLinear":
        s = QuantScheme.from_dict(entry["scheme"])
        if s.float_zero:
            return f"{name}: float zero points (HQQ) have no compressed-tensors int packing"
        if s.granularity is Granularity.GROUP and int(entry["in_features"]) % s.group_size:
            return f"{name}: {entry['in_features']} columns are not a multiple of group_size {s.group_size}"
        return None
    if kind == "GPTQLinear":
        return f"{name}: act-order with dynamic groups (g_idx) was removed from compressed-tensors"
    return f"{name}: {kind} has no compressed-tensors form"


def _words(packed: torch.Tensor) -> torch.Tensor:
    """(R, B) uint8 little-endian bit stream -> (R, ceil(B/4)) int32 words (same bits)."""
    return F.pad(packed, (0, (-packed.shape[-1]) % 4)).contiguous().view(torch.int32)


def _bytes(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_words`: the first ``n`` bytes of each row."""
    return words.contiguous().view(torch.uint8)[..., :n].contiguous()


def quant_group(scheme: QuantScheme) -> dict:
    """The ``config_groups`` entry (without targets) of an integer weight-only scheme."""
    strategy = {Granularity.GROUP: "group", Granularity.CHANNEL: "channel", Granularity.TENSOR: "tensor"}[scheme.granularity]
    w = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, "strategy": strategy,
         "group_size": scheme.group_size if strategy == "group" else None, "actorder": None,
         "dynamic": False, "observer": "minmax", "block_structure": None}
    return {"weights": w, "input_activations": None, "output_activations": None, "format": PACKED}


def quant_tensors(name: str, qweight, scale, zero, bias, bits: int, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A packed QuantLinear's buffers under compressed-tensors ``pack-quantized`` names: the unsigned
    codes (symmetric: ``q + 2^(b-1)``) as one little-endian stream per row padded to int32 words; the
    asymmetric zero point ``z - 2^(b-1)`` packed the same way along the output dimension."""
    if zero is not None and zero.dtype != torch.uint8:
        raise FormatError(name, "has float zero points (HQQ float_zero); compressed-tensors int packing holds "
                          "integer zero points only (quantize with float_zero: false)")
    out = {f"{name}.weight_packed": _words(qweight),
           f"{name}.weight_scale": scale.clone(),
           f"{name}.weight_shape": torch.tensor(list(shape), dtype=torch.int64)}
    if zero is not None:
        out[f"{name}.weight_zero_point"] = _words(pack(zero.T.contiguous(), bits)).T.contiguous()
    if bias is not None:
        out[f"{name}.bias"] = bias.clone()
    return out


def module_to_ct(name: str, entry: dict, sd: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config group without targets, tensors) of the module ``name`` from its manifest ``entry``
    and its state ``sd`` (keys relative to the module)."""
    from .ct_schemes import scheme_group

    reason = ct_reason(name, entry)
    if reason is not None:
        raise FormatError(name, reason)
    if entry["type"] in _SCHEME_TYPES:  # our buffers already carry compressed-tensors' names
        from .checkpoint import MODULE_KINDS

        m = MODULE_KINDS[entry["type"]][2](entry, device="meta")
        return scheme_group(m), {f"{name}.{k}": t for k, t in sd.items()}
    s = QuantScheme.from_dict(entry["scheme"])
    shape = (int(entry["out_features"]), int(entry["in_features"]))
    return quant_group(s), quant_tensors(name, sd["qweight"], sd["scale"], sd.get("zero"), sd.get("bias"), s.bits, shape)


class CTGroups:
    """The ``config_groups`` being collected (one per distinct scheme, targets by exact module name)."""

    def __init__(self, groups: dict | None = None):
        self.groups: dict[str, dict] = dict(groups or {})
        self.gptq: dict[str, dict] = {}  # module -> how GPTQ produced it (our export metadata; others ignore it)

    def add(self, name: str, group: dict) -> None:
        key = json.dumps(group, sort_keys=True)
        self.groups.setdefault(key, {"targets": [], **group})["targets"].append(name)

    def config(self, ignore: list[str]) -> dict:
        formats = {g["format"] for g in self.groups.values()}
        return {"quant_method": QUANT_METHOD,
                "format": formats.pop() if len(formats) == 1 else "mixed-precision",
                "quantization_status": "compressed",
                "config_groups": {f"group_{i}": g for i, g in enumerate(self.groups.values())},
                "ignore": sorted(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
                **({GPTQ_KEY: dict(sorted(self.gptq.items()))} if self.gptq else {})}


def state_to_ct(sd: dict[str, torch.Tensor], modules: dict[str, dict], groups: CTGroups,
                rename=None) -> dict[str, torch.Tensor]:
    """Convert the compressed modules of ``sd`` (full tensor names; a whole model or one shard) whose
    manifest entries are in ``modules``; other tensors pass through unchanged. ``rename`` (a name ->
    name function, :func:`~..pipeline.experts.disk_namer`) gives tensors and targets their on-disk
    names (a MoE family whose checkpoint names differ from its module names)."""
    if rename is not None:
        mine = CTGroups()
        out = state_to_ct(sd, modules, mine)
        for g in mine.groups.values():
            group = {k: v for k, v in g.items() if k != "targets"}
            for t in g["targets"]:
                groups.add(rename(t), group)
        groups.gptq.update({rename(k): v for k, v in mine.gptq.items()})
        return {rename(k): v for k, v in out.items()}
    owner = {}
    for key in sd:
        mod = key.rpartition(".")[0]
        while mod and mod not in modules:
            mod = mod.rpartition(".")[0]
        owner[key] = mod
    out: dict[str, torch.Tensor] = {}
    done = set()
    for key, t in sd.items():
        mod = owner[key]
        if not mod:
            out[key] = t
            continue
        if mod in done:
            continue
        done.add(mod)
        sub = {k[len(mod) + 1:]: v for k, v in sd.items() if owner[k] == mod}
        group, tensors = module_to_ct(mod, modules[mod], sub)
        groups.add(mod, group)
        if isinstance(modules[mod].get("gptq"), dict):
            groups.gptq[mod] = modules[mod]["gptq"]
        out.update(tensors)
    return out


# -- reading ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Info:
    """What the pipeline reads of a tensor (dtype, shape, bytes, file) for a converted tensor."""
    dtype: torch.dtype
    shape: tuple
    nbytes: int
    file: Path
    start: int = 0


def _targets(group: dict, candidates: list[str], ignore: list[str], where) -> list[str]:
    out = []
    for t in group.get("targets") or []:
        if t == "Linear":
            out += [c for c in candidates if c not in ignore]
        elif isinstance(t, str) and t.startswith("re:"):
            rx = re.compile(t[3:])
            out += [c for c in candidates if rx.fullmatch(c) and c not in ignore]
        elif t in candidates:
            out.append(t)
        else:
            raise FormatError(where, f"quantization_config target {t!r} names no quantized module of the checkpoint")
    return out


def _scheme_entry(name: str, group: dict, raw, where) -> dict:
    """Our manifest entry for module ``name`` of compressed-tensors ``group`` (``raw``: the checkpoint)."""
    w, a, fmt = group.get("weights") or {}, group.get("input_activations"), group.get("format")

    def has(key):
        return key in raw.tensors

    def shape_of(key):
        if key.endswith(".weight") and key not in raw.tensors and f"{name}.shape" in raw.tensors:  # 2:4 sparse
            return tuple(int(x) for x in raw.get(f"{name}.shape").reshape(-1).tolist())
        if key not in raw.tensors:
            raise FormatError(where, f"module {name!r}: no tensor {key!r} in the checkpoint")
        return tuple(raw.tensors[key].shape)

    bias = has(f"{name}.bias")
    if fmt == PACKED and w.get("type") == "int" and a is None:
        if w.get("actorder") not in (None, "weight", "static") and has(f"{name}.weight_g_idx"):
            raise FormatError(where, f"module {name!r}: act-order groups (weight_g_idx) are not supported")
        shape_of(f"{name}.weight_shape")
        n, k = (int(x) for x in raw.get(f"{name}.weight_shape").tolist())
        strategy = w.get("strategy")
        gran = {"group": "group", "channel": "channel", "tensor": "tensor"}.get(strategy)
        if gran is None:
            raise FormatError(where, f"module {name!r}: weight strategy {strategy!r} is not supported")
        shape_of(f"{name}.weight_scale")
        scale_dtype = str(raw.tensors[f"{name}.weight_scale"].dtype).removeprefix("torch.")
        scheme = QuantScheme(bits=int(w["num_bits"]), granularity=Granularity(gran),
                             group_size=int(w.get("group_size") or 128), symmetric=bool(w.get("symmetric", True)),
                             scale_dtype=scale_dtype)
        return {"type": "QuantLinear", "in_features": k, "out_features": n, "bias": bias, "scheme": scheme.to_dict()}
    if fmt in ("float-quantized", "naive-quantized") and w.get("type") == "float" and int(w.get("num_bits", 0)) == 8:
        n, k = shape_of(f"{name}.weight")
        block = w.get("block_structure")
        cfg = {"granularity": "block" if w.get("strategy") == "block" else "channel",
               "activations": "dynamic" if a is not None else "none", "block_size": int(block[0]) if block else 128}
        return {"type": "FP8Linear", "in_features": k, "out_features": n, "bias": bias, "config": cfg}
    if fmt == "int-quantized" and w.get("type") == "int" and int(w.get("num_bits", 0)) == 8 and a is not None:
        n, k = shape_of(f"{name}.weight")
        return {"type": "Int8Linear", "in_features": k, "out_features": n, "bias": bias, "config": {"symmetric": True}}
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        n, half = shape_of(f"{name}.weight_packed")
        return {"type": "FP4Linear", "in_features": 2 * half, "out_features": n, "bias": bias,
                "config": {"format": fmt.split("-")[0], "activations": a is not None}}
    raise FormatError(where, f"module {name!r}: compressed-tensors format {fmt!r} with weights {w} is not supported")


class CTCheckpoint:
    """A compressed-tensors checkpoint seen under our names: ``tensors``/``get`` as
    :class:`~..pipeline.shards.Checkpoint`, plus ``manifest`` (our module entries)."""

    def __init__(self, raw):
        self.raw, self.dir, self.config = raw, raw.dir, raw.config
        where = self.dir / "config.json"
        q = self.config.get("quantization_config")
        if not isinstance(q, dict) or not isinstance(q.get("config_groups"), dict):
            raise FormatError(where, "compressed-tensors quantization_config has no config_groups")
        sparse = q.get("sparsity_config") or self.config.get("sparsity_config") or {}
        if sparse and sparse.get("format") not in ("sparse-24-bitmask", "dense"):
            raise FormatError(where, f"compressed-tensors sparsity format {sparse.get('format')!r} is not supported")
        ignore = [i for i in q.get("ignore") or [] if isinstance(i, str)]
        candidates = sorted({k.rpartition(".")[0] for k in raw.tensors
                             if k.endswith((".weight_scale", ".weight_packed", ".bitmask"))})
        sparse_names: set[str] = set()
        if sparse.get("format") == "sparse-24-bitmask":
            bitmasked = [n for n in candidates if f"{n}.bitmask" in raw.tensors]
            sparse_names = set(_targets(sparse, bitmasked, [i for i in sparse.get("ignore") or [] if isinstance(i, str)],
                                        where))
        modules: dict[str, dict] = {}
        for gname, group in q["config_groups"].items():
            if not isinstance(group, dict):
                raise FormatError(where, f"config group {gname!r} is not a mapping")
            for name in _targets(group, candidates, ignore, where):
                modules[name] = _scheme_entry(name, group, raw, where)
        for name, info in (q.get(GPTQ_KEY) or {}).items():
            if name in modules and modules[name]["type"] == "QuantLinear" and isinstance(info, dict):
                modules[name]["gptq"] = dict(info)
        self.tensors: dict = {}
        self._how: dict[str, tuple] = {}
        taken = set()
        for name in sorted(sparse_names):  # 2:4 values + bitmask -> the dense (float / int8 / fp8) weight
            values, shape = raw.tensors[f"{name}.compressed"], raw.get(f"{name}.shape").reshape(-1).tolist()
            n, k = (int(x) for x in shape)
            self.tensors[f"{name}.weight"] = _Info(values.dtype, (n, k), n * k * values.dtype.itemsize, values.file)
            self._how[f"{name}.weight"] = ("sparse24", name, (n, k))
            taken |= {f"{name}.compressed", f"{name}.bitmask", f"{name}.shape"}
            if name not in modules:  # float values: a PrunedLinear whose zeros are its mask
                modules[name] = {"type": "PrunedLinear", "in_features": k, "out_features": n,
                                 "bias": f"{name}.bias" in raw.tensors, "mask": "zeros", "nm": [2, 4],
                                 "dtype": str(values.dtype).removeprefix("torch.")}
        self.modules = modules
        for name, e in modules.items():
            if e["type"] != "QuantLinear":
                continue
            s = QuantScheme.from_dict(e["scheme"])
            n, k = e["out_features"], e["in_features"]
            packed = raw.tensors[f"{name}.weight_packed"]
            self.tensors[f"{name}.qweight"] = _Info(torch.uint8, (n, packed_len(k, s.bits)), n * packed_len(k, s.bits), packed.file)
            self._how[f"{name}.qweight"] = ("codes", f"{name}.weight_packed", packed_len(k, s.bits))
            sc = raw.tensors[f"{name}.weight_scale"]
            self.tensors[f"{name}.scale"] = sc
            self._how[f"{name}.scale"] = ("copy", f"{name}.weight_scale")
            if not s.symmetric:
                z = raw.tensors[f"{name}.weight_zero_point"]
                self.tensors[f"{name}.zero"] = _Info(torch.uint8, tuple(sc.shape), sc.shape[0] * sc.shape[1], z.file)
                self._how[f"{name}.zero"] = ("zero", f"{name}.weight_zero_point", s.bits, n)
            taken |= {f"{name}.weight_packed", f"{name}.weight_scale", f"{name}.weight_shape", f"{name}.weight_zero_point"}
        for key, info in raw.tensors.items():
            if key not in taken:
                self.tensors[key] = info
                self._how[key] = ("copy", key)

    @property
    def manifest(self) -> dict:
        from .checkpoint import FORMAT_VERSION
        from .checkpoint import QUANT_METHOD as OURS

        return {"quant_method": OURS, "format_version": FORMAT_VERSION, "modules": self.modules, "tied": {},
                "source_format": QUANT_METHOD}

    @property
    def torch_dtype(self):
        return self.raw.torch_dtype

    def total_bytes(self) -> int:
        return self.raw.total_bytes()

    def get(self, name: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        how = self._how.get(name)
        if how is None:
            raise FormatError(self.dir, f"no tensor {name!r} in the checkpoint")
        if how[0] == "copy":
            return self.raw.get(how[1], dtype=dtype, device=device)
        if how[0] == "sparse24":
            from .sparse24 import decompress24

            _, mod, shape = how
            t = decompress24(self.raw.get(f"{mod}.compressed"), self.raw.get(f"{mod}.bitmask"), shape)
            if dtype is not None and t.is_floating_point() and t.element_size() > 1:
                t = t.to(dtype)
            return t.to(device) if str(device) != "cpu" else t
        if how[0] == "codes":
            t = _bytes(self.raw.get(how[1]), how[2])
        else:  # zero: (ceil(N*b/32), G) int32 packed along N -> (N, G) unsigned codes
            _, key, bits, n = how
            t = unpack(_bytes(self.raw.get(key).T, packed_len(n, bits)), bits, n).T.contiguous()
        return t.to(device) if str(device) != "cpu" else t


def is_ct_config(config: dict) -> bool:
    q = config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def ct_ignore(model: nn.Module, quantized: set[str], rename=None) -> list[str]:
    """The plain Linear layers of ``model`` and its MoE routers (compressed-tensors' ``ignore`` list),
    under their on-disk names when ``rename`` is given."""
    from ..pipeline.experts import routers

    out = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    out += [n for n in routers(model) if n not in quantized and n not in out]
    return [rename(n) for n in out] if rename is not None else out


def convert_directory(directory: Path, modules: dict[str, dict], rename=None) -> CTGroups:
    """Rewrite the safetensors files of ``directory`` (ours, single or sharded) as compressed-tensors,
    one file at a time (a shard is one block: memory stays bounded); the index follows the new names."""
    from safetensors.torch import load_file

    from ..pipeline.shards import INDEX_NAME, SINGLE_NAME, write_safetensors

    groups = CTGroups()
    index_path = directory / INDEX_NAME
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    files = sorted(set(index["weight_map"].values())) if index else [SINGLE_NAME]
    weight_map = {}
    for name in files:
        path = directory / name
        sd = state_to_ct(load_file(str(path)), modules, groups, rename)
        tmp = directory / f".{name}.ct.tmp"
        write_safetensors(tmp, sd, {"format": "pt"})
        tmp.replace(path)
        weight_map.update({k: name for k in sd})
    if index:
        total = sum((directory / f).stat().st_size for f in files)
        index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                         indent=2) + "\n")
    return groups
