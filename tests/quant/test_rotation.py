"""The residual-stream rotation: the float function stays the model's own, refusals change nothing,
the online Hadamard wrapper reloads, and the recipe stage composes with quantization."""

import copy

import pytest
import torch
import torch.nn as nn

from torchcompress.errors import ConfigError, InputError
from torchcompress.quant.rotation import RotateConfig, rotate_

# fp32 logits of the rotated tiny Llamas differ from the original's by at most 6e-7 (measured, |logits| ~1.3,
# float64 rotation products rounded once to float32); 5e-6 leaves a margin while a wrong sign, a missed
# fold or an unrotated module moves logits by 1e-2 or more
TINY_ATOL = 5e-6


def _tiny(**kw):
    from tests.tiny import tiny_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    kw = {"intermediate_size": 192, **kw}  # 192 = 12 * 16: the online Hadamard has an order
    model = LlamaForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # non-trivial norm weights, so that a missed fold shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.rand_like(p) + 0.5)
            elif "bias" in n:
                p.normal_(0, 0.1)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kw", [dict(), dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4),
                                dict(hidden_size=100, num_attention_heads=2, num_key_value_heads=1, intermediate_size=160)])
@pytest.mark.parametrize("online_down", [False, True])
def test_float_function_unchanged(kw, online_down):
    model = _tiny(**kw)
    ids = torch.randint(0, 256, (2, 24))
    ref = _logits(model, ids)
    rot = rotate_(copy.deepcopy(model), RotateConfig(seed=5, online_down=online_down))
    torch.testing.assert_close(_logits(rot, ids), ref, rtol=0, atol=TINY_ATOL)
    # it did rotate: norms are ones, the head is its own tensor, weights moved, the Gram matrix of the
    # embedding rows did not (E Q with Q orthogonal: E Q Q^T E^T = E E^T)
    assert rot.config.tie_word_embeddings is False
    assert rot.lm_head.weight.data_ptr() != rot.model.embed_tokens.weight.data_ptr()
    for n, p in rot.named_parameters():
        if "norm" in n:
            assert torch.equal(p, torch.ones_like(p)), n
    e0, e1 = model.model.embed_tokens.weight.double(), rot.model.embed_tokens.weight.double()
    assert (e1 - e0).abs().max() > 0.1
    torch.testing.assert_close(e1 @ e1.T, e0 @ e0.T, rtol=0, atol=1e-5)
    down = rot.model.layers[0].mlp.down_proj
    if online_down:
        from torchcompress.nn.hadamard_linear import HadamardInputLinear

        assert isinstance(down, HadamardInputLinear) and type(down.base_layer) is nn.Linear
    else:
        assert type(down) is nn.Linear


def test_per_head_rotation_is_blockwise():
    """v_proj's rows: the norm fold and the residual Q act on the columns (Q leaves the rows' Gram matrix
    alone), the per-head Q_h on the rows of each head: Gram' = blockdiag(Q_h)^T Gram(W diag(w)) blockdiag(Q_h)."""
    from torchcompress.primitives.hadamard import random_hadamard

    model = _tiny()
    seed = 1
    rot = rotate_(copy.deepcopy(model), RotateConfig(seed=seed))
    hd = model.config.hidden_size // model.config.num_attention_heads
    qh = torch.block_diag(*[random_hadamard(hd, seed + 1)] * model.config.num_key_value_heads)
    w = model.model.layers[0].input_layernorm.weight.double()
    wv0 = model.model.layers[0].self_attn.v_proj.weight.double() * w
    wv1 = rot.model.layers[0].self_attn.v_proj.weight.double()
    torch.testing.assert_close(wv1 @ wv1.T, qh.T @ (wv0 @ wv0.T) @ qh, rtol=0, atol=1e-5)
    assert not torch.allclose(wv1 @ wv1.T, wv0 @ wv0.T, atol=1e-3)  # the per-head rotation did something


def test_refuses_unknown_architectures_before_changing_anything():
    from transformers import GemmaConfig, GemmaForCausalLM, Phi3Config, Phi3ForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    for model, name in ((GemmaForCausalLM(GemmaConfig(**small, head_dim=8)), "gemma"),
                        (Phi3ForCausalLM(Phi3Config(**small)), "phi3")):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(InputError, match=f"architecture '{name}'"):
            rotate_(model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refuses_a_non_rmsnorm_in_the_last_block_with_the_first_untouched():
    model = _tiny()
    model.model.layers[-1].post_attention_layernorm = nn.LayerNorm(model.config.hidden_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=r"layers\.1\.post_attention_layernorm"):
        rotate_(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.tie_word_embeddings is True


def test_refuses_compressed_linears():
    import torchcompress as tc
    from torchcompress.config import QuantScheme, RTNConfig

    model = _tiny()
    tc.quantize_(model, RTNConfig(QuantScheme(bits=4, group_size=32)), ignore=["lm_head"])
    with pytest.raises(InputError, match="already compressed"):
        rotate_(model)


def test_config_validation():
    with pytest.raises(ConfigError, match="seed"):
        RotateConfig(seed=-1)
    with pytest.raises(ConfigError, match="online_down"):
        RotateConfig(online_down="yes")
    model = _tiny(intermediate_size=100)  # 100 = 25 * 4: no Hadamard order for the online transform
    with pytest.raises(ConfigError, match="intermediate size 100"):
        rotate_(model, RotateConfig(online_down=True))


def test_online_hadamard_quantized_checkpoint_reloads(tmp_path):
    """rotate (online down) + RTN: the wrapper and its quantized base reload through the manifest, bit-exact."""
    import torchcompress as tc
    from torchcompress.config import QuantScheme, RTNConfig
    from torchcompress.formats.checkpoint import load_compressed, save_compressed

    model = _tiny()
    ids = torch.randint(0, 256, (2, 16))
    m = rotate_(copy.deepcopy(model), RotateConfig(seed=0, online_down=True))
    tc.quantize_(m, RTNConfig(QuantScheme(bits=4, group_size=32)), ignore=["lm_head"])
    assert type(m.model.layers[0].mlp.down_proj.base_layer).__name__ == "QuantLinear"
    save_compressed(m, tmp_path / "out")
    back = load_compressed(tmp_path / "out")
    assert type(back.model.layers[0].mlp.down_proj).__name__ == "HadamardInputLinear"
    assert back.config.tie_word_embeddings is False
    torch.testing.assert_close(_logits(back, ids), _logits(m, ids), rtol=0, atol=0)
    import torchcompress.hf  # noqa: F401  (transformers reads the manifest through the registered quantizer)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()  # stays untied
    torch.testing.assert_close(_logits(hf, ids), _logits(m, ids), rtol=0, atol=0)


def test_smollm2_logits_unchanged():
    from torchcompress.models import load_model

    lm = load_model("default")
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids
    ref = _logits(lm.model, ids)
    rot = rotate_(copy.deepcopy(lm.model), RotateConfig(seed=0))
    got = _logits(rot, ids)
    # measured max |diff| 1.3e-4 (1.1e-4 with online_down) on logits of magnitude ~31 over 30 blocks
    # (float32 forward, rotated weights rounded to float32 once); a wrong rotation moves them by whole units
    torch.testing.assert_close(got, ref, rtol=0, atol=5e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_streamed_rotation_must_come_first():
    from torchcompress.recipe.schema import parse_recipe
    from torchcompress.recipe.streaming import streamable

    first = parse_recipe("stages:\n  - kind: rotate\n    seed: 3\n  - kind: rtn\n    scheme: {bits: 4, group_size: 32}\n")
    assert streamable(first) is None
    later = parse_recipe("stages:\n  - kind: rtn\n    scheme: {bits: 4, group_size: 32}\n  - kind: rotate\n")
    why = streamable(later)
    assert why is not None and "must be the first stage" in why


def test_rotate_stage_refuses_targets():
    from torchcompress.errors import RecipeError
    from torchcompress.recipe.runner import compress
    from torchcompress.recipe.schema import parse_recipe

    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match="'targets' and 'ignore' do not apply"):
        compress(model, parse_recipe("stages:\n  - kind: rotate\n    ignore: [lm_head]\n"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rep = compress(model, parse_recipe("stages:\n  - kind: rotate\n    seed: 2\n"))
    assert {r.module for r in rep.layers} >= {"model.embed_tokens", "lm_head", "model.layers.1.mlp.down_proj"}
