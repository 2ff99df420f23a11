"""Mixture-of-experts layers on the block pipeline: unfused experts and checkpoint key names.

transformers 5 builds a MoE layer's experts as one module with 3-D ``gate_up_proj`` / ``down_proj``
parameters and converts the checkpoint's per-expert tensors (``block_sparse_moe.experts.3.w1.weight``)
into them at load time with its conversion mapping (``transformers.conversion_mapping``): renamings
of whole keys (``.block_sparse_moe.`` -> ``.mlp.``) and converters that stack per-expert tensors.

Here the experts are unfused instead (:func:`unfuse_experts_`): one :class:`~..nn.experts.ExpertLinears`
per layer whose linears carry the checkpoint's own leaf names, read from the same converters
(``w1``/``w3``/``w2`` for Mixtral, ``gate_proj``/``up_proj``/``down_proj`` for Qwen-MoE). A checkpoint
key then maps to a module tensor by the mapping's renamings alone (:func:`checkpoint_names`), in
both directions, and every quantizer and statistic sees one ``nn.Linear`` per expert projection.
"""

from __future__ import annotations

import logging
import re

import torch.nn as nn

from ..nn.experts import ExpertLinears

log = logging.getLogger(__name__)

DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")
_LEAF = re.compile(r"experts\.\*\.([A-Za-z0-9_]+)\.weight$")


def _conversions(model: nn.Module) -> list:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # an older transformers: no conversion machinery, checkpoint keys are module keys
        return []
    try:
        return list(get_model_conversion_mapping(model))
    except (AttributeError, TypeError, ValueError):  # not a transformers PreTrainedModel
        return []


def _patterns(t, attr: str) -> list[str]:
    return list(getattr(t, f"_original_{attr}", None) or getattr(t, attr))


def expert_leaf_names(model: nn.Module) -> tuple[str, str, str]:
    """(gate, up, down) names of one expert's projections in the checkpoint, from the model's
    conversion mapping: the converter into ``experts.gate_up_proj`` stacks [gate, up] in that order
    (``MergeModulelist`` then ``Concatenate(dim=1)``), the one into ``experts.down_proj`` the downs."""
    from transformers.core_model_loading import WeightConverter

    gate = up = down = None
    for t in _conversions(model):
        if not isinstance(t, WeightConverter):
            continue
        targets = _patterns(t, "target_patterns")
        leaves = [m.group(1) for m in (_LEAF.search(s) for s in _patterns(t, "source_patterns")) if m]
        if len(targets) != 1 or len(leaves) != len(_patterns(t, "source_patterns")):
            continue
        if targets[0].endswith("experts.gate_up_proj") and len(leaves) == 2:
            gate, up = leaves
        elif targets[0].endswith("experts.down_proj") and len(leaves) == 1:
            down = leaves[0]
    if None in (gate, up, down):
        return DEFAULT_NAMES
    return gate, up, down


def fused_experts(model: nn.Module) -> list[str]:
    """Names of transformers fused experts modules of the layout :class:`ExpertLinears` computes:
    concatenated [gate; up] (E, 2I, H), down (E, H, I), no bias, no post-expert norm."""
    out = []
    for name, m in model.named_modules():
        gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if not (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3):
            continue
        plain = (getattr(m, "has_gate", True) and getattr(m, "is_concatenated", True)
                 and not getattr(m, "is_transposed", False) and not getattr(m, "has_bias", False)
                 and not getattr(m, "has_post_expert_norm", False) and hasattr(m, "act_fn"))
        e, two_i, h = gu.shape
        if plain and dn.shape == (e, h, two_i // 2):
            out.append(name)
        else:
            log.warning("%s: fused experts of a layout the pipeline does not unfuse; they stay float", name)
    return out


def unfuse_experts_(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by :class:`ExpertLinears` (in place; meta
    parameters stay meta, real ones are copied expert by expert). Returns the names replaced."""
    from ..targets import set_submodule

    names = fused_experts(model)
    if names:
        leaves = expert_leaf_names(model)
        for name in names:
            set_submodule(model, name, ExpertLinears.from_fused(model.get_submodule(name), leaves))
    return names


def checkpoint_names(model: nn.Module, keys) -> dict[str, str]:
    """``{module tensor name: checkpoint key}`` for the checkpoint ``keys`` whose name the model's
    conversion mapping changes (renamings only: the model's experts are unfused)."""
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [t for t in _conversions(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return {}
    out = {}
    for key in keys:
        new = apply_renamings(key, renamings)
        if new != key:
            out[new] = key
    return out


def match_expert_layout(model: nn.Module, directory) -> list[str]:
    """Unfuse ``model``'s experts (:func:`unfuse_experts_`) unless the safetensors in ``directory``
    hold them fused (a model saved without the unfusing). Reads headers only."""
    from pathlib import Path

    from .shards import INDEX_NAME, SINGLE_NAME, read_header

    fused = set(fused_experts(model))
    if not fused:
        return []
    d = Path(directory)
    if (d / INDEX_NAME).is_file():
        import json

        try:
            keys = dict(json.loads((d / INDEX_NAME).read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError):  # the loader names what is wrong with the index
            keys = {}
    elif (d / SINGLE_NAME).is_file():
        keys = read_header(d / SINGLE_NAME)
    else:
        keys = {}
    if any(k.rsplit(".", 1)[0] in fused for k in keys if k.endswith((".gate_up_proj", ".down_proj"))):
        return []
    return unfuse_experts_(model)


def unfuse_for_manifest(model: nn.Module, modules) -> list[str]:
    """Unfuse ``model``'s experts when the manifest ``modules`` names compressed modules inside them."""
    fused = fused_experts(model)
    if any(str(n).startswith(f"{f}.") for f in fused for n in modules):
        return unfuse_experts_(model)
    return []


def routed_owners(block: nn.Module) -> dict[int, tuple[ExpertLinears, int]]:
    """``{id(linear): (experts module, expert index)}`` for the expert linears under ``block``."""
    out = {}
    for m in block.modules():
        if isinstance(m, ExpertLinears):
            for e in range(len(m)):
                for lin in m[e].children():
                    out[id(lin)] = (m, e)
    return out


def disk_namer(model: nn.Module):
    """``name -> name`` a plain transformers checkpoint of ``model``'s family stores (its conversion
    mapping's renamings reversed, as ``save_pretrained`` does: Mixtral's ``.mlp.`` is
    ``.block_sparse_moe.`` on disk), or None when ``model`` has no unfused experts or nothing renames."""
    if not any(isinstance(m, ExpertLinears) for m in model.modules()):
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        mapping = list(get_model_conversion_mapping(model, add_legacy=False))
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    reverse = [t.reverse_transform() for t in mapping[::-1] if type(t) is WeightRenaming]
    if not reverse:
        return None
    return lambda name: apply_renamings(name, reverse)


def module_namer(model: nn.Module):
    """The inverse of :func:`disk_namer`: a checkpoint name -> ``model``'s module name (None: identity)."""
    if disk_namer(model) is None:
        return None
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [t for t in _conversions(model) if type(t) is WeightRenaming]
    return lambda name: apply_renamings(name, renamings)


def routers(model: nn.Module) -> list[str]:
    """Names of the router-like children of every MoE layer (``gate``, ``shared_expert_gate``): the
    modules with their own parameters next to an ``experts`` child. They stay float."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(getattr(m, "experts", None), nn.Module):
            continue
        for c, child in m.named_children():
            if c != "experts" and any(True for _ in child.parameters(recurse=False)):
                out.append(f"{name}.{c}" if name else c)
    return out
