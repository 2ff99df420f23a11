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
