"""Knowledge-distillation losses (pure tensor math: no modules, no hooks).

``kd_loss`` is Hinton et al.'s loss for token-level language models::

    soft = T^2 * mean_{valid tokens} KL( softmax(z_t / T) || softmax(z_s / T) )
    hard = mean_{valid tokens} CE(z_s, label)
    loss = soft_weight * soft + hard_weight * hard

A token is valid when its ``mask`` entry is true (padding is false) and its label is not
``ignore_index`` (-100, the Hugging Face convention). The T^2 factor keeps the soft gradients'
magnitude independent of T (the 1/T^2 of d softmax(z/T) / dz).

Example::

    loss, parts = kd_loss(student_logits, teacher_logits, labels, temperature=2.0, hard_weight=0.5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError


def _valid(shape: torch.Size, device, labels, mask, ignore_index: int) -> torch.Tensor:
    valid = torch.ones(shape, dtype=torch.bool, device=device)
    if mask is not None:
        if mask.shape != shape:
            raise InputError(f"kd_loss: mask shape {tuple(mask.shape)} != logits shape without vocab {tuple(shape)}")
        valid &= mask.bool()
    if labels is not None:
        if labels.shape != shape:
            raise InputError(f"kd_loss: labels shape {tuple(labels.shape)} != logits shape without vocab {tuple(shape)}")
        valid &= labels != ignore_index
    return valid


def kd_loss(
    student_logits: torch.Tensor,  # (..., V)
    teacher_logits: torch.Tensor | None,  # (..., V) or None (hard loss only)
    labels: torch.Tensor | None = None,  # (...) int64
    mask: torch.Tensor | None = None,  # (...) bool/int, 1 = real token
    *,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict]:
    """Weighted soft (KL at temperature T, times T^2) + hard (CE) loss, mean over valid tokens.

    Returns ``(loss, {"soft": ..., "hard": ...})`` (the parts detached, for logging).
    """
    if not temperature > 0:
        raise InputError(f"kd_loss: temperature must be > 0, got {temperature}")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise InputError(f"kd_loss: teacher logits {tuple(teacher_logits.shape)} != student logits "
                         f"{tuple(student_logits.shape)} (same tokenizer/vocabulary needed)")
    if hard_weight and labels is None:
        raise InputError("kd_loss: hard_weight > 0 needs labels")
    valid = _valid(student_logits.shape[:-1], student_logits.device, labels, mask, ignore_index)  # (...)
    n = valid.sum().clamp(min=1)
    zero = student_logits.sum() * 0.0  # keeps the graph (and dtype) when a part is unused
    parts = {}
    loss = zero
    if soft_weight and teacher_logits is not None:
        log_ps = F.log_softmax(student_logits / temperature, dim=-1)
        log_pt = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
        kl_tok = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (...)
        soft = temperature**2 * (kl_tok * valid).sum() / n
        parts["soft"] = soft.detach()
        loss = loss + soft_weight * soft
    if hard_weight:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        ce_tok = F.cross_entropy(student_logits.flatten(0, -2), safe.flatten(), reduction="none").view(valid.shape)
        hard = (ce_tok * valid).sum() / n
        parts["hard"] = hard.detach()
        loss = loss + hard_weight * hard
    return loss, parts


def hidden_state_loss(
    student_hidden: tuple[torch.Tensor, ...],  # each (B, L, D_s), e.g. output_hidden_states
    teacher_hidden: tuple[torch.Tensor, ...],  # each (B, L, D_t)
    layer_map: tuple[tuple[int, int], ...],  # (student index, teacher index) pairs
    mask: torch.Tensor | None = None,  # (B, L)
    projections: dict | None = None,  # str(student index) -> module mapping D_s to D_t
) -> torch.Tensor:
    """Mean over mapped pairs of the per-token mean squared error between hidden states."""
    if not layer_map:
        raise InputError("hidden_state_loss: layer_map is empty")
    total = student_hidden[0].sum() * 0.0
    for s_i, t_i in layer_map:
        for idx, hs, who in ((s_i, student_hidden, "student"), (t_i, teacher_hidden, "teacher")):
            if not -len(hs) <= idx < len(hs):
                raise InputError(f"hidden_state_loss: {who} layer index {idx} out of range (have {len(hs)} hidden states)")
        hs = student_hidden[s_i]
        ht = teacher_hidden[t_i].detach().to(hs.device)  # a teacher may sit on another device
        if projections is not None and str(s_i) in projections:
            hs = projections[str(s_i)](hs)
        if hs.shape != ht.shape:
            raise InputError(f"hidden_state_loss: student hidden {s_i} {tuple(hs.shape)} vs teacher hidden {t_i} "
                             f"{tuple(ht.shape)}: give a projection for student index {s_i}")
        acc = torch.promote_types(hs.dtype, torch.float32)  # at least float32 (bf16 students), float64 kept
        err = (hs.to(acc) - ht.to(acc)).pow(2).mean(-1)  # (B, L)
        if mask is not None:
            m = mask.to(err.dtype)
            total = total + (err * m).sum() / m.sum().clamp(min=1)
        else:
            total = total + err.mean()
    return total / len(layer_map)


def shift_for_causal_lm(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None):
    """Align (B, L, V) next-token logits with their targets: returns (logits[:, :-1], labels[:, 1:], mask[:, 1:]).

    ``labels`` default to ``input_ids``; a target counts when both it and its input are real tokens.
    """
    labels = input_ids if labels is None else labels
    tgt = labels[:, 1:]
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return logits[:, :-1], tgt, mask
