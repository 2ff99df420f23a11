import math

import pytest
import torch

from torchcompress.distill import (
    KDConfig,
    hidden_state_loss,
    kd_loss,
    shift_for_causal_lm,
)
from torchcompress.errors import ConfigError, InputError


def _direct(zs, zt, labels, mask, T, ws, wh):
    """Token by token, with math.exp/log: the formula of the docstring, written independently."""
    soft = hard = 0.0
    n = 0
    B, L, V = zs.shape
    for b in range(B):
        for t in range(L):
            if (mask is not None and not mask[b, t]) or labels[b, t] == -100:
                continue
            n += 1
            es = [math.exp(float(zs[b, t, v]) / T) for v in range(V)]
            et = [math.exp(float(zt[b, t, v]) / T) for v in range(V)]
            ps = [e / sum(es) for e in es]
            pt = [e / sum(et) for e in et]
            soft += sum(pt[v] * math.log(pt[v] / ps[v]) for v in range(V))
            e1 = [math.exp(float(zs[b, t, v])) for v in range(V)]
            hard += -math.log(e1[int(labels[b, t])] / sum(e1))
    return ws * T * T * soft / n + wh * hard / n, T * T * soft / n, hard / n


@pytest.mark.parametrize("T", [1.0, 2.0, 4.5])
def test_kd_loss_equals_direct_formula(T):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 3, torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 1] = -100  # ignored
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padding
    loss, parts = kd_loss(zs, zt, labels, mask, temperature=T, soft_weight=0.7, hard_weight=0.3)
    want, soft, hard = _direct(zs, zt, labels, mask, T, 0.7, 0.3)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(parts["soft"]) == pytest.approx(soft, rel=1e-12)
    assert float(parts["hard"]) == pytest.approx(hard, rel=1e-12)


def test_kd_loss_zero_for_identical_logits_and_masked_tokens_do_not_count():
    z = torch.randn(3, 4, 11)
    loss, _ = kd_loss(z, z.clone(), temperature=3.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    zt = torch.randn(3, 4, 11)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[:, -1] = False
    base, _ = kd_loss(z, zt, mask=mask)
    z2, zt2 = z.clone(), zt.clone()
    z2[:, -1] += 100 * torch.randn(3, 11)  # garbage on padding changes nothing
    assert float(kd_loss(z2, zt2, mask=mask)[0]) == pytest.approx(float(base), rel=1e-6)


def test_kd_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    labels[1, 0] = -100
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    f = lambda x: kd_loss(x, zt, labels, mask, temperature=2.5, soft_weight=0.6, hard_weight=0.4)[0]
    assert torch.autograd.gradcheck(f, (zs,))
    # teacher gets no gradient (it is a fixed target)
    zt_req = zt.clone().requires_grad_(True)
    kd_loss(zs, zt_req, temperature=2.0)[0].backward()
    assert zt_req.grad is None


def test_soft_gradient_scale_independent_of_temperature_for_large_T():
    """T^2 scaling: for large T the soft gradient tends to (z_s - z_t)/(V*N) (Hinton et al. 2015, eq. 3)."""
    zs = torch.randn(1, 1, 6, dtype=torch.float64)
    zs = (zs - zs.mean()).requires_grad_(True)
    zt = torch.randn(1, 1, 6, dtype=torch.float64)
    zt = zt - zt.mean()
    kd_loss(zs, zt, temperature=1000.0)[0].backward()
    assert torch.allclose(zs.grad, (zs - zt).detach() / 6, rtol=1e-2, atol=1e-6)


def test_hidden_state_loss_formula_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    hs = tuple(torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ht = tuple(torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(5))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = hidden_state_loss(hs, ht, ((1, 2), (2, 4)), mask)
    m = mask.bool()
    want = sum(((hs[s] - ht[t]) ** 2).mean(-1)[m].mean() for s, t in ((1, 2), (2, 4))) / 2
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: hidden_state_loss((hs[0], a, b), ht, ((1, 2), (2, 4)), mask), (hs[1], hs[2]))
    with pytest.raises(InputError, match="projection"):
        hidden_state_loss((torch.randn(1, 2, 3),), (torch.randn(1, 2, 5),), ((0, 0),))
    with pytest.raises(InputError, match="out of range"):
        hidden_state_loss(hs, ht, ((7, 0),))


def test_shift_for_causal_lm_masks_pad_targets():
    ids = torch.tensor([[5, 6, 7, 0]])
    am = torch.tensor([[1, 1, 1, 0]])
    logits, tgt, mask = shift_for_causal_lm(torch.zeros(1, 4, 9), ids, am)
    assert logits.shape == (1, 3, 9) and tgt.tolist() == [[6, 7, 0]] and mask.tolist() == [[True, True, False]]


def test_bad_inputs_are_typed_errors():
    z = torch.randn(2, 3, 5)
    with pytest.raises(InputError, match="temperature"):
        kd_loss(z, z, temperature=0.0)
    with pytest.raises(InputError, match="vocabulary"):
        kd_loss(z, torch.randn(2, 3, 6))
    with pytest.raises(InputError, match="labels"):
        kd_loss(z, z, hard_weight=1.0)
    with pytest.raises(ConfigError, match="temperature"):
        KDConfig(temperature=-1)
    with pytest.raises(ConfigError, match="layer_map"):
        KDConfig(hidden_weight=1.0)
    with pytest.raises(ConfigError, match="layer_map"):
        KDConfig(layer_map=((1, "a"),))
    with pytest.raises(ConfigError, match="nothing to train"):
        KDConfig(soft_weight=0.0)
