"""Self-distillation teachers built from the student itself.

* :class:`EMATeacher`: an exponential moving average of the student's parameters (Tarvainen &
  Valpola's mean teacher); ``update(student)`` after every optimizer step:
  ``t <- decay * t + (1 - decay) * s``. Buffers are copied.
* :class:`CheckpointEnsemble`: the student's own earlier snapshots; the teacher's logits are the
  mean of the members' logits (a geometric-mean ensemble of their distributions).

Both are callables returning an object with ``.logits``, so :class:`~.distiller.Distiller` takes them
as teachers. Both are plain-loop hooks (``on_step_end``) with ``state_dict`` for checkpoints.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import ConfigError


def _frozen_copy(model: nn.Module) -> nn.Module:
    t = copy.deepcopy(model).eval()
    t.requires_grad_(False)
    return t


class EMATeacher(nn.Module):
    def __init__(self, student: nn.Module, decay: float = 0.999, every: int = 1):
        super().__init__()
        if isinstance(decay, bool) or not 0.0 <= decay < 1.0:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {decay!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError("every", f"must be a positive integer, got {every!r}")
        self.decay, self.every = float(decay), every
        self.model = _frozen_copy(student)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        s_params = dict(student.named_parameters())
        for name, t in self.model.named_parameters():
            t.lerp_(s_params[name].detach().to(t.dtype), 1.0 - self.decay)
        s_bufs = dict(student.named_buffers())
        for name, b in self.model.named_buffers():
            b.copy_(s_bufs[name])

    def on_step_end(self, step: int, model: nn.Module, loss: float) -> None:
        if step % self.every == 0:
            self.update(model)

    def train(self, mode: bool = True):  # the teacher never trains (no dropout)
        return super().train(False)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class CheckpointEnsemble(nn.Module):
    """Up to ``max_members`` earlier snapshots of the student; ``snapshot`` every ``every`` steps."""

    def __init__(self, max_members: int = 3, every: int = 100):
        super().__init__()
        for name, v in (("max_members", max_members), ("every", every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(name, f"must be a positive integer, got {v!r}")
        self.max_members, self.every = max_members, every
        self.members = nn.ModuleList()

    @torch.no_grad()
    def snapshot(self, student: nn.Module) -> None:
        self.members.append(_frozen_copy(student))
        if len(self.members) > self.max_members:
            del self.members[0]

    def on_train_begin(self, model: nn.Module) -> None:
        if not len(self.members):
            self.snapshot(model)

    def on_step_end(self, step: int, model: nn.Module, loss: float) -> None:
        if step % self.every == 0:
            self.snapshot(model)

    def train(self, mode: bool = True):
        return super().train(False)

    def state_dict(self, *args, **kwargs):
        return {"n": len(self.members), "members": [m.state_dict() for m in self.members]}

    def load_state_dict(self, state, strict: bool = True):
        while len(self.members) < state["n"]:
            self.members.append(_frozen_copy(self.members[0]))
        while len(self.members) > state["n"]:
            del self.members[0]
        for m, sd in zip(self.members, state["members"]):
            m.load_state_dict(sd)

    def forward(self, *args, **kwargs):
        if not len(self.members):
            raise RuntimeError("CheckpointEnsemble has no snapshot yet (call snapshot(student) first)")
        logits = None
        for m in self.members:
            out = m(*args, **kwargs)
            z = (out.logits if hasattr(out, "logits") else out).float()
            logits = z if logits is None else logits + z
        return SimpleNamespace(logits=logits / len(self.members))
