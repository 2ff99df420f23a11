"""2:4-sparse weights as compressed-tensors ``sparse-24-bitmask``: per Linear ``name``

* ``name.compressed`` (N, K/2): the kept values of each row in order (float, int8 or fp8: after the
  quantization compressor for INT8 / FP8 weights, whose ``weight_scale`` stays beside them);
* ``name.bitmask`` (N, ceil(K/8)) uint8: where they sit, one bit per weight, little bit order in a byte;
* ``name.shape`` (2, 1) int64: the dense shape.

Exactly two entries of every four are kept: a group with fewer than two non-zeros keeps its first zeros.
The ``sparsity_config`` sits inside ``quantization_config`` (``quant_method: compressed-tensors``), as
llm-compressor wrote it. compressed-tensors 0.20 dropped sparse decompression ("sparsity is removed for
now"), so transformers 5.25 no longer reads this layout; :func:`~.checkpoint.load_compressed` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import FormatError

FORMAT = "sparse-24-bitmask"


def _nonzero(w: torch.Tensor) -> torch.Tensor:
    """Where ``w`` is not zero (fp8 through float32: no comparison kernel, and -0 is a zero)."""
    return (w.float() if w.dtype.is_floating_point and w.element_size() == 1 else w) != 0


def bytemask24(w: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """The kept positions (bool, like ``w``): the non-zeros, topped up to two per group of four."""
    n, k = w.shape
    if k % 4:
        raise FormatError(name, f"{k} columns are not a multiple of 4: not 2:4 sparse")
    nz = _nonzero(w).reshape(n, k // 4, 4)
    count = nz.sum(-1)
    if bool((count > 2).any()):
        row, grp = (int(i) for i in (count > 2).nonzero()[0])
        raise FormatError(name, f"row {row}, columns {4 * grp}..{4 * grp + 3} hold {int(count[row, grp])} non-zeros: "
                          "not 2:4 sparse (prune with n: 2, m: 4 first)")
    # top up with the first zeros: rank zeros by position, keep the (2 - count) lowest
    zero_rank = (~nz).cumsum(-1)
    keep = nz | ((~nz) & (zero_rank <= (2 - count).unsqueeze(-1)))
    return keep.reshape(n, k)


def compress24(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(values (N, K/2), bitmask (N, ceil(K/8)) uint8) of a 2:4-sparse (N, K) tensor."""
    mask = bytemask24(w, name)
    n, k = w.shape
    values = w[mask].reshape(n, k // 2)
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-k) % 8)).reshape(n, -1, 8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).reshape(1, 1, 8)
    bitmask = (bits.to(torch.int32) * weights).sum(-1).to(torch.uint8)
    return values.contiguous(), bitmask


def decompress24(values: torch.Tensor, bitmask: torch.Tensor, shape) -> torch.Tensor:
    n, k = (int(s) for s in shape)
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    mask = bits.reshape(n, -1)[:, :k].bool()
    if values.shape != (n, k // 2) or int(mask.sum()) != values.numel():
        raise FormatError("sparse-24-bitmask", f"values {tuple(values.shape)} and bitmask do not describe a 2:4 "
                          f"sparse ({n}, {k}) tensor")
    out = torch.zeros((n, k), dtype=values.dtype)
    out.view(torch.int8 if values.element_size() == 1 else values.dtype)[mask] = (
        values.view(torch.int8) if values.element_size() == 1 else values).reshape(-1)
    return out


def sparse24_tensors(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    values, bitmask = compress24(w.detach().cpu(), f"{name}.weight")
    return {f"{name}.compressed": values, f"{name}.bitmask": bitmask,
            f"{name}.shape": torch.tensor(list(w.shape), dtype=torch.int64).reshape(-1, 1)}


def sparse_targets(model: nn.Module) -> list[str]:
    """The 2:4-pruned layers: PrunedLinear with ``nm == (2, 4)``, and INT8 / FP8 layers whose weights are 2:4."""
    from ..nn.pruned_linear import PrunedLinear
    from ..nn.scheme_linear import FP8Linear, Int8Linear

    out = []
    for name, m in model.named_modules():
        if isinstance(m, PrunedLinear) and tuple(m.nm or ()) == (2, 4):
            out.append(name)
        elif isinstance(m, (Int8Linear, FP8Linear)) and m.weight.dim() == 2 and m.weight.shape[1] % 4 == 0:
            if int(_nonzero(m.weight).reshape(m.weight.shape[0], -1, 4).sum(-1).max()) <= 2:
                out.append(name)
    return out


def save_sparse24(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` with its 2:4 layers as ``sparse-24-bitmask`` (INT8 / FP8 layers quantized and sparse)."""
    from safetensors.torch import save_file

    from ..nn.pruned_linear import PrunedLinear
    from .atomic import atomic_directory
    from .checkpoint import _dedupe_state_dict, _is_hf, write_hf_files
    from .ct_convert import CTGroups, ct_ignore
    from .ct_schemes import SCHEME_MODULES, scheme_group

    if not _is_hf(model):
        raise FormatError(str(out_dir), "the sparse-24-bitmask export needs a Hugging Face model (with .config)")
    targets = sparse_targets(model)
    if not targets:
        raise FormatError(str(out_dir), "no 2:4-sparse Linear layer to export (prune with a 2:4 recipe first, "
                          "e.g. sparsegpt-2of4)")
    others = [n for n, m in model.named_modules() if not isinstance(m, (PrunedLinear,) + SCHEME_MODULES)
              and type(m).__name__ in ("QuantLinear", "GPTQLinear", "GGUFLinear", "LowRankLinear", "LoRALinear")]
    if others:
        raise FormatError(others[0], f"{type(model.get_submodule(others[0])).__name__} cannot be stored with "
                          "sparse-24-bitmask (only float, INT8 W8A8 and FP8 layers)")
    sd, _ = _dedupe_state_dict(model)
    groups = CTGroups()
    for name in targets:
        m = model.get_submodule(name)
        if isinstance(m, SCHEME_MODULES):
            groups.add(name, scheme_group(m))
        for key in [k for k in sd if k.startswith(f"{name}.") and k[len(name) + 1:] in ("weight", "mask")]:
            del sd[key]
        w = m.weight.detach()
        if isinstance(m, PrunedLinear):
            w = w * m.mask.to(w.dtype)
        sd.update(sparse24_tensors(name, w))
    nonzero = sum(int(_nonzero(model.get_submodule(n).weight).sum()) for n in targets)
    total = sum(model.get_submodule(n).weight.numel() for n in targets)
    sparsity = {"format": FORMAT, "targets": sorted(targets), "ignore": [], "sparsity_structure": "2:4",
                "global_sparsity": 1.0 - nonzero / max(total, 1)}
    quantized = {t for g in groups.groups.values() for t in g["targets"]}
    qcfg = groups.config(ct_ignore(model, quantized)) if groups.groups else {
        "quant_method": "compressed-tensors", "config_groups": {}, "format": "dense",
        "quantization_status": "compressed", "ignore": []}
    qcfg["sparsity_config"] = sparsity
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_hf_files(tmp, model, qcfg, tokenizer)
    return out_dir
