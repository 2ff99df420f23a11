"""A plain-PyTorch training loop with hooks, deterministic batches and save/resume.

Everything a custom loop needs for QAT and distillation, without Hugging Face's Trainer:

* :class:`BatchSchedule`: the batch of step ``i`` is a pure function of (seed, i), so a resumed run
  (or every process of a DDP run, each taking its slice) sees exactly the batches it would have.
* hooks: objects with any of ``on_train_begin(model)``, ``on_step_end(step, model, loss)``,
  ``on_train_end(model)``, and ``state_dict()/load_state_dict()`` to be checkpointed (an EMA teacher).
* checkpoints: ``{dir}/train_state.pt`` holds model, optimizer, scheduler, hooks, step and the loss
  history; written atomically every ``save_every`` steps and picked up by the next call.

Example::

    data = BatchSchedule(calib.input_ids, calib.attention_mask, batch_size=4)
    losses = train(model, data, causal_lm_loss, TrainSettings(steps=200, lr=1e-5))
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..distill.config import TrainSettings
from ..distill.distiller import module_device
from ..errors import InputError
from ..formats.atomic import atomic_file

log = logging.getLogger(__name__)
STATE_FILE = "train_state.pt"


class BatchSchedule:
    """Batches of rows of ``input_ids`` (N, L): epochs of seeded permutations, ``batch_size`` rows a step."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, batch_size: int = 4,
                 seed: int = 0):
        if input_ids.dim() != 2 or input_ids.shape[0] < batch_size:
            raise InputError(f"training data: need a (N, L) id tensor with N >= batch_size={batch_size}, "
                             f"got shape {tuple(input_ids.shape)}")
        self.input_ids = input_ids
        self.attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.batch_size, self.seed = batch_size, seed

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.input_ids.shape[0], generator=g)

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of global batch ``step``; with ``world`` > 1 the ``rank``-th equal slice of it."""
        b = self.batch_size
        per_epoch = self.input_ids.shape[0] // b
        i = step % per_epoch
        rows = self._perm(step // per_epoch)[i * b:(i + 1) * b]
        if world > 1:
            if b % world:
                raise InputError(f"batch_size {b} is not divisible by {world} processes")
            rows = rows.view(world, b // world)[rank]
        return self.input_ids[rows], self.attention_mask[rows]


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Next-token cross entropy over real (unpadded) targets (the batch is moved to the model's device)."""
    dev = module_device(model)
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, L-1, V)
    keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    tgt = input_ids[:, 1:].masked_fill(~keep, -100)
    loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
    return loss, {"ce": loss.detach()}


def _call(hooks: Iterable, name: str, *args) -> None:
    for h in hooks:
        fn = getattr(h, name, None)
        if fn is not None:
            fn(*args)


def _trainable(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _save(path: Path, model, opt, sched, hooks, step: int, losses: list) -> None:
    state = {"step": step, "losses": losses, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
             "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in hooks]}
    path.mkdir(parents=True, exist_ok=True)
    with atomic_file(path / STATE_FILE) as f:
        torch.save(state, f)


def _load(path: Path, model, opt, sched, hooks) -> tuple[int, list]:
    import pickle

    from ..errors import FormatError

    try:  # weights_only: tensors and plain containers only; a planted pickle payload never runs
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise FormatError(path / STATE_FILE, f"not a training state we wrote: {str(e).splitlines()[0]}") from None
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    for h, s in zip(hooks, state["hooks"]):
        if s is not None:
            h.load_state_dict(s)
    return int(state["step"]), list(state["losses"])


def train(
    model: nn.Module,
    data: BatchSchedule,
    loss_fn: Callable = causal_lm_loss,
    settings: TrainSettings = TrainSettings(),
    *,
    hooks: Iterable = (),
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int = 0,
    stop_after: int | None = None,
    accelerator=None,
    log_every: int = 10,
) -> list[float]:
    """Train ``model`` in place for ``settings.steps`` steps; returns the per-step (global) loss.

    ``loss_fn(model, input_ids, attention_mask) -> (loss, parts)``. With a ``checkpoint_dir`` holding
    a state file the run resumes from it. ``stop_after`` ends early (to test resume) after that
    step, saving first. With an ``accelerate.Accelerator`` each process trains on its slice of the
    global batch and gradients are averaged (DDP); the logged loss is the mean over processes.
    """
    hooks = list(hooks)
    _call(hooks, "on_train_begin", model)
    model.train()
    torch.manual_seed(settings.seed)
    opt = torch.optim.AdamW(_trainable(model), lr=settings.lr, weight_decay=settings.weight_decay)
    warm = settings.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    step, losses = 0, []
    rank, world, wrapped = 0, 1, model
    if accelerator is not None:
        wrapped, opt = accelerator.prepare(model, opt)
        rank, world = accelerator.process_index, accelerator.num_processes
    if ckpt is not None and (ckpt / STATE_FILE).is_file():
        step, losses = _load(ckpt, model, opt, sched, hooks)
        log.info("resumed from %s at step %d", ckpt, step)
    main = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator is not None else module_device(model)
    while step < settings.steps:
        ids, mask = data.batch(step, rank, world)
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        loss, parts = loss_fn(wrapped, ids, mask)
        opt.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
            if settings.max_grad_norm:
                accelerator.clip_grad_norm_(_trainable(model), settings.max_grad_norm)
            value = float(accelerator.reduce(loss.detach(), reduction="mean"))
        else:
            loss.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(_trainable(model), settings.max_grad_norm)
            value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value} at step {step}")
        opt.step()
        sched.step()
        step += 1
        losses.append(value)
        _call(hooks, "on_step_end", step, model, value)
        if log_every and (step % log_every == 0 or step == 1):
            log.info("step %d loss %.4f %s", step, value, {k: round(float(v), 4) for k, v in parts.items()})
        stopping = stop_after is not None and step >= stop_after
        if ckpt is not None and main and ((save_every and step % save_every == 0) or stopping or step >= settings.steps):
            _save(ckpt, model, opt, sched, hooks, step, losses)
        if stopping and step < settings.steps:
            return losses
    _call(hooks, "on_train_end", model)
    return losses
