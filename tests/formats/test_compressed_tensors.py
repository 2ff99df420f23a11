"""compressed-tensors pack-quantized export, checked with the compressed-tensors package itself
(its decompressor) and with transformers loading the directory (quant_method compressed-tensors)."""

import copy
import json

import pytest
import torch

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.hf

from torchcompress.calibration.runner import gptq_model  # noqa: E402
from torchcompress.config import GPTQConfig, QuantScheme  # noqa: E402
from torchcompress.errors import FormatError  # noqa: E402
from torchcompress.formats.compressed_tensors import save_compressed_tensors  # noqa: E402


@pytest.fixture(scope="module")
def base():
    from tests.tiny import calibrated_tiny_llama

    return calibrated_tiny_llama()


def _decompress(path, name):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    sd = load_file(str(path / "model.safetensors"))
    group = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    sub = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
    return PackedQuantizationCompressor.decompress(sub, scheme)["weight"]


@pytest.mark.parametrize("bits,sym", [(4, True), (3, True), (8, True), (2, True), (4, False), (3, False)])
def test_their_decompressor_gives_our_weights(base, tmp_path, bits, sym):
    model, tok, calib = base
    q = gptq_model(copy.deepcopy(model), GPTQConfig(QuantScheme(bits=bits, group_size=64, symmetric=sym)), calib)
    save_compressed_tensors(q, tmp_path / "ct", tok)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        mine = q.get_submodule(name)
        theirs = _decompress(tmp_path / "ct", name)
        # they compute (q - zp) * scale in the scale dtype (fp16): equal to ours rounded to fp16
        assert torch.equal(theirs.to(torch.float16), mine.dequantize(torch.float32).to(torch.float16)), name


@pytest.mark.parametrize("bits", [4, 3])
def test_transformers_loads_same_outputs(base, tmp_path, bits):
    from transformers import AutoModelForCausalLM

    model, tok, calib = base
    q = gptq_model(copy.deepcopy(model), GPTQConfig(QuantScheme(bits=bits, group_size=64)), calib)
    save_compressed_tensors(q, tmp_path / "ct", tok)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    ids = calib.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, q(ids).logits, rtol=1e-5, atol=1e-5)


def test_refuses_what_the_format_cannot_hold(base, tmp_path):
    model, tok, calib = base
    partial = gptq_model(copy.deepcopy(model), GPTQConfig(QuantScheme(bits=4, group_size=96)), calib)
    with pytest.raises(FormatError, match="not a multiple of group_size"):
        save_compressed_tensors(partial, tmp_path / "a", tok)
    act = gptq_model(copy.deepcopy(model), GPTQConfig(QuantScheme(bits=4, group_size=64), act_order=True), calib)
    with pytest.raises(FormatError, match="static_groups"):
        save_compressed_tensors(act, tmp_path / "b", tok)
    static = gptq_model(copy.deepcopy(model), GPTQConfig(QuantScheme(bits=4, group_size=64), act_order=True,
                                                         static_groups=True), calib)
    save_compressed_tensors(static, tmp_path / "c", tok)  # act-order with static groups: sequential g_idx
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
