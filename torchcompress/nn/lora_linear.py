"""LoRALinear: a frozen base layer plus a trainable low-rank update ``scaling * B @ A``.

The base layer is kept whole as ``base_layer`` (``nn.Linear``, :class:`QuantLinear`, ``GPTQLinear``,
``GGUFLinear``), so state-dict keys read ``<path>.base_layer.weight`` / ``<path>.lora_A.weight`` /
``<path>.lora_B.weight``: the names PEFT uses once the adapter name is dropped.

    y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling        # (..., K) -> (..., N)
    scaling = alpha / r     (rsLoRA: alpha / sqrt(r))

Initialisation follows PEFT (and RNG draws happen in the same order, so one seed gives the same
adapters): A and B are built as ``nn.Linear`` (each draws its default init), then A is re-drawn
with ``kaiming_uniform_(a=sqrt(5))`` ("default") or ``normal_(std=1/r)`` ("gaussian") and B is zeroed.

Example::

    lora = LoRALinear(nn.Linear(576, 576), r=8, alpha=16)
    y = lora(torch.randn(2, 576))
    lora.merge(); lora.unmerge()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError, InputError

INITS = ("default", "gaussian")


@dataclass(frozen=True)
class MergeError:
    """What re-quantizing ``W + scaling * B @ A`` into the base's format lost (vs the float sum)."""

    mse: float
    sqnr_db: float
    max_abs: float
    base_kind: str  # the module kind the merged weight was re-quantized into


def _float_base(base: nn.Module) -> bool:
    """A base whose dense weight is a float parameter we may add to exactly."""
    w = getattr(base, "weight", None)
    return isinstance(w, torch.Tensor) and w.is_floating_point() and not getattr(base, "is_packed", False)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default"):
        super().__init__()
        for field in ("in_features", "out_features"):
            if not isinstance(getattr(base_layer, field, None), int):
                raise InputError(f"LoRALinear: base layer {type(base_layer).__name__} has no integer {field}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError("r", f"must be a positive integer, got {r!r}")
        if init not in INITS:
            raise ConfigError("init", f"must be one of {', '.join(INITS)}, got {init!r}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)  # the base stays frozen; only A and B train
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        # built as nn.Linear like PEFT: their default inits draw from the RNG before the LoRA init
        self.lora_A = nn.Linear(self.in_features, r, bias=False)  # (r, K)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)  # (N, r)
        self.reset_lora_parameters(init)
        dev, dtype = self._base_device_dtype()
        self.lora_A.to(device=dev, dtype=dtype)
        self.lora_B.to(device=dev, dtype=dtype)
        self.merged = False
        self.merge_error: MergeError | None = None
        self._unmerged_base: nn.Module | None = None  # a quantized base as it was before merge()
        self._merged_delta: torch.Tensor | None = None  # what merge() added to a pruned base's kept weights

    def _base_device_dtype(self):
        b = self.base_layer
        w = getattr(b, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            return w.device, w.dtype
        t = next((t for t in list(b.parameters()) + list(b.buffers())), None)
        dev = t.device if t is not None else torch.device("cpu")
        bias = getattr(b, "bias", None)
        return dev, bias.dtype if isinstance(bias, torch.Tensor) else torch.float32

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        nn.init.zeros_(self.lora_B.weight)

    # compression transforms (RTN, GPTQ, GGUF, pruning) may replace base_layer but never the adapters
    compression_skip = ("lora_A", "lora_B")

    # the base's tensors, for code that looks at ``module.weight`` (dtype/device checks)
    @property
    def weight(self):
        return getattr(self.base_layer, "weight", None)

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``, (N, K), in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        y = self.base_layer(x)
        if self.merged:
            return y
        a = self.lora_A.weight
        return y + self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))).to(y.dtype) * self.scaling

    # -- merge / unmerge -----------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, name: str = "weight") -> MergeError | None:
        """Fold the update into the base. Float bases: exact (``W += scaling * B @ A``), returns None.
        A :class:`PrunedLinear` base: the update is added to the kept weights only (the mask and its
        N:M pattern stay); the part that falls on pruned weights is lost and reported as the error.
        Quantized bases: dequantize, add, re-quantize with the base's own scheme; the original base
        is kept so :meth:`unmerge` restores it bit for bit; returns (and stores) the added error."""
        if self.merged:
            return self.merge_error
        base = self.base_layer
        delta = self.delta_weight()
        from .pruned_linear import PrunedLinear

        if isinstance(base, PrunedLinear):  # the update lands on the kept weights only: sparsity stays
            self.merge_error = self._merge_pruned(base, delta)
        elif _float_base(base):
            base.weight.data += delta.to(base.weight.dtype)
            self.merge_error = None
        else:
            from ..eval.metrics import mse, sqnr

            target = base.dequantize(torch.float32) + delta.float()  # (N, K) the exact merged weight
            new = requantize_like(base, target, name)
            got = new.dequantize(torch.float32)
            self.merge_error = MergeError(mse(target, got), sqnr(target, got),
                                          float((target - got).abs().max()), type(new).__name__)
            self._unmerged_base = base
            self.base_layer = new
        self.merged = True
        return self.merge_error

    def _merge_pruned(self, base: nn.Module, delta: torch.Tensor) -> MergeError:
        from ..eval.metrics import mse, sqnr

        keep = base.mask.to(base.weight.dtype)
        before = base.weight.detach().float() * keep.float()
        target = before + delta.float()  # the exact (dense) merged weight
        base.weight.data += (delta.to(base.weight.dtype) * keep)
        got = base.weight.detach().float() * keep.float()
        self._merged_delta = got - before  # what unmerge() takes back
        return MergeError(mse(target, got), sqnr(target, got), float((target - got).abs().max()), type(base).__name__)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (float: ``W -= scaling * B @ A``; quantized: the original base back)."""
        if not self.merged:
            return
        if self._unmerged_base is not None:
            self.base_layer, self._unmerged_base = self._unmerged_base, None
        elif getattr(self, "_merged_delta", None) is not None:  # a PrunedLinear base
            self.base_layer.weight.data -= self._merged_delta.to(self.base_layer.weight.dtype)
            self._merged_delta = None
        else:
            self.base_layer.weight.data -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False
        self.merge_error = None

    def merged_base(self, name: str = "weight") -> nn.Module:
        """Merge and return the base alone (drop the adapter): the layer to deploy."""
        self.merge(name)
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.use_rslora}, merged={self.merged}"


def requantize_like(base: nn.Module, w: torch.Tensor, name: str = "weight") -> nn.Module:
    """A new module of ``base``'s format computing with ``w`` (N, K) quantized as ``base`` was.

    QuantLinear: RTN with its scheme. GPTQLinear: RTN with its scheme into a plain QuantLinear
    (GPTQ's error feedback needs calibration data a merge does not have). GGUFLinear: its block type.
    """
    from .gguf_linear import GGUFLinear
    from .quant_linear import QuantLinear

    n, k = w.shape
    bias = getattr(base, "bias", None)
    lin = nn.Linear(k, n, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w.to(torch.float32), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    if isinstance(base, QuantLinear):  # GPTQLinear included
        new = QuantLinear.from_linear(lin, base.scheme, name=name)
    elif isinstance(base, GGUFLinear):
        new = GGUFLinear.from_linear(lin, base.qtype, name=name)
    else:
        raise InputError(f"{name}: cannot merge a LoRA update into a {type(base).__name__} base")
    return new.requires_grad_(False)


def lora_linear_manifest(m: LoRALinear) -> dict:
    """Checkpoint entry; a quantized base gets its own entry (``<name>.base_layer``) after this one."""
    if m.merged:
        from ..errors import FormatError

        raise FormatError("LoRALinear", "is merged; unmerge() or merge_lora_(model) (which unloads) before saving")
    drop = m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0
    return {"type": "LoRALinear", "in_features": m.in_features, "out_features": m.out_features,
            "bias": getattr(m.base_layer, "bias", None) is not None, "r": m.r, "alpha": m.alpha,
            "dropout": drop, "use_rslora": m.use_rslora}


def lora_linear_from_manifest(entry: dict, device="meta") -> LoRALinear:
    with torch.device(device):
        base = nn.Linear(int(entry["in_features"]), int(entry["out_features"]), bias=bool(entry["bias"]))
        return LoRALinear(base, int(entry["r"]), float(entry["alpha"]), float(entry["dropout"]),
                          bool(entry["use_rslora"]))
