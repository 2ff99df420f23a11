"""Hugging Face Trainer: DistillationTrainer + QATCallback train, checkpoint and resume to the same losses."""

import copy

import pytest
import torch

from tests.tiny import tiny_config
from torchcompress.config import QATConfig, QuantScheme
from torchcompress.distill import KDConfig
from torchcompress.nn.quant_linear import QuantLinear


class _DS(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 256, (16, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[-2:] = -100  # ignored targets
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


def _trainer(out_dir, max_steps=4):
    from transformers import LlamaForCausalLM, TrainingArguments

    from torchcompress.training.hf import DistillationTrainer, QATCallback

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_config(hidden_size=64, intermediate_size=96)).eval()
    student = copy.deepcopy(teacher)
    args = TrainingArguments(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, seed=0,
                             data_seed=0, lr_scheduler_type="constant", disable_tqdm=True)
    cb = QATCallback(QATConfig(QuantScheme(bits=3, group_size=32, symmetric=False)))
    return DistillationTrainer(model=student, args=args, train_dataset=_DS(), teacher=teacher,
                               kd=KDConfig(temperature=2.0, hard_weight=0.5), callbacks=[cb])


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_distillation_trainer_qat_checkpoint_resume(tmp_path):
    t = _trainer(tmp_path)
    up = t.model.model.layers[0].mlp.up_proj
    assert isinstance(up, QuantLinear) and not up.is_packed  # prepared in the constructor
    w0 = up.weight.detach().clone()
    t.train()
    full = _losses(t)
    assert set(full) == {1, 2, 3, 4}
    assert not torch.equal(up.weight.detach(), w0)  # the optimizer holds the fake-quant layers' master weights
    assert (tmp_path / "checkpoint-2").is_dir()
    t2 = _trainer(tmp_path)  # fresh model, prepared again, weights from the checkpoint
    t2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed = _losses(t2)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), (full, resumed)
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(t2.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_teacher_stays_frozen_in_eval_mode(tmp_path):
    t = _trainer(tmp_path, max_steps=1)
    before = {k: v.clone() for k, v in t.distiller.teacher.state_dict().items()}
    t.train()
    assert not t.distiller.teacher.training
    assert all(not p.requires_grad for p in t.distiller.teacher.parameters())
    for k, v in t.distiller.teacher.state_dict().items():
        assert torch.equal(v, before[k])


class _Ragged(torch.utils.data.Dataset):
    """8 rows whose numbers of valid targets differ, so a mean of micro-batch means is not the batch mean."""

    def __init__(self, n=8):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 256, (n, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[12 - (i % 5) * 2:] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


def _plain_trainer(out_dir, batch, accumulation, max_steps=1, lr=0.1, optim="sgd", ds=None):
    from transformers import LlamaForCausalLM, TrainingArguments

    from torchcompress.training.hf import DistillationTrainer

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_config(hidden_size=64, intermediate_size=96)).eval()
    torch.manual_seed(1)
    student = LlamaForCausalLM(tiny_config(hidden_size=64, intermediate_size=96))
    args = TrainingArguments(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, learning_rate=lr, optim=optim,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                             lr_scheduler_type="constant", disable_tqdm=True, max_grad_norm=1e9)
    return DistillationTrainer(model=student, args=args, train_dataset=ds or _Ragged(), teacher=teacher,
                               kd=KDConfig(temperature=2.0, hard_weight=0.5))


def _direct_loss(trainer, ds):
    """The KD loss over all of ``ds`` in one batch: the mean over every valid target token."""
    rows = [ds[i] for i in range(len(ds))]
    ids = torch.stack([r["input_ids"] for r in rows])
    mask = torch.stack([r["attention_mask"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    with torch.no_grad():
        return float(trainer.distiller.loss(trainer.model, ids, mask, labels)[0])


def test_gradient_accumulation_gives_the_full_batch_loss_and_gradients(tmp_path):
    # batch 8 / accumulation 1 and batch 4 / accumulation 2 see the same 8 rows in one optimizer step: the same
    # token-weighted loss and (SGD) the same update; before the fix the second logged twice the loss and gradient
    one = _plain_trainer(tmp_path / "a", batch=8, accumulation=1)
    expected = _direct_loss(one, _Ragged())
    w0 = {k: v.clone() for k, v in one.model.state_dict().items()}
    one.train()
    two = _plain_trainer(tmp_path / "b", batch=4, accumulation=2)
    two.train()
    h1 = [h for h in one.state.log_history if "loss" in h][0]
    h2 = [h for h in two.state.log_history if "loss" in h][0]
    assert h1["loss"] == pytest.approx(expected, rel=1e-5)
    assert h2["loss"] == pytest.approx(expected, rel=1e-5)
    assert h2["grad_norm"] == pytest.approx(h1["grad_norm"], rel=1e-4)
    moved = 0
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(two.model.state_dict()[k], v, rtol=1e-4, atol=1e-6)
        moved += not torch.equal(v, w0[k])
    assert moved > 0


def test_distillation_trainer_loss_falls_with_accumulation(tmp_path):
    ds = _DS()
    t = _plain_trainer(tmp_path, batch=4, accumulation=2, max_steps=12, lr=3e-3, optim="adamw_torch", ds=ds)
    before = _direct_loss(t, ds)
    t.train()
    after = _direct_loss(t, ds)
    assert t.state.global_step == 12
    # measured: 2.805 -> 2.059 (0.73x); a step that does nothing or climbs stays at or above 1.0x
    assert after < 0.85 * before, (before, after)
