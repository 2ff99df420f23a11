"""Sparsity per layer and per model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from ..nn.pruned_linear import PrunedLinear


@dataclass
class LayerSparsity:
    name: str
    shape: tuple
    params: int
    zeros: int  # weights that are zero (masked or stored as 0)
    pattern: str  # "dense", "unstructured", "N:M"

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.params, 1)


@dataclass
class SparsityReport:
    layers: list = field(default_factory=list)
    model_params: int = 0  # every parameter of the model (tied ones once)

    @property
    def linear_params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def linear_zeros(self) -> int:
        return sum(r.zeros for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over the reported linears."""
        return self.linear_zeros / max(self.linear_params, 1)

    def to_dict(self) -> dict:
        return {"model_params": self.model_params, "linear_params": self.linear_params,
                "linear_zeros": self.linear_zeros, "sparsity": self.sparsity,
                "layers": [dict(asdict(r), sparsity=r.sparsity) for r in self.layers]}

    def table(self) -> str:
        lines = [f"{'layer':<48} {'shape':>14} {'sparsity':>9} pattern"]
        for r in self.layers:
            lines.append(f"{r.name:<48} {'x'.join(map(str, r.shape)):>14} {r.sparsity:9.4f} {r.pattern}")
        lines.append(f"{'all linears':<48} {self.linear_params:>14} {self.sparsity:9.4f}")
        return "\n".join(lines)


def sparsity_report(model: nn.Module, linears_only_pruned: bool = False) -> SparsityReport:
    """Zeros of every Linear weight (a PrunedLinear counts its mask), plus the model's parameter count."""
    rep = SparsityReport()
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            rep.model_params += p.numel()
    mods = set()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or id(m) in mods:
            continue
        mods.add(id(m))
        if linears_only_pruned and not isinstance(m, PrunedLinear):
            continue
        w = m.weight.detach()
        if isinstance(m, PrunedLinear):
            zeros = int(((w == 0) | ~m.mask).sum())
            pattern = f"{m.nm[0]}:{m.nm[1]}" if m.nm else "unstructured"
        else:
            zeros = int((w == 0).sum())
            pattern = "dense" if zeros == 0 else "unstructured"
        rep.layers.append(LayerSparsity(name, tuple(w.shape), w.numel(), zeros, pattern))
    return rep
