"""A model-shaped view of one decoder block, so name-based targets (``re:.*mlp.*``, ``lm_head``,
``model.layers.3.self_attn.q_proj``) match the block's modules by their full names."""

from __future__ import annotations

import torch.nn as nn


def block_view(prefix: str, block: nn.Module) -> nn.Module:
    """A root module whose ``prefix`` (``"model.layers.3."``) path leads to ``block`` and nothing else."""
    root = node = nn.Module()
    parts = prefix.rstrip(".").split(".")
    for p in parts[:-1]:
        child = nn.Module()
        node.add_module(p, child)
        node = child
    node.add_module(parts[-1], block)
    return root


def modules_view(model: nn.Module, names: list[str]) -> nn.Module:
    """A root module holding only the named submodules of ``model`` (the parts outside the blocks)."""
    root = nn.Module()
    for name in names:
        node = root
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(node, p):
                node.add_module(p, nn.Module())
            node = getattr(node, p)
        node.add_module(parts[-1], model.get_submodule(name))
    return root
