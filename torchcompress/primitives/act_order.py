"""Act-order (``g_idx``) weights rearranged so that every group is a contiguous run of columns.

GPTQ with act-order gives column ``k`` the group ``g_idx[k]``, so a group's columns are scattered
over the row and no group-wise kernel applies. But ``y = x W^T`` does not change when the columns
of ``W`` and of ``x`` are permuted alike: with ``perm = argsort(g_idx)`` (stable),

    y = x[..., perm] @ W[:, perm]^T

and ``W[:, perm]`` has ``g_idx[perm]`` sorted. When that equals ``arange(K) // group_size`` (what
GPTQ's dynamic groups produce: every group ``group_size`` columns, the last possibly shorter), the
permuted codes are an ordinary group-wise layout, the scales and zero points are unchanged, and
the int_linear kernels compute the product exactly as for RTN weights: same codes, same scales,
same dequantized values, only the columns visited in another order.

    >>> layout = sort_by_group(qweight, g_idx, bits=4, in_features=K, n_groups=G)
    >>> if layout is not None:
    ...     y = int_linear(x.index_select(-1, layout.perm), layout.qweight, scale, zero, ..., layout.group_size, K)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack, unpack


@dataclass(frozen=True)
class SortedLayout:
    perm: torch.Tensor  # (K,) int64: sorted column i is original column perm[i]
    qweight: torch.Tensor  # (N, ceil(K*bits/8)) uint8: codes[:, perm], packed
    group_size: int


def sequential_group_size(g_idx: torch.Tensor, in_features: int, n_groups: int) -> int | None:
    """The group size ``gs`` if ``g_idx == arange(K) // gs`` with ``ceil(K / gs) == n_groups``, else None."""
    if g_idx.numel() != in_features or n_groups < 1:
        return None
    gs = int((g_idx == 0).sum()) if n_groups > 1 else in_features  # group 0 is a full group
    if gs < 1 or -(-in_features // gs) != n_groups:
        return None
    ref = torch.arange(in_features, device=g_idx.device, dtype=torch.int64) // gs
    return gs if torch.equal(g_idx.to(torch.int64), ref) else None


def sort_by_group(qweight: torch.Tensor, g_idx: torch.Tensor, bits: int, in_features: int,
                  n_groups: int) -> SortedLayout | None:
    """Codes with their columns sorted by group, or None when the sorted groups are not the
    uniform ``arange(K) // group_size`` layout (then only the g_idx reference applies)."""
    perm = torch.argsort(g_idx.to(torch.int64), stable=True)
    gs = sequential_group_size(g_idx[perm], in_features, n_groups)
    if gs is None:
        return None
    codes = unpack(qweight, bits, in_features)  # (N, K) uint8
    return SortedLayout(perm, pack(codes[:, perm].contiguous(), bits), gs)
