"""GPTQ (Frantar et al. 2022) as pure functions: tensors in, tensors out.

For a linear layer ``y = x W^T`` with ``W`` (N, K) and calibration inputs ``X`` (K, T), GPTQ
quantizes ``W`` one input column at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian ``H^-1`` of the layer-wise squared error
``||W X - W_hat X||^2`` (``H = 2 X X^T / T``). The column order is fixed, so the updates need only
the rows of the upper Cholesky factor of ``H^-1``; they are applied lazily, block by block.

The rounding itself is the RTN step of :mod:`.affine` (``compute_qparams`` for a group's scale and
zero point, ``quantize_with_qparams`` for a column), so GPTQ and RTN codes mean the same thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import Granularity, QuantScheme
from ..errors import NumericError
from .affine import compute_qparams, dequantize_affine, search_qparams, effective_group_size, num_groups, quantize_with_qparams

DAMP_RETRIES = (10.0, 100.0, 1000.0)  # after the requested damping fails: these multiples of max(damp, 1%)


@dataclass
class GPTQResult:
    codes: torch.Tensor  # (N, K) uint8 unsigned codes, original column order
    scale: torch.Tensor  # (N, G) scale dtype ((1, 1) per-tensor)
    zero: torch.Tensor | None  # (N, G) uint8, None when symmetric
    g_idx: torch.Tensor  # (K,) int32: group of each input column
    group_size: int
    damp: float  # damping actually used (fraction of the mean diagonal); nan after RTN fallback
    fallback: bool  # True: the Hessian could not be factored even with extra damping; RTN used
    dead_columns: int
    bits: int
    act_order: bool = False  # the settings of the run, for export metadata
    static_groups: bool = False
    observer: str = "minmax"  # "mse": clip-searched ranges (search_qparams)

    @property
    def sequential_groups(self) -> bool:
        """True when ``g_idx`` is ``arange(K) // group_size`` (plain QuantLinear layout)."""
        k = self.g_idx.numel()
        return bool(torch.equal(self.g_idx, torch.arange(k, dtype=torch.int32) // self.group_size))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_with_g_idx(self.codes, self.scale, self.zero, self.g_idx, self.bits, dtype)


def dequantize_with_g_idx(codes, scale, zero, g_idx, bits: int, dtype=torch.float32) -> torch.Tensor:
    """``(codes - zero[:, g_idx]) * scale[:, g_idx]`` for any column -> group map. (N, K)."""
    if scale.shape == (1, 1):
        return dequantize_affine(codes, scale, zero, bits, codes.shape[1], dtype)
    g = g_idx.long()
    s = scale.float()[:, g]
    zp = float(1 << (bits - 1)) if zero is None else zero.float()[:, g]
    return ((codes.float() - zp) * s).to(dtype)


def accumulate_hessian(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``h += x^T x`` for inputs ``x`` (T, K) in float64; divide by T and multiply by 2 at the end."""
    xf = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return h.addmm_(xf.T, xf)


def _channel(scheme: QuantScheme) -> QuantScheme:
    return dataclasses.replace(scheme, granularity=Granularity.CHANNEL)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + d I)^-1`` trying growing damping; (None, nan) if all fail.

    Each damping level is tried in float32 (fast, what the reference does) and then float64."""
    for d in (damp,) + tuple(max(damp, 0.01) * m for m in DAMP_RETRIES):
        for dtype in (torch.float32, torch.float64):
            hd = h.to(dtype)  # a copy: damping is added to its diagonal
            # the damping in the working precision, from the diagonal in quantization order (as the
            # reference computes it: with the same float32 Hessian, the same bits and codes)
            hd.diagonal().add_(d * torch.diag(hd).mean())  # diag: a contiguous copy (its sum order)
            low, info = torch.linalg.cholesky_ex(hd)
            if int(info) != 0:
                continue
            hinv = torch.cholesky_inverse(low)
            up, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and (bool(torch.isfinite(up.sum())) or bool(torch.isfinite(up).all())):
                return up, d
    return None, float("nan")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    name: str = "weight",
    fused: bool | None = None,
    mse: bool = False,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``w`` (N, K) with the Hessian ``h`` (K, K) of its inputs.

    ``act_order`` quantizes columns in order of decreasing Hessian diagonal; with dynamic groups
    (``static_groups=False``) the groups then follow that order and ``g_idx`` records them.
    ``static_groups`` fixes every group's scale from the unquantized weight before any update, so
    ``g_idx`` stays ``arange(K) // group_size`` even with act-order.
    ``fused``: run each block's column loop as one Triton kernel (ops/triton/gptq_block.py) where
    the block's quantization parameters are known at its start (fixed parameters, or dynamic groups
    whose starts are block starts); default: on CUDA when Triton is installed. Same results.
    ``mse``: every scale (and zero point) comes from :func:`~.affine.search_qparams` (the range
    shrink that minimises the group's ``|w_hat - w|^2.4``, the reference quantizer's ``mse`` option)
    instead of the plain min/max of :func:`~.affine.compute_qparams`.
    ``mask``: (N, K) bool, True where a weight is kept (a pruned layer): pruned weights get the code
    of exactly 0 in every column, their updated values still feed the error back to later columns
    (as SparseGPT treats pruned weights), and scales see only kept weights. The sparsity pattern
    survives quantization exactly.
    """
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise NumericError(name, f"GPTQ needs W (N, K) and H (K, K); got {tuple(w.shape)} and {tuple(h.shape)}")
    for t, what in ((w, name), (h, f"{name} Hessian")):
        # a finite sum proves every entry finite; only a non-finite sum pays for the elementwise check
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            raise NumericError(what, "holds NaN/Inf values; refusing to quantize")
    n, k = w.shape
    gran = scheme.granularity
    gs = effective_group_size(scheme, k) if gran is Granularity.GROUP else k
    W = w.detach().float().clone()
    H = h.detach().to(torch.float64).clone()
    if mask is not None:
        if mask.shape != w.shape or mask.dtype != torch.bool:
            raise NumericError(name, f"mask must be bool {tuple(w.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.to(W.device)
        W = W * mask
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0  # an input that is always 0: any weight works; make it exactly 0
    W[:, dead] = 0.0

    # parameters known up front: per-tensor, per-channel, or static groups (from the float weight)
    qparams = search_qparams if mse else compute_qparams
    fixed = None
    if gran is not Granularity.GROUP:
        fixed = qparams(W, scheme)[:2]
    elif static_groups:
        fixed = qparams(W, scheme)[:2]  # (N, G) in original column order

    prepared = W  # masked, dead columns zeroed, original column order: what the RTN fallback quantizes
    perm = torch.arange(k)
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    M = None if mask is None else mask[:, perm]  # keep-mask in quantization order

    U, used = _inverse_cholesky(H, damp)
    if U is None:
        return _rtn_fallback(prepared, scheme, int(dead.sum()), qparams, mask, act_order, static_groups,
                             "mse" if mse else "minmax")
    U = U.float()

    G = num_groups(k, gs) if gran is Granularity.GROUP else 1
    sdtype = scheme.torch_scale_dtype
    scale = torch.empty(n, G, dtype=sdtype) if fixed is None else fixed[0]
    zero = None if scheme.symmetric else (torch.empty(n, G, dtype=torch.uint8) if fixed is None else fixed[1])
    codes = torch.empty(n, k, dtype=torch.uint8)
    g_idx = torch.empty(k, dtype=torch.int32)
    ch = _channel(scheme)
    cur_s = cur_z = None
    half, maxq = float(1 << (scheme.bits - 1)), float((1 << scheme.bits) - 1)
    perm_l = perm.tolist()
    fixed_sf = fixed_zf = None
    if fixed is not None:  # float copies, broadcastable to (N, 1) for per-channel / per-tensor
        fixed_sf = fixed[0].float()
        fixed_zf = None if fixed[1] is None else fixed[1].float()
        if gran is not Granularity.GROUP:
            fixed_sf = fixed_sf.expand(n, 1)
            fixed_zf = None if fixed_zf is None else fixed_zf.expand(n, 1)
    if fused is None:
        fused = W.is_cuda and _has_triton()
    # the fused kernel needs every block's parameters at its start: dynamic groups must start on blocks
    fused = fused and (fixed is not None or gs % block_size == 0) and mask is None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()  # (N, B) columns of this block, updated in place
        E1 = torch.zeros_like(W1)
        Q1 = torch.empty(n, i2 - i1, dtype=torch.uint8)
        U1 = U[i1:i2, i1:i2]
        diag = torch.diagonal(U1).tolist()
        if fused:
            if fixed is None and i1 % gs == 0:  # a new dynamic group starts with this block
                cur_s, cur_z, _ = qparams(W[:, i1:i1 + gs], ch)
                scale[:, i1 // gs:i1 // gs + 1] = cur_s
                if zero is not None:
                    zero[:, i1 // gs:i1 // gs + 1] = cur_z
            s_cols, z_cols = _block_qparams(fixed, gran, perm[i1:i2], gs, cur_s, cur_z, n)
            from ..ops.triton.gptq_block import triton_gptq_block

            Q1, E1 = triton_gptq_block(W1, U1, s_cols, z_cols, scheme.bits)
            codes[:, perm[i1:i2]] = Q1.to(codes.device)
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
            continue
        for i in range(i2 - i1):
            col = i1 + i  # position in quantization order
            if fixed is not None:
                if gran is Granularity.GROUP:
                    grp = perm_l[col] // gs
                    s_c, z_c = fixed_sf[:, grp:grp + 1], None if fixed_zf is None else fixed_zf[:, grp:grp + 1]
                else:  # per-channel (N, 1) or per-tensor (1, 1)
                    s_c, z_c = fixed_sf, fixed_zf
            else:
                if col % gs == 0:  # a new dynamic group: scale from its columns as updated so far
                    grp = col // gs
                    span = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs]
                    if M is not None:
                        span = span * M[:, col:col + span.shape[1]]
                    cur_s, cur_z, _ = qparams(span, ch)
                    scale[:, grp:grp + 1] = cur_s
                    if zero is not None:
                        zero[:, grp:grp + 1] = cur_z
                    cur_sf, cur_zf = cur_s.float(), None if cur_z is None else cur_z.float()
                s_c, z_c = cur_sf, cur_zf
            # the RTN step of affine.quantize_with_qparams / dequantize_affine on one column, inline
            # (same float operations, so the same codes; this loop runs once per input column)
            wc = W1[:, i:i + 1]  # (N, 1)
            qf = torch.round(wc / s_c)
            if z_c is None:
                qf = qf.clamp_(-half, half - 1)
                if M is not None:  # pruned: the code of exactly 0
                    qf = torch.where(M[:, col:col + 1], qf, 0.0)
                Q1[:, i] = (qf[:, 0] + half).to(torch.uint8)
                wq = qf * s_c
            else:
                qf = (qf + z_c).clamp_(0, maxq)
                if M is not None:  # pruned: the zero point's code, exactly 0
                    qf = torch.where(M[:, col:col + 1], qf, z_c)
                Q1[:, i] = qf[:, 0].to(torch.uint8)
                wq = (qf - z_c) * s_c
            err = (wc - wq) / diag[i]  # (N, 1)
            W1[:, i:] -= err @ U1[i:i + 1, i:]
            E1[:, i:i + 1] = err
        codes[:, perm[i1:i2]] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy update of the later blocks
    if gran is not Granularity.GROUP:
        g_idx.zero_()
    elif fixed is not None:  # static groups: by original column
        g_idx = torch.arange(k, dtype=torch.int32) // gs
    else:  # dynamic groups: by position in the quantization order
        g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    return GPTQResult(codes, scale, zero, g_idx, gs, used, False, int(dead.sum()), scheme.bits,
                      act_order, static_groups, "mse" if mse else "minmax")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _block_qparams(fixed, gran, cols: torch.Tensor, gs: int, cur_s, cur_z, n: int):
    """Per-column scales and zero points (N, B) fp32 of a block's columns ``cols`` (original order)."""
    if fixed is not None:
        scale, zero = fixed
        if gran is Granularity.GROUP:
            grp = cols // gs
            return scale.float()[:, grp], None if zero is None else zero.float()[:, grp]
        s = scale.float().expand(n, 1)
        return s.expand(n, cols.numel()), None if zero is None else zero.float().expand(n, 1).expand(n, cols.numel())
    b = cols.numel()
    return cur_s.float().expand(n, b), None if cur_z is None else cur_z.float().expand(n, b)


def rtn_result(w: torch.Tensor, scheme: QuantScheme, *, mse: bool = False, mask: torch.Tensor | None = None,
               act_order: bool = False, static_groups: bool = False) -> GPTQResult:
    """Round-to-nearest of ``w`` as a :class:`GPTQResult` marked ``fallback`` (a layer GPTQ cannot
    calibrate, e.g. an expert too few calibration tokens reach), with the run's range choice
    (``mse``: the clip search, else min/max); pruned weights (``mask`` False) get the code of 0."""
    W = w.detach().float().clone()
    if mask is not None:
        W = W * mask.to(W.device)
    qparams = search_qparams if mse else compute_qparams
    return _rtn_fallback(W, scheme, 0, qparams, mask, act_order, static_groups, "mse" if mse else "minmax")


def _rtn_fallback(w: torch.Tensor, scheme: QuantScheme, dead: int, qparams, mask, act_order: bool,
                  static_groups: bool, observer: str) -> GPTQResult:
    """Round-to-nearest of the weight GPTQ would have quantized (``w``: masked, dead columns zeroed),
    with the same range choice (``qparams``: min/max or the mse clip search); pruned weights get the
    code of exactly 0, as on the GPTQ path."""
    scale, zero, gs = qparams(w, scheme)
    codes = quantize_with_qparams(w, scale, zero, scheme.bits, gs)
    if mask is not None:
        n, k = w.shape
        if zero is None:
            zcode = torch.full_like(codes, 1 << (scheme.bits - 1))
        else:
            zcode = zero.expand(n, k) if zero.shape == (1, 1) else zero.repeat_interleave(gs, dim=1)[:, :k]
        codes = torch.where(mask, codes, zcode.to(codes.dtype))
    k = w.shape[1]
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    if scheme.granularity is not Granularity.GROUP:
        g_idx.zero_()
    return GPTQResult(codes, scale, zero, g_idx, gs, float("nan"), True, dead, scheme.bits,
                      act_order, static_groups, observer)


def layer_error(w_hat: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """``trace((W - W_hat) H (W - W_hat)^T)``: the layer's squared output error on the calibration set."""
    d = (w.double() - w_hat.double())
    return float(torch.einsum("nk,kl,nl->", d, h.double(), d))
