import copy

import pytest
import torch
from torch import nn

from torchcompress.errors import ConfigError
from torchcompress.nn.pruned_linear import PrunedLinear
from torchcompress.prune import MagnitudePruneConfig, prune_
from torchcompress.prune.semi import semi_structured_unavailable, to_semi_structured_
from torchcompress.training.pruning import (
    CubicSchedule,
    GradualPruner,
    pruning_callback,
)


def test_cubic_schedule_values():
    s = CubicSchedule(0.8, begin_step=10, end_step=110, frequency=10)
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(10) == 0.0
    assert s.sparsity_at(60) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert s.sparsity_at(65) == s.sparsity_at(60)  # held between updates
    assert s.sparsity_at(110) == s.sparsity_at(500) == 0.8
    vals = [s.sparsity_at(t) for t in range(10, 111, 10)]
    steps = [b - a for a, b in zip(vals, vals[1:])]
    assert all(x > 0 for x in steps) and steps == sorted(steps, reverse=True)  # fast first, then slower
    with pytest.raises(ConfigError, match="end_step"):
        CubicSchedule(0.5, begin_step=5, end_step=5)
    with pytest.raises(ConfigError, match="final_sparsity"):
        CubicSchedule(1.0)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_plain_loop_reaches_target_and_masks_stay():
    model = _mlp()
    pruner = GradualPruner(model, final_sparsity=0.75, begin_step=0, end_step=40, frequency=10, ignore=())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    seen, prev = [], [m.mask.clone() for m in pruner.layers.values()]
    for step in range(50):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        for m in pruner.layers.values():  # pruned weights get no gradient
            assert bool((m.weight.grad[~m.mask] == 0).all())
        opt.step()
        opt.zero_grad()
        if pruner.step(step + 1) is not None:
            seen.append(pruner.sparsity())
            now = [m.mask.clone() for m in pruner.layers.values()]
            assert all(bool((n <= p).all()) for n, p in zip(now, prev))  # never revived
            prev = now
    assert seen == sorted(seen) and len(seen) == 4
    for m in pruner.layers.values():
        assert m.pruned_count() == round(0.75 * m.mask.numel())
    masks = [m.mask.clone() for m in pruner.layers.values()]
    assert all(isinstance(model[i], PrunedLinear) for i in (0, 2))
    assert masks[0].sum() == 128


def test_trainer_callback(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model = _mlp()
    pruner = GradualPruner(model, final_sparsity=0.5, begin_step=0, end_step=4, frequency=2, ignore=())
    cb = pruning_callback(pruner)
    state, control = TrainerState(), TrainerControl()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    for step in range(1, 5):
        state.global_step = step
        cb.on_step_end(args, state, control)
    assert pruner.sparsity() == pytest.approx(0.5, abs=1e-3)


def test_semi_structured_fallback_on_cpu():
    model = _mlp()
    prune_(model, MagnitudePruneConfig(n=2, m=4), ignore=())
    ref = copy.deepcopy(model)
    assert to_semi_structured_(model) == 0  # CPU: stays masked dense
    assert "not CUDA" in semi_structured_unavailable(torch.device("cpu"), torch.float16)
    x = torch.randn(3, 16)
    assert torch.equal(model(x), ref(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU with 2:4 sparse tensor cores")
def test_semi_structured_gpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).half().cuda()
    prune_(model, MagnitudePruneConfig(n=2, m=4), ignore=())
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    want = model(x)
    assert to_semi_structured_(model) == 2
    assert not isinstance(model[0], PrunedLinear)
    torch.testing.assert_close(model(x), want, rtol=2e-2, atol=2e-2)
