"""Match modules by type and fully-qualified name.

A pattern is one of:

* a module type (``nn.Linear``): matches instances (subclasses included);
* ``"re:<regex>"``: the regex must match the whole fully-qualified name (``re.fullmatch``);
* any other string: the exact fully-qualified name, or a name ending in ``"." + pattern``
  (so ``"lm_head"`` and ``"down_proj"`` do what one expects).

Example::

    select_modules(model, targets=[nn.Linear], ignore=["lm_head", "re:.*\\.0\\..*"])

Routers stay float: a linear that is a direct child of a mixture-of-experts layer (a module with an
``experts`` child), such as Mixtral's ``block_sparse_moe.gate`` in layouts where it is an ``nn.Linear``
or Qwen2-MoE's ``mlp.shared_expert_gate``, is selected only by a name target (a name or ``re:``
pattern that matches it), never by a module type: the convention of llm-compressor and vLLM, whose
kernels expect float routers, and the layers whose rounding reroutes tokens.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch.nn as nn

from .errors import ConfigError

Pattern = "str | type[nn.Module]"


def _compile(patterns, field: str) -> list:
    if isinstance(patterns, (str, type)):  # one pattern, not an iterable of characters
        patterns = (patterns,)
    out = []
    for p in patterns:
        if isinstance(p, type):
            out.append(p)
        elif isinstance(p, str) and p.startswith("re:"):
            try:
                out.append(re.compile(p[3:]))
            except re.error as e:
                raise ConfigError(field, f"invalid regex {p!r}: {e}") from None
        elif isinstance(p, str) and p:
            out.append(p)
        else:
            raise ConfigError(field, f"expected a module type, a name or 're:<regex>', got {p!r}")
    return out


def _matches(name: str, module: nn.Module, compiled: list) -> bool:
    for p in compiled:
        if isinstance(p, type):
            if isinstance(module, p):
                return True
        elif isinstance(p, re.Pattern):
            if p.fullmatch(name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def router_like(model: nn.Module) -> set[int]:
    """``id`` of every ``nn.Linear`` that is a direct child of a module with an ``experts`` child
    (the router and the shared-expert gate of a MoE layer; the experts' own linears sit deeper)."""
    out = set()
    for m in model.modules():
        if getattr(m, "experts", None) is None or not isinstance(m.experts, nn.Module):
            continue
        out.update(id(c) for n, c in m.named_children() if n != "experts" and isinstance(c, nn.Linear))
    return out


def select_modules(
    model: nn.Module, targets: Iterable = (nn.Linear,), ignore: Iterable = ()
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(fqn, module)`` for modules matching any target and no ignore pattern.

    Type targets select modules; name targets select modules by name. A module matched by name must
    still be a type the caller can handle: that check belongs to the caller. Router-like linears
    (:func:`router_like`) are selected by name targets only.
    """
    t = _compile(targets, "targets")
    i = _compile(ignore, "ignore")
    # wrappers name children that compression must leave alone (a LoRALinear's adapters stay float)
    keep = {id(getattr(m, c)) for m in model.modules() for c in getattr(m, "compression_skip", ())}
    routers = router_like(model)
    by_name = [p for p in t if not isinstance(p, type)]
    # remove_duplicate=False: a module registered under two names is yielded under each
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or id(module) in keep or _matches(name, module, i):
            continue
        if _matches(name, module, by_name if id(module) in routers else t):
            yield name, module


def set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the submodule at ``fqn`` (``"model.layers.0.mlp.up_proj"``) with ``new``."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
