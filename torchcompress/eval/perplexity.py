"""Perplexity over fixed-length windows, and KL divergence / top-1 agreement against a reference model.

Windows are consecutive, non-overlapping slices of ``seq_len`` tokens from the start of the
tokenized text (no BOS added, so every window is the same shape). Each window predicts its last
``seq_len - 1`` tokens; perplexity is ``exp(total NLL / predicted tokens)`` over all windows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError


@dataclass
class TextWindows:
    ids: torch.Tensor  # (W, L) int64
    description: str

    @property
    def tokens(self) -> int:
        return self.ids.numel()


def make_windows(tokenizer, text: str, seq_len: int, windows: int, description: str = "") -> TextWindows:
    if seq_len < 2:
        raise InputError(f"--seq-len: must be at least 2, got {seq_len}")
    if windows < 1:
        raise InputError(f"--windows: must be at least 1, got {windows}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    have = ids.numel() // seq_len
    if have == 0:
        raise InputError(f"{description or 'text'}: {ids.numel()} tokens, fewer than one window of {seq_len}")
    n = min(have, windows)
    return TextWindows(ids[: n * seq_len].view(n, seq_len).clone(), description)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out).float()


@dataclass
class EvalResult:
    perplexity: float
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    kl_divergence: float | None = None  # mean over tokens of KL(P_ref || P_model), nats
    top1_agreement: float | None = None  # fraction of positions with the same argmax
    perplexity_ref: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@torch.inference_mode()
def evaluate(model, windows: TextWindows, ref_model=None, batch_size: int = 1, progress=None) -> EvalResult:
    """Perplexity of ``model`` on ``windows``; with ``ref_model`` also KL and top-1 agreement."""
    model.eval()
    if ref_model is not None:
        ref_model.eval()
    nll = nll_ref = kl = 0.0
    agree = count = 0
    ids_all = windows.ids
    for start in range(0, ids_all.shape[0], batch_size):
        ids = ids_all[start : start + batch_size]  # (B, L)
        logp = F.log_softmax(_logits(model, ids)[:, :-1], dim=-1)  # (B, L-1, V)
        target = ids[:, 1:]
        nll -= float(logp.gather(-1, target.unsqueeze(-1)).sum())
        count += target.numel()
        if ref_model is not None:
            logq = F.log_softmax(_logits(ref_model, ids)[:, :-1], dim=-1)
            nll_ref -= float(logq.gather(-1, target.unsqueeze(-1)).sum())
            kl += float((logq.exp() * (logq - logp)).sum())
            agree += int((logq.argmax(-1) == logp.argmax(-1)).sum())
        if progress is not None:
            progress(ids.shape[0])
    res = EvalResult(math.exp(nll / count), count, ids_all.shape[0], ids_all.shape[1])
    if ref_model is not None:
        res.kl_divergence = kl / count
        res.top1_agreement = agree / count
        res.perplexity_ref = math.exp(nll_ref / count)
    return res
