"""Hugging Face Trainer integration: QAT and self-distillation callbacks, a DistillationTrainer.

Imports transformers; import this module explicitly (``torchcompress.training.hf``).

Example::

    trainer = DistillationTrainer(teacher=float_model, kd=KDConfig(temperature=2.0), model=student,
                                  args=args, train_dataset=ds, callbacks=[QATCallback(QATConfig(scheme))])
    trainer.train()                                    # or trainer.train(resume_from_checkpoint=True)

Checkpoints are the Trainer's own: the fake-quant model's state dict has the float master weights
under the original ``*.weight`` names (plus ``*.weight_scale`` with LSQ), so ``resume_from_checkpoint``
reloads them into the prepared model and training continues on the same loss curve.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..api import freeze_, quantize_
from ..config import QATConfig
from ..distill.config import KDConfig
from ..distill.distiller import Distiller
from .hooks import is_qat_prepared


class QATCallback(TrainerCallback):
    """Prepares the model for QAT when the Trainer is built (before its optimizer exists) and packs it
    when training ends (``freeze=True``; keep it False to continue training or to save master weights)."""

    def __init__(self, config: QATConfig, *, targets: Iterable = (nn.Linear,), ignore: Iterable | None = None,
                 freeze: bool = False):
        self.config, self.targets, self.ignore, self.freeze = config, tuple(targets), ignore, freeze

    def prepare(self, model: nn.Module) -> None:
        if not is_qat_prepared(model):
            quantize_(model, self.config, targets=self.targets, ignore=self.ignore)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.prepare(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not is_qat_prepared(model):
            raise RuntimeError("QATCallback: the model is not prepared for QAT; pass the callback to the Trainer "
                               "constructor (it prepares before the optimizer is built)")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.freeze and model is not None:
            freeze_(model)


class EMACallback(TrainerCallback):
    """Updates an :class:`~torchcompress.distill.self_distill.EMATeacher` after every optimizer step."""

    def __init__(self, ema):
        self.ema = ema

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.on_step_end(state.global_step, model, None)


class DistillationTrainer(Trainer):
    """A Trainer whose loss is the KD loss of :class:`~torchcompress.distill.Distiller` against ``teacher``
    (kept in eval mode, no gradients, moved to the student's device). Batches need ``input_ids``;
    ``attention_mask`` and ``labels`` (-100 = ignored) are used when present. The loss is the mean over
    the valid tokens of the whole optimizer step: under gradient accumulation each micro-batch's mean is
    weighted by its share of the step's target tokens (``num_items_in_batch``), so batch 8 / accumulation 1
    and batch 4 / accumulation 2 give the same loss and gradients. Without labels (no count from the
    Trainer) the Trainer divides by the accumulation steps: the mean of the micro-batches' means."""

    def __init__(self, *args, teacher: nn.Module, kd: KDConfig = KDConfig(), **kwargs):
        super().__init__(*args, **kwargs)
        self.distiller = Distiller(teacher.to(self.args.device), kd)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kw = {"output_hidden_states": True} if self.distiller.config.hidden_weight else {}
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), **kw)
        loss, _ = self.distiller.loss(model, inputs["input_ids"], inputs.get("attention_mask"),
                                      inputs.get("labels"), student_out=out)
        if num_items_in_batch is not None and inputs.get("labels") is not None:
            loss = loss * (self._local_items(inputs) / num_items_in_batch)
            if getattr(self.args, "average_tokens_across_devices", False) and self.accelerator.num_processes > 1:
                # the count is summed over processes and DDP averages gradients: undo that average
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.accelerator.num_processes // tp)
        return (loss, out) if return_outputs else loss

    def _local_items(self, inputs) -> torch.Tensor:
        # counted exactly as the Trainer counts num_items_in_batch, so the weights of a step's micro-batches sum to 1
        if "shift_labels" in inputs:
            labels = inputs["shift_labels"]
        else:
            labels = inputs["labels"][..., 1:] if getattr(self, "_loss_shifts_labels", False) else inputs["labels"]
        return labels.ne(-100).sum()  # a tensor: no device sync
