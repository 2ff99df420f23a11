"""ONNX export (formats/onnx_export.py): MatMulNBits carrying our codes, checked by onnxruntime itself.

Oracles: onnxruntime running the exported graph (one layer, then a whole tiny Llama with its KV
cache) against our QuantLinear / transformers forward, and onnxruntime-genai generating from the
exported folder. Tolerances come from measured errors (see each test's comment)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from torchcompress.config import Granularity, QuantScheme  # noqa: E402
from torchcompress.errors import UnsupportedLayerError  # noqa: E402
from torchcompress.formats.onnx_plan import plan_layers  # noqa: E402
from torchcompress.nn.quant_linear import QuantLinear  # noqa: E402

from .onnx_run import ort_greedy, ort_logits, session, torch_greedy  # noqa: E402


def _one_matmul_model(w_t: np.ndarray):
    """A graph shaped like the builder's: Y = A @ W^T with W^T (K, N) an initializer."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_t.shape
    g = helper.make_graph(
        [helper.make_node("MatMul", ["A", "w_t"], ["Y"], name="/layer/MatMul")], "one",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(w_t, "w_t")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _run_layer(layer: nn.Module, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    from torchcompress.formats.onnx_export import rewrite_matmuls

    nbits, _ = plan_layers(nn.ModuleDict({"layer": layer}))
    proto = _one_matmul_model(layer.dequantize(torch.float32).t().contiguous().numpy())
    assert rewrite_matmuls(proto, nbits) == 0  # the MatMul was found by its weight and replaced
    ops = [nd.op_type for nd in proto.graph.node]
    assert ops[-1] == "MatMulNBits" and "MatMul" not in ops
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["Y"], {"A": x.numpy()})[0]


SCHEMES = [
    QuantScheme(bits=4, group_size=32, symmetric=True),
    QuantScheme(bits=4, group_size=64, symmetric=False),
    QuantScheme(bits=4, group_size=128, symmetric=True),
    QuantScheme(bits=8, group_size=128, symmetric=False),
    QuantScheme(bits=8, group_size=32, symmetric=True),
    QuantScheme(bits=4, granularity=Granularity.CHANNEL, symmetric=False),
    QuantScheme(bits=8, granularity=Granularity.CHANNEL, symmetric=True),
    QuantScheme(bits=4, group_size=64, symmetric=False, float_zero=True),  # HQQ-style float zero points
    QuantScheme(bits=2, group_size=32, symmetric=False),
    QuantScheme(bits=4, group_size=16, symmetric=False),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"w{s.bits}-{s.granularity.value}{s.group_size}-"
                         f"{'sym' if s.symmetric else 'asym'}{'-fz' if s.float_zero else ''}")
@pytest.mark.parametrize("k", [256, 200])  # 200: a partial last block
def test_matmul_nbits_equals_quant_linear(scheme, k):
    torch.manual_seed(0)
    lin = nn.Linear(k, 48, bias=False)
    with torch.no_grad():
        lin.weight[:, 3] *= 20  # an outlier column
        lin.weight[5] = 0  # an all-zero row
    q = QuantLinear.from_linear(lin, scheme)
    x = torch.randn(7, k)
    got = _run_layer(q, x)
    with torch.no_grad():
        want = q(x).numpy()
    # measured: max |diff| / max |want| <= 5.6e-7 over these 20 cases (float32 summation order only);
    # a swapped nibble, a dropped zero point or a wrong block scale gives > 1e-2
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def _act_order_layer(k=256, n=40, gs=64, bits=4, symmetric=False):
    from torchcompress.nn.gptq_linear import GPTQLinear
    from torchcompress.primitives.gptq import GPTQResult

    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(k, generator=g)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)  # groups built in activation order
    groups = -(-k // gs)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).half()
    zero = None if symmetric else torch.randint(0, 1 << bits, (n, groups), generator=g, dtype=torch.uint8)
    res = GPTQResult(codes, scale, zero, g_idx, gs, 0.01, False, 0, bits, act_order=True)
    scheme = QuantScheme(bits=bits, group_size=gs, symmetric=symmetric)
    return GPTQLinear.from_gptq(nn.Linear(k, n, bias=False), res, scheme)


@pytest.mark.parametrize("k", [256, 224])  # 224: a short last act-order group
def test_gptq_act_order_through_input_permutation(k):
    layer = _act_order_layer(k=k)
    x = torch.randn(5, k)
    got = _run_layer(layer, x)
    with torch.no_grad():
        want = layer(x).numpy()
    # measured max rel 4.5e-7 (summation order only: the same codes, scales and zero points)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()
    # a plain MatMulNBits without the permutation would be wrong: the test can see a dropped Gather
    nbits, _ = plan_layers(nn.ModuleDict({"layer": layer}))
    assert nbits["layer"].perm is not None and not torch.equal(nbits["layer"].perm, torch.arange(k))


# -- whole models -----------------------------------------------------------------------------

PROMPTS = ["The quick brown fox", "The slow red", "jumps over the lazy dog number 3.", "The small green",
           "dog number", "The happy", "over the sleepy dog", "The quick brown fox jumps over the"]


def _tiny(scheme, act_order_layer=False):
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config
    from torchcompress.api import quantize_

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=128, intermediate_size=192)).eval()
    with torch.no_grad():  # a peaked next-token distribution: greedy has margins well above float noise
        model.lm_head.weight.mul_(30)
    quantize_(model, scheme)
    if act_order_layer:
        model.model.layers[0].mlp.up_proj = _act_order_layer(k=128, n=192, gs=32)
    return model, tok


CASES = {
    "w4-g64-asym+act-order": (QuantScheme(bits=4, group_size=64, symmetric=False), True),
    "w4-g32-sym": (QuantScheme(bits=4, group_size=32, symmetric=True), False),
    "w8-g128-sym": (QuantScheme(bits=8, group_size=128, symmetric=True), False),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Factory: case id -> (model, tokenizer, export folder), each exported once per module."""
    from torchcompress.formats.onnx_export import export_onnx

    done = {}

    def get(case):
        if case not in done:
            model, tok = _tiny(*CASES[case])
            out = tmp_path_factory.mktemp(case) / "onnx"
            done[case] = (model, tok, out, export_onnx(model, tok, out))
        return done[case]

    return get


@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if i == 0 else [pytest.mark.slow])
                                  for i, c in enumerate(CASES)])
def test_tiny_llama_logits_and_greedy_with_kv_cache(exported, case):
    model, tok, out, res = exported(case)
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert len(res.nbits_layers) == n_quant == 14 and res.float_layers == 1  # the (tied, float) head
    summary = json.loads((out / "torchcompress_onnx.json").read_text())
    assert len(summary["matmul_nbits"]) == n_quant
    assert (out / "genai_config.json").is_file() and (out / "tokenizer.json").is_file()
    sess = session(out)
    ins = {i.name for i in sess.get_inputs()}
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= ins
    worst = 0.0
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        got = ort_logits(sess, model.config, ids)
        with torch.no_grad():
            want = model(ids).logits.numpy()
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    # the acceptance bound (1e-3 relative to the largest logit); measured <= 5.4e-7 on these three models
    assert worst <= 1e-3, worst
    for p in PROMPTS[:2]:
        ids = tok(p, return_tensors="pt").input_ids
        assert ort_greedy(sess, model.config, ids, 20) == torch_greedy(model, ids, 20)


def test_onnxruntime_genai_generates_from_the_folder(exported):
    pytest.importorskip("onnxruntime_genai")
    from .onnx_run import check_genai, genai_greedy

    model, tok, out, _ = exported("w4-g64-asym+act-order")
    for p in PROMPTS[:2]:
        ids = tok(p, return_tensors="pt").input_ids
        check_genai(genai_greedy(out, ids, 20), torch_greedy(model, ids, 20), model.config.eos_token_id)


@pytest.mark.slow
def test_quantized_head_and_pruned_layer(tmp_path):
    """lm_head quantized too (the tied config is untied in the float source) and a pruned Linear kept
    float with its mask applied: logits still equal ours."""
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config
    from torchcompress.api import quantize_
    from torchcompress.formats.onnx_export import export_onnx
    from torchcompress.nn.pruned_linear import PrunedLinear

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=128, intermediate_size=192)).eval()
    mlp = model.model.layers[1].mlp
    mlp.down_proj = PrunedLinear.from_linear(mlp.down_proj, torch.rand(128, 192) > 0.5)
    quantize_(model, QuantScheme(bits=4, group_size=32, symmetric=False), ignore=["re:.*down_proj"])
    assert isinstance(model.lm_head, QuantLinear) and model.config.tie_word_embeddings
    res = export_onnx(model, tok, tmp_path / "onnx")
    assert "lm_head" in res.nbits_layers and res.float_layers == 2  # the two down_proj
    sess = session(tmp_path / "onnx")
    ids = tok(PROMPTS[7], return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits.numpy()
    got = ort_logits(sess, model.config, ids)
    # same measured bound as the models above (<= 5.4e-7); an unmasked pruned weight or the tied float
    # head in place of the quantized one gives > 1e-2
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# -- bad input --------------------------------------------------------------------------------


def _model_with(layer: nn.Module) -> nn.Module:
    m = nn.Module()
    m.block = nn.Module()
    m.block.proj = layer
    return m


def test_three_bit_groups_are_refused_naming_the_layer():
    q = QuantLinear.from_linear(nn.Linear(64, 32), QuantScheme(bits=3, group_size=32))
    with pytest.raises(UnsupportedLayerError, match=r"^block\.proj: .*3-bit codes") as e:
        plan_layers(_model_with(q))
    assert "\n" not in str(e.value) and e.value.layer == "block.proj"


def test_group_size_that_is_not_a_block_size_is_refused():
    q = QuantLinear.from_linear(nn.Linear(96, 32), QuantScheme(bits=4, group_size=48))
    with pytest.raises(UnsupportedLayerError, match=r"^block\.proj: .*group size 48"):
        plan_layers(_model_with(q))


def test_nvfp4_and_gguf_layers_are_refused():
    from torchcompress.primitives.gguf_common import GGMLType
    from torchcompress.nn.gguf_linear import GGUFLinear
    from torchcompress.nn.scheme_linear import FP4Linear
    from torchcompress.quant.scheme_config import FP4Config

    fp4 = FP4Linear.from_linear(nn.Linear(64, 32), FP4Config("nvfp4", activations=False))
    with pytest.raises(UnsupportedLayerError, match=r"^block\.proj: .*FP4Linear \(NVFP4\)"):
        plan_layers(_model_with(fp4))
    gg = GGUFLinear.from_linear(nn.Linear(256, 32), GGMLType.Q4_K)
    with pytest.raises(UnsupportedLayerError, match=r"^block\.proj: .*GGUFLinear \(GGUF Q4_K blocks\)"):
        plan_layers(_model_with(gg))
