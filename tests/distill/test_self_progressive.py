import pytest
import torch

from tests.tiny import tiny_config
from torchcompress.distill import Distiller, KDConfig, TrainSettings
from torchcompress.distill.progressive import (
    ProgressiveStage,
    make_student,
    progressive_distill,
    resolve_keep,
)
from torchcompress.distill.self_distill import CheckpointEnsemble, EMATeacher
from torchcompress.errors import ConfigError
from torchcompress.training.loop import BatchSchedule, train


def _tiny(layers=2, seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(hidden_size=64, intermediate_size=96, num_hidden_layers=layers))


def test_ema_update_is_the_formula():
    s = _tiny()
    ema = EMATeacher(s, decay=0.9)
    t0 = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p))
    ema.update(s)
    for name, p in s.named_parameters():
        torch.testing.assert_close(dict(ema.model.named_parameters())[name], 0.9 * t0[name] + 0.1 * p.detach())
    assert all(not p.requires_grad for p in ema.parameters())
    with pytest.raises(ConfigError, match="ema_decay"):
        EMATeacher(s, decay=1.0)


def test_checkpoint_ensemble_mean_logits_and_rolling_members():
    s = _tiny()
    ens = CheckpointEnsemble(max_members=2, every=1)
    ids = torch.randint(0, 256, (1, 6))
    outs = []
    for i in range(3):
        with torch.no_grad():
            for p in s.parameters():
                p.mul_(1.1)
            outs.append(s(input_ids=ids).logits)
        ens.snapshot(s)
    assert len(ens.members) == 2
    torch.testing.assert_close(ens(input_ids=ids).logits, (outs[1] + outs[2]) / 2)
    state = ens.state_dict()
    ens2 = CheckpointEnsemble(max_members=2)
    ens2.snapshot(_tiny(seed=5))
    ens2.load_state_dict(state)
    torch.testing.assert_close(ens2(input_ids=ids).logits, (outs[1] + outs[2]) / 2)


def test_self_distillation_with_ema_trains():
    s = _tiny()
    ema = EMATeacher(s, decay=0.5)
    d = Distiller(ema, KDConfig(temperature=2.0, soft_weight=1.0, hard_weight=1.0))
    ids = torch.randint(0, 256, (8, 10), generator=torch.Generator().manual_seed(0))
    losses = train(s, BatchSchedule(ids, batch_size=8), lambda m, i, k: d.loss(m, i, k),
                   TrainSettings(steps=8, lr=3e-3), hooks=[ema])
    assert losses[-1] < losses[0]


def test_resolve_keep():
    assert resolve_keep("every_other", 30) == tuple(range(0, 28, 2)) + (29,)
    assert len(resolve_keep("every_other", 30)) == 15
    assert resolve_keep("every_other", 4) == (0, 3)
    assert resolve_keep(3, 5) == (0, 2, 4)
    assert resolve_keep([3, 1], 5) == (1, 3)
    for bad in (0, 9, [7], "half", [True]):
        with pytest.raises(ConfigError, match="keep"):
            resolve_keep(bad, 5)


def test_make_student_copies_kept_layers_and_runs():
    t = _tiny(layers=4).eval()
    s = make_student(t, [0, 3]).eval()
    assert s.config.num_hidden_layers == 2 and t.config.num_hidden_layers == 4
    sd_t, sd_s = t.state_dict(), s.state_dict()
    for new, old in ((0, 0), (1, 3)):
        for k in sd_t:
            if k.startswith(f"model.layers.{old}."):
                assert torch.equal(sd_s[k.replace(f"layers.{old}.", f"layers.{new}.")], sd_t[k])
    assert torch.equal(sd_s["model.embed_tokens.weight"], sd_t["model.embed_tokens.weight"])
    assert s.lm_head.weight is s.model.embed_tokens.weight  # tying kept
    # keeping all layers reproduces the teacher exactly
    ids = torch.randint(0, 256, (2, 7))
    torch.testing.assert_close(make_student(t, 4).eval()(input_ids=ids).logits, t(input_ids=ids).logits)


def test_progressive_distillation_chain():
    t = _tiny(layers=4).eval()
    ids = torch.randint(0, 256, (8, 10), generator=torch.Generator().manual_seed(1))
    stages = [ProgressiveStage(keep="every_other", kd=KDConfig(temperature=T), train=TrainSettings(steps=6, lr=3e-3, batch_size=4))
              for T in (2.0, 1.0)]
    seen = []
    final, hist = progressive_distill(t, stages, BatchSchedule(ids, batch_size=4),
                                      on_stage=lambda i, s, l: seen.append(s.config.num_hidden_layers))
    assert seen == [2, 1] and final.config.num_hidden_layers == 1 and t.config.num_hidden_layers == 4
    assert all(h[-1] < h[0] for h in hist)
