"""Plain-loop QAT + distillation: resume gives the same loss curve; hooks prepare and pack."""

import copy

import pytest
import torch

from tests.tiny import tiny_config
from torchcompress.config import QATConfig, QuantScheme
from torchcompress.distill import Distiller, KDConfig, TrainSettings
from torchcompress.errors import InputError
from torchcompress.nn.quant_linear import QuantLinear
from torchcompress.training.hooks import QATHook
from torchcompress.training.loop import STATE_FILE, BatchSchedule, causal_lm_loss, train


def _tiny(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(hidden_size=64, intermediate_size=96))


def _data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (16, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 9:] = 0  # some padded rows
    return BatchSchedule(ids, mask, batch_size=4, seed=3)


def test_batch_schedule_is_deterministic_and_slices_for_ranks():
    d = _data()
    a, _ = d.batch(5)
    b, _ = d.batch(5)
    assert torch.equal(a, b)
    r0, _ = d.batch(5, 0, 2)
    r1, _ = d.batch(5, 1, 2)
    assert torch.equal(torch.cat([r0, r1]), a)
    # an epoch covers every row once
    rows = torch.cat([d.batch(i)[0] for i in range(4)])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, d.input_ids.tolist()))
    with pytest.raises(InputError, match="divisible"):
        d.batch(0, 0, 3)


def _qat_kd_run(tmp_path, stop_after=None):
    teacher = _tiny(0).eval()
    student = copy.deepcopy(teacher)
    hook = QATHook(QATConfig(QuantScheme(bits=3, group_size=32, symmetric=False), learnable_scale=True), freeze=False)
    d = Distiller(teacher, KDConfig(temperature=2.0, hard_weight=0.5))
    losses = train(student, _data(), lambda m, ids, mask: d.loss(m, ids, mask), TrainSettings(steps=6, lr=1e-3, warmup_steps=2),
                   hooks=[hook], checkpoint_dir=tmp_path, stop_after=stop_after)
    return student, losses


def test_qat_distill_resume_gives_same_loss_curve(tmp_path):
    full, curve = _qat_kd_run(tmp_path / "a")
    assert curve[-1] < curve[0]
    part, first = _qat_kd_run(tmp_path / "b", stop_after=3)
    assert len(first) == 3 and (tmp_path / "b" / STATE_FILE).is_file()
    resumed, rest = _qat_kd_run(tmp_path / "b")  # fresh model + hooks, picks up the state file
    assert rest == pytest.approx(curve, rel=1e-6, abs=1e-7)
    sd_a, sd_b = full.state_dict(), resumed.state_dict()
    assert sd_a.keys() == sd_b.keys() and any(k.endswith("weight_scale") for k in sd_a)
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], rtol=1e-5, atol=1e-6)


def test_qat_hook_prepares_before_optimizer_and_freezes_at_end():
    model = _tiny(1)
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    hook = QATHook(QATConfig(QuantScheme(bits=4, group_size=32)))
    losses = train(model, _data(), causal_lm_loss, TrainSettings(steps=3, lr=1e-3), hooks=[hook])
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, QuantLinear) and up.is_packed and len(losses) == 3
    # the master weights were trained (the optimizer saw the fake-quant layers' parameters)
    assert not torch.equal(up.dequantize(), QuantLinear.from_linear(torch.nn.Linear(64, 96), up.scheme).dequantize())
    assert not torch.allclose(up.dequantize(), w0, atol=0)


def test_causal_lm_loss_ignores_padding():
    model = _tiny(2).eval()
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids2 = ids.clone()
    ids2[1, 5:] = 7  # padding content is irrelevant
    with torch.no_grad():
        full, _ = causal_lm_loss(model, ids, mask)
        assert float(causal_lm_loss(model, ids2, mask)[0]) == pytest.approx(float(full), rel=1e-6)


class _MetaLM(torch.nn.Module):
    """A causal LM on the meta device: records where its inputs live and returns logits there."""

    def __init__(self, vocab=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8, device="meta")
        self.head = torch.nn.Linear(8, vocab, device="meta")
        self.seen = []

    def forward(self, input_ids, attention_mask=None, **kw):
        self.seen.append((input_ids.device.type, None if attention_mask is None else attention_mask.device.type))
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.head(self.emb(input_ids)))


def test_causal_lm_loss_and_distiller_move_batches_to_the_model_device():
    # CPU batches, a model elsewhere (meta stands in for CUDA): before the fix the forward saw CPU ids
    ids, mask = torch.randint(0, 32, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    student = _MetaLM()
    loss, _ = causal_lm_loss(student, ids, mask)
    assert loss.device.type == "meta" and student.seen == [("meta", "meta")]
    teacher, student = _MetaLM(), _MetaLM()
    loss, _ = Distiller(teacher, KDConfig(hard_weight=0.5)).loss(student, ids, mask, ids.clone())
    assert loss.device.type == "meta"
    assert teacher.seen == [("meta", "meta")] and student.seen == [("meta", "meta")]


class _DeviceRecorder(torch.nn.Module):
    """Its first parameter lives on meta (the 'accelerator'); a CPU parameter carries the loss."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, device="meta"))
        self.w = torch.nn.Parameter(torch.ones(1))


def test_train_loop_moves_batches_to_the_model_device():
    model, seen = _DeviceRecorder(), []

    def loss_fn(m, ids, mask):
        seen.append((ids.device.type, mask.device.type))
        return (m.w ** 2).sum(), {}

    train(model, _data(), loss_fn, TrainSettings(steps=2, lr=1e-2))
    assert seen == [("meta", "meta")] * 2
