"""Distiller: a frozen teacher plus the KD loss, for any loop (plain PyTorch, HF Trainer, recipes).

The teacher is put in eval mode with gradients off and always runs under ``torch.no_grad``.

Example::

    d = Distiller(teacher, KDConfig(temperature=2.0, hard_weight=0.5))
    loss, parts = d.loss(student, input_ids, attention_mask)
    loss.backward()
"""

from __future__ import annotations

import torch
from torch import nn

from .config import KDConfig
from .losses import hidden_state_loss, kd_loss, shift_for_causal_lm


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _hidden(out):
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        raise TypeError("hidden-state loss needs a model that returns hidden_states (output_hidden_states=True)")
    return hs


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the device of its first parameter (else buffer; CPU when it has none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


class Distiller:
    def __init__(self, teacher: nn.Module, config: KDConfig = KDConfig(), projections: nn.ModuleDict | None = None):
        self.teacher = teacher
        self.config = config
        self.projections = projections
        teacher.eval()
        teacher.requires_grad_(False)

    @torch.no_grad()
    def teacher_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        self.teacher.eval()  # a caller's model.train() on a shared parent must not re-enable dropout
        kw = {"output_hidden_states": True} if self.config.hidden_weight else {}
        dev = module_device(self.teacher)
        return self.teacher(input_ids=_on(input_ids, dev), attention_mask=_on(attention_mask, dev), **kw)

    def loss(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             labels: torch.Tensor | None = None, student_out=None) -> tuple[torch.Tensor, dict]:
        """KD loss of ``student`` on a causal-LM batch (targets are the next tokens; ``labels`` may
        carry -100 for ignored positions). ``student_out`` reuses an already computed forward."""
        cfg = self.config
        dev = module_device(student)  # batches may come from the CPU: compute where the student lives
        input_ids, attention_mask, labels = _on(input_ids, dev), _on(attention_mask, dev), _on(labels, dev)
        t_out = self.teacher_outputs(input_ids, attention_mask)
        if student_out is None:
            kw = {"output_hidden_states": True} if cfg.hidden_weight else {}
            student_out = student(input_ids=input_ids, attention_mask=attention_mask, **kw)
        s_logits, tgt, mask = shift_for_causal_lm(_logits(student_out), input_ids, attention_mask, labels)
        t_logits = _logits(t_out)[:, :-1].to(dev)
        loss, parts = kd_loss(s_logits.float(), t_logits.float(), tgt, mask, temperature=cfg.temperature,
                              soft_weight=cfg.soft_weight, hard_weight=cfg.hard_weight, ignore_index=cfg.ignore_index)
        if cfg.hidden_weight:
            h = hidden_state_loss(_hidden(student_out), _hidden(t_out), cfg.layer_map, attention_mask, self.projections)
            parts["hidden"] = h.detach()
            loss = loss + cfg.hidden_weight * h
        return loss, parts
