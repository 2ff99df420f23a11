"""A Linear whose weight is multiplied by a keep-mask in forward.

The mask is a bool buffer, so pruned weights stay zero through training (their gradient is zero).
Pruned weights are stored as zeros, so a checkpoint needs no mask where ``mask == (weight != 0)``
(the usual case): the state dict then holds only the weight and bias, and loading rebuilds the mask
from the zeros. Where a kept weight is exactly 0 the mask goes into the state dict as packed bits
(``mask_bits``, (N, ceil(K/8)) uint8, LSB first). Old checkpoints with a bool ``mask`` still load
(their manifest entries have no ``"mask"`` field). ``make_permanent()`` folds the mask into the
weight and returns a plain ``nn.Linear``.

Example::

    layer = PrunedLinear.from_linear(linear, keep_mask)
    layer.sparsity()  # fraction of weights pruned
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NumericError
from ..primitives.packing import pack, packed_len, unpack

MASK_STORAGE = ("zeros", "bits", "bool")  # none (from the weight's zeros), packed bits, legacy bool buffer


class PrunedLinear(nn.Linear):
    """``y = x (W * mask)^T + b``. ``mask`` is True where a weight is kept."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        self.nm: tuple[int, int] | None = None  # the N:M pattern the mask follows, if any
        # how the state dict holds the mask: None decides from the data (zeros when they say it, else bits);
        # a skeleton built from a manifest is pinned to what the checkpoint holds
        self.mask_storage: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor, weight: torch.Tensor | None = None,
                    nm: tuple[int, int] | None = None, name: str = "weight") -> PrunedLinear:
        """Wrap ``linear`` (sharing nothing with it) with ``mask``; ``weight`` replaces its weight
        (SparseGPT's updated weights)."""
        w = linear.weight.detach() if weight is None else weight.detach()
        if mask.shape != linear.weight.shape or mask.dtype != torch.bool:
            raise NumericError(name, f"mask must be bool {tuple(linear.weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        if w.shape != linear.weight.shape:
            raise NumericError(name, f"new weight has shape {tuple(w.shape)}, expected {tuple(linear.weight.shape)}")
        dev, dt = linear.weight.device, linear.weight.dtype
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight = nn.Parameter((w.to(device=dev, dtype=torch.float32) * mask.to(dev)).to(dt),
                                  requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        new.mask = mask.to(dev).clone()
        new.nm = nm
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask.to(self.weight.dtype), self.bias)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (gradual pruning); the newly pruned weights are zeroed."""
        if mask.shape != self.mask.shape:
            raise NumericError("mask", f"expected shape {tuple(self.mask.shape)}, got {tuple(mask.shape)}")
        self.mask = mask.to(device=self.mask.device, dtype=torch.bool).clone()
        self.weight.mul_(self.mask.to(self.weight.dtype))

    # -- storage --------------------------------------------------------------------------------

    def mask_storage_now(self) -> str:
        """How :meth:`state_dict` writes the mask: pinned, or ``zeros`` when the weight's zeros are the mask."""
        if self.mask_storage is not None:
            return self.mask_storage
        if self.weight.is_meta or self.mask.is_meta:
            return "bits"
        return "zeros" if bool(torch.equal(self.weight != 0, self.mask)) else "bits"

    def stored_mask_bytes(self) -> int:
        """Bytes the mask adds to a checkpoint: 0, the packed bits, or the legacy bool buffer."""
        how = self.mask_storage_now()
        return 0 if how == "zeros" else self.mask.numel() if how == "bool" else self.out_features * packed_len(self.in_features, 1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        how = self.mask_storage_now()
        if how == "bool":
            return
        mask = destination.pop(prefix + "mask")
        if how == "bits":
            if mask.is_meta:
                destination[prefix + "mask_bits"] = torch.empty(self.out_features, packed_len(self.in_features, 1),
                                                                dtype=torch.uint8, device="meta")
            else:
                destination[prefix + "mask_bits"] = pack(mask.detach().to(torch.uint8), 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        bits = state_dict.pop(prefix + "mask_bits", None)
        has_bool = prefix + "mask" in state_dict
        if bits is not None and not has_bool:
            if tuple(bits.shape) != (self.out_features, packed_len(self.in_features, 1)) or bits.dtype != torch.uint8:
                error_msgs.append(f"{prefix}mask_bits: expected uint8 ({self.out_features}, "
                                  f"{packed_len(self.in_features, 1)}), got {bits.dtype} {tuple(bits.shape)}")
                return
            state_dict[prefix + "mask"] = unpack(bits, 1, self.in_features).bool()
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if bits is None and not has_bool:  # no mask stored: the weight's zeros are the mask
            if prefix + "mask" in missing_keys[n_missing:]:
                missing_keys.remove(prefix + "mask")
            if not self.weight.is_meta:
                self.mask = (self.weight.detach() != 0).to(self.weight.device)
        if not self.weight.is_meta:
            self.mask_storage = None  # loaded: the next save decides from the data again

    def sparsity(self) -> float:
        """Fraction of weights pruned by the mask."""
        return 1.0 - float(self.mask.sum()) / self.mask.numel()

    def pruned_count(self) -> int:
        return int(self.mask.numel() - self.mask.sum())

    @torch.no_grad()
    def make_permanent(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the mask folded into its (zeroed) weight."""
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        out.weight = nn.Parameter(self.weight * self.mask.to(self.weight.dtype), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            out.bias = self.bias
        return out

    def extra_repr(self) -> str:
        nm = f", {self.nm[0]}:{self.nm[1]}" if self.nm else ""
        return f"{super().extra_repr()}, sparsity={self.sparsity():.3f}{nm}"


def pruned_linear_manifest(m: PrunedLinear) -> dict:
    d = {"type": "PrunedLinear", "in_features": m.in_features, "out_features": m.out_features,
         "bias": m.bias is not None, "dtype": str(m.weight.dtype).removeprefix("torch.")}
    how = m.mask_storage_now()
    if how != "bool":  # absent: an older checkpoint with the bool buffer
        d["mask"] = how
    if m.nm:
        d["nm"] = list(m.nm)
    return d


def pruned_linear_from_manifest(entry: dict, device="meta") -> PrunedLinear:
    dtype = getattr(torch, str(entry.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {entry.get('dtype')!r}")
    m = PrunedLinear(int(entry["in_features"]), int(entry["out_features"]), bool(entry["bias"]), device=device, dtype=dtype)
    nm = entry.get("nm")
    m.nm = (int(nm[0]), int(nm[1])) if nm else None
    how = entry.get("mask", "bool")
    if how not in MASK_STORAGE:
        raise ValueError(f"unknown mask storage {how!r} (expected one of {', '.join(MASK_STORAGE)})")
    m.mask_storage = how
    return m
