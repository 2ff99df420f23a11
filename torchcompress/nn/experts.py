"""Mixture-of-experts feed-forwards as one ``nn.Linear`` per expert projection.

transformers 5 keeps a MoE layer's experts fused in memory: ``gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I) parameters of one module, while checkpoints store one tensor per expert
and projection (``experts.3.w1.weight``). Every compression technique here works on ``nn.Linear``,
so :class:`ExpertLinears` holds each expert's gate, up and down projections as plain linears (named
as the checkpoint names them) and computes what the fused module's eager forward computes: each
routed token through its experts, weighted by the router, summed.

``routed[e]`` holds the row indices (into the flattened ``(B * L)`` tokens) that expert ``e`` got in
the last forward: calibration statistics use it to keep only real (unpadded) tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ExpertLinears(nn.ModuleList):
    """``experts[e].<gate>``, ``.<up>``, ``.<down>``: (I, H), (I, H), (H, I) linears without bias."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), device=None, dtype=None):
        super().__init__()
        self.names = tuple(names)
        self.num_experts = num_experts
        # a plain attribute, not a child: the list's children are the experts alone (activations hold no tensors)
        object.__setattr__(self, "act_fn", act_fn)
        self.routed: dict[int, torch.Tensor] = {}
        g, u, d = self.names
        for _ in range(num_experts):
            e = nn.Module()
            e.add_module(g, nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype))
            e.add_module(u, nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype))
            e.add_module(d, nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype))
            self.append(e)

    def projections(self, e: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        g, u, d = self.names
        ex = self[e]
        return getattr(ex, g), getattr(ex, u), getattr(ex, d)

    @classmethod
    @torch.no_grad()
    def from_fused(cls, fused: nn.Module, names: tuple[str, str, str]) -> "ExpertLinears":
        """The per-expert linears of a transformers fused experts module (meta stays meta)."""
        gate_up, down = fused.gate_up_proj, fused.down_proj  # (E, 2I, H), (E, H, I)
        n, two_i, hidden = gate_up.shape
        inter = two_i // 2
        out = cls(n, hidden, inter, fused.act_fn, names, device="meta", dtype=gate_up.dtype)
        if not gate_up.is_meta:
            for e in range(n):
                g, u, d = out.projections(e)
                # gate first, then up: transformers' default gate splits gate_up_out with chunk(2)
                g.weight = nn.Parameter(gate_up[e, :inter].clone(), requires_grad=False)
                u.weight = nn.Parameter(gate_up[e, inter:].clone(), requires_grad=False)
                d.weight = nn.Parameter(down[e].clone(), requires_grad=False)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states (T, H); top_k_index, top_k_weights (T, k)
        out = torch.zeros_like(hidden_states)
        self.routed = {}
        with torch.no_grad():
            hit = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).sum(dim=(0, 1))  # (E + 1,)
            experts = (hit[: self.num_experts] > 0).nonzero().flatten().tolist()
        for e in experts:
            token_idx, k_pos = torch.where(top_k_index == e)  # (T_e,) rows, their slot among the top k
            self.routed[e] = token_idx
            x = hidden_states[token_idx]  # (T_e, H): gate and up read this one tensor (one shared Hessian)
            g, u, d = self.projections(e)
            y = d(self.act_fn(g(x)) * u(x))  # (T_e, H)
            y = y * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, names={self.names}"
