"""Numerics at the edges: NaN/Inf refused with the tensor's name (RTN, GPTQ, GGUF export, save);
all-zero, denormal and tiny groups give finite scales and exact or finite dequantization; nothing
non-finite is ever written to disk."""

from __future__ import annotations

import itertools

import pytest
import torch

import torchcompress as tc
from torchcompress.config import QuantScheme
from torchcompress.errors import NumericError
from torchcompress.primitives.affine import dequantize_affine, quantize_affine

pytestmark = pytest.mark.filterwarnings("ignore")

BAD = [float("nan"), float("inf"), float("-inf")]


def _llama(seed=0):
    from transformers import LlamaForCausalLM

    from tests.tiny import tiny_config

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size=256)).eval()


NAME = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
def test_rtn_refuses_non_finite_weight_by_name(bad):
    m = _llama()
    with torch.no_grad():
        m.get_submodule(NAME).weight[3, 5] = bad
    with pytest.raises(NumericError) as ei:
        tc.quantize_(m, tc.RTNConfig(QuantScheme(bits=4, group_size=32)))
    assert NAME in str(ei.value)


def _calib(n=4, length=16):
    from torchcompress.calibration.data import CalibrationSet

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (n, length), generator=g)
    return CalibrationSet(ids, torch.ones_like(ids))


@pytest.mark.parametrize("bad", BAD[:2], ids=["nan", "inf"])
def test_gptq_refuses_non_finite_weight_by_name(bad):
    from torchcompress.calibration.runner import gptq_model
    from torchcompress.config import GPTQConfig

    m = _llama()
    name = "model.layers.0.self_attn.o_proj"  # block 0: refused before any long work
    with torch.no_grad():
        m.get_submodule(name).weight[0, 0] = bad
    with pytest.raises(NumericError) as ei:
        gptq_model(m, GPTQConfig(QuantScheme(bits=4, group_size=32)), _calib())
    assert name in str(ei.value)


def test_gptq_refuses_non_finite_activations_by_name():
    """Calibration activations that go non-finite (here: an Inf in the float embedding, which is not
    quantized) are refused at the first layer that sees them, named, before any Hessian is used."""
    from torchcompress.calibration.runner import gptq_model
    from torchcompress.config import GPTQConfig

    m = _llama()
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 0] = float("inf")
    with pytest.raises(NumericError) as ei:
        gptq_model(m, GPTQConfig(QuantScheme(bits=4, group_size=32)), _calib())
    assert "model.layers.0." in str(ei.value)


@pytest.mark.parametrize("bad", BAD[:2], ids=["nan", "inf"])
def test_gguf_export_refuses_non_finite_weight_by_name(tmp_path, bad):
    from tests.tiny import make_tokenizer
    from torchcompress.formats.gguf_write import export_gguf

    tok = make_tokenizer(300)
    from transformers import LlamaForCausalLM

    from tests.tiny import tiny_config

    m = LlamaForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=64, intermediate_size=128)).eval()
    with torch.no_grad():
        m.get_submodule(NAME).weight[1, 1] = bad
    for qtype in ("Q8_0", "F16", "F32"):
        with pytest.raises(NumericError) as ei:
            export_gguf(m, tok, tmp_path / "m.gguf", qtype)
        assert "blk.1.ffn_down" in str(ei.value) or NAME in str(ei.value), str(ei.value)
        assert not (tmp_path / "m.gguf").exists() and list(tmp_path.iterdir()) == []


def test_save_refuses_non_finite_tensors_by_name(tmp_path):
    """No NaN is ever written: a float tensor left unquantized (a norm, a bias) that holds NaN/Inf is
    refused by save_compressed with its name, and nothing is written."""
    m = _llama()
    tc.quantize_(m, tc.RTNConfig(QuantScheme(bits=8, granularity="channel")))
    with torch.no_grad():
        m.model.norm.weight[2] = float("nan")
    with pytest.raises(NumericError, match=r"model\.norm\.weight"):
        tc.save_compressed(m, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- edge groups

EDGE_GROUPS = {
    "zero": torch.zeros(32),
    "denormal-min": torch.full((32,), 1.4e-45),  # the smallest float32 denormal
    "denormal-mixed": torch.tensor([1e-40, -3e-41, 0.0, 2e-39] * 8),
    "tiny-1e-30": torch.linspace(-1e-30, 1e-30, 32),  # below fp16's smallest subnormal (6e-8)
    "tiny-1e-6": torch.linspace(-1e-6, 1e-6, 32),
    "one-outlier": torch.tensor([0.0] * 31 + [1e-38]),
}

SCHEMES = [QuantScheme(bits=b, granularity=g, group_size=32, symmetric=s, scale_dtype=d)
           for b, g, s, d in itertools.product((2, 3, 4, 8), ("group", "channel"), (True, False),
                                               ("float16", "bfloat16", "float32"))]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"w{s.bits}-{s.granularity.value}-"
                         f"{'sym' if s.symmetric else 'asym'}-{s.scale_dtype}")
def test_edge_groups_give_finite_scales(scheme):
    # one row per edge case, next to a normal row, so per-tensor scale paths see them too
    normal = torch.randn(32, generator=torch.Generator().manual_seed(0))
    rows = [normal] + list(EDGE_GROUPS.values())
    w = torch.stack([torch.cat([r, r]) for r in rows])  # (R, 64): two groups of 32 per row
    q = quantize_affine(w, scheme, name="edge")
    assert torch.isfinite(q.scale.float()).all() and (q.scale.float() > 0).all(), q.scale
    w_hat = dequantize_affine(q.codes, q.scale, q.zero, scheme.bits, q.group_size)
    assert torch.isfinite(w_hat).all()
    assert (w_hat[1] == 0).all()  # an all-zero group stays exactly zero
    # a group never comes back larger than its range allows (no blow-up from a tiny scale)
    assert (w_hat.abs() <= w.abs().amax(1, keepdim=True) * 1.5 + 1e-6).all()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16"])
def test_gguf_edge_rows_are_finite(qtype):
    from torchcompress.primitives.gguf_blocks import dequantize, quantize
    from torchcompress.primitives.gguf_common import GGMLType

    qt = GGMLType[qtype]
    rows = [torch.cat([r] * 8) for r in EDGE_GROUPS.values()]  # 256 wide: one K-quant super-block
    w = torch.stack(rows)
    blocks = quantize(w, qt, name="edge")
    w_hat = dequantize(blocks, qt, tuple(w.shape))
    assert torch.isfinite(w_hat).all(), qtype
    assert (w_hat[0] == 0).all()


def test_gptq_edge_rows_are_finite():
    from torchcompress.primitives.gptq import gptq_quantize

    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    w = torch.stack([torch.cat([r, r]) for r in EDGE_GROUPS.values()] + [torch.randn(64)])
    x = torch.randn(256, 64)
    x[:, 5] = 0  # a dead input column
    h = x.T @ x
    res = gptq_quantize(w, h, scheme)
    assert torch.isfinite(res.scale.float()).all() and (res.scale.float() > 0).all()


def test_saved_edge_model_holds_no_non_finite_value(tmp_path):
    from safetensors.torch import load_file

    m = torch.nn.Sequential(torch.nn.Linear(64, len(EDGE_GROUPS)))
    with torch.no_grad():
        m[0].weight.copy_(torch.stack([torch.cat([r, r]) for r in EDGE_GROUPS.values()]))
    tc.quantize_(m, tc.RTNConfig(QuantScheme(bits=4, group_size=32, symmetric=False, scale_dtype="float16")), targets=["0"])
    tc.save_compressed(m, tmp_path / "out")
    for k, t in load_file(str(tmp_path / "out" / "model.safetensors")).items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), k
