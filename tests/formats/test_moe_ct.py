"""Mixture-of-experts outputs in compressed-tensors under the tensor names a plain transformers checkpoint
of the family stores (one tensor per expert: Mixtral ``block_sparse_moe.experts.E.w1``, Qwen3-MoE
``mlp.experts.E.gate_proj``), routers in ``ignore``. Oracles: compressed-tensors' own decompressor, and
plain transformers in a fresh process that never imports torchcompress (it fuses the experts at load)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import torchcompress as tc
from torchcompress.config import QuantScheme
from torchcompress.nn.quant_linear import QuantLinear

pytest.importorskip("compressed_tensors")
from tests.formats.ct_oracle import their_weight  # noqa: E402
from tests.pipeline.test_moe import COMMON, _calib  # noqa: E402
from tests.pipeline.test_moe import _model as _moe_model  # noqa: E402

pytestmark = pytest.mark.hf

SCHEME = QuantScheme(bits=4, group_size=32)  # w4 round-to-nearest, group 32, symmetric, fp16 scales
QWEN = ("mlp", ("gate_proj", "up_proj", "down_proj"))
LEAVES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")), "qwen3_moe": QWEN, "qwen2_moe": QWEN}


def _model(family):
    """tests/pipeline/test_moe's tiny models; Qwen2-MoE with a 64-wide shared expert (48 has no group of 32)."""
    if family != "qwen2_moe":
        return _moe_model(family)
    import transformers as t

    torch.manual_seed(0)
    cfg = t.Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                           num_experts=4, num_experts_per_tok=2)
    return t.AutoModelForCausalLM.from_config(cfg).eval()
RECIPE = """
name: w4-rtn-g32-sym
stages:
  - kind: rtn
    name: linears
    scheme: {bits: 4, granularity: group, group_size: 32, symmetric: true, scale_dtype: float16}
    targets: [Linear]
    ignore: [lm_head]
"""

_LOADER = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    path, ids_file, out_file = sys.argv[1:4]
    from transformers import AutoModelForCausalLM
    m, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    bad = {k: sorted(v)[:5] for k, v in info.items() if v}
    assert not bad, bad
    assert "torchcompress" not in sys.modules, "the loader imported torchcompress"
    with torch.no_grad():
        out = {"logits": m.eval()(load_file(ids_file)["ids"]).logits.float().contiguous()}
    for i, layer in enumerate(m.model.layers):
        out[f"{i}.gate_up_proj"] = layer.mlp.experts.gate_up_proj.detach().contiguous()
        out[f"{i}.down_proj"] = layer.mlp.experts.down_proj.detach().contiguous()
        out[f"{i}.router"] = layer.mlp.gate.weight.detach().contiguous()
    save_file(out, out_file)
""")


def _transformers(path, ids, tmp_path) -> dict:
    from safetensors.torch import load_file, save_file

    save_file({"ids": ids.contiguous()}, str(tmp_path / "ids.safetensors"))
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _LOADER, str(path), str(tmp_path / "ids.safetensors"),
                        str(tmp_path / "theirs.safetensors")], capture_output=True, text=True, cwd=str(tmp_path),
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    return load_file(str(tmp_path / "theirs.safetensors"))


def _keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_moe_saves_as_compressed_tensors_that_transformers_and_their_decompressor_read(family, tmp_path):
    float_model = _model(family)
    float_model.save_pretrained(tmp_path / "plain")  # what the family stores on disk
    model = _model(family)
    router = {i: layer.mlp.gate.weight.detach().clone() for i, layer in enumerate(model.model.layers)}
    tc.quantize_(model, SCHEME)
    ids = _calib(2, seed=3).input_ids
    with torch.no_grad():
        mine = model(ids).logits
    out = tc.save_compressed(model, tmp_path / "out")

    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert cfg["model_type"] == family and qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    block, leaves = LEAVES[family]
    routers = [f"model.layers.{i}.{block}.{g}" for i in range(2)
               for g in (("gate", "shared_expert_gate") if family == "qwen2_moe" else ("gate",))]
    assert qc["ignore"] == sorted(["lm_head", *routers])
    # the plain checkpoint's tensors, each quantized weight as weight_packed/scale/shape of the same module
    plain, ours = _keys(tmp_path / "plain"), _keys(out)
    quantized = {k.rsplit(".", 1)[0] for k in ours if k.endswith(".weight_packed")}
    assert {k for k in ours if k.endswith(".weight_packed")} == {f"{q}.weight_packed" for q in quantized}
    assert {f"{q}.{s}" for q in quantized for s in ("weight_scale", "weight_shape")} <= ours
    assert {f"{q}.weight" for q in quantized} | (ours - {f"{q}.{s}" for q in quantized for s in
                                                          ("weight_packed", "weight_scale", "weight_shape")}) == plain
    experts = {f"model.layers.{i}.{block}.experts.{e}.{leaf}" for i in range(2) for e in range(4) for leaf in leaves}
    assert experts <= quantized and not set(routers) & quantized
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(quantized)

    # (a) their decompressor gives our dequantized expert weights: both (q - z) * scale rounded once to the
    # scale's dtype (they multiply in it, we in fp32 and round), so equal bit for bit
    expected = {}
    for i in range(2):
        ex = model.model.layers[i].mlp.experts
        for e in range(4):
            for leaf, lin in zip(leaves, ex.projections(e)):
                name = f"model.layers.{i}.{block}.experts.{e}.{leaf}"
                deq = lin.dequantize(torch.float32).to(lin.scale.dtype)
                theirs = their_weight(out, name)
                assert theirs.dtype == deq.dtype and torch.equal(theirs, deq), name
                expected[(i, e, leaf)] = deq

    # (b) plain transformers in a fresh process: its fused experts are ours stacked, bit for bit, held in
    # the scale's dtype (fp16: transformers' dequantize-at-load keeps that dtype for the fused experts)
    got = _transformers(out, ids, tmp_path)
    g, u, d = leaves
    ref = _model(family)  # the family's own fused modules, given our weights: what transformers must compute
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear) and ".experts." not in name:
                ref.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
        for i in range(2):
            fused_gu = torch.stack([torch.cat([expected[(i, e, g)], expected[(i, e, u)]]) for e in range(4)])
            fused_dn = torch.stack([expected[(i, e, d)] for e in range(4)])
            assert got[f"{i}.gate_up_proj"].dtype == got[f"{i}.down_proj"].dtype == torch.float16
            assert torch.equal(got[f"{i}.gate_up_proj"], fused_gu) and torch.equal(got[f"{i}.down_proj"], fused_dn), i
            assert torch.equal(got[f"{i}.router"], router[i]), i
            experts = ref.model.layers[i].mlp.experts
            experts.gate_up_proj.data, experts.down_proj.data = fused_gu, fused_dn
        assert torch.equal(got["logits"], ref(ids).logits)
    # against our own forward (fp32 expert matmuls) the fp16 expert matmuls differ by rounding: measured
    # max |diff| 3.5e-5 Mixtral, 2.3e-5 Qwen3-MoE, 1.8e-5 Qwen2-MoE on logits of magnitude ~0.7
    assert (got["logits"] - mine).abs().max().item() <= 5e-5

    # (c) our loader reads it back: the same logits, exactly
    loaded = tc.load_compressed(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, mine)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_streamed_moe_output_is_the_same_compressed_tensors_checkpoint(family, tmp_path):
    """The block pipeline's output (sharded, converted shard by shard) holds the in-memory save's tensors
    under the same names and loads to the same logits."""
    from safetensors import safe_open

    from torchcompress.pipeline.shards import Checkpoint
    from torchcompress.recipe.runner import compress
    from torchcompress.recipe.schema import load_recipe
    from torchcompress.recipe.streaming import compress_checkpoint

    (tmp_path / "r.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "r.yaml")
    model = _model(family)
    model.save_pretrained(tmp_path / "src")
    compress_checkpoint(tmp_path / "src", recipe, tmp_path / "stream", calib=_calib())
    compress(model, recipe, _calib())
    tc.save_compressed(model, tmp_path / "mem")
    a, b = json.loads((tmp_path / "mem" / "config.json").read_text()), json.loads((tmp_path / "stream" / "config.json").read_text())
    assert b["quantization_config"]["quant_method"] == "compressed-tensors"
    qa, qb = a["quantization_config"], b["quantization_config"]
    assert qb["ignore"] == qa["ignore"]

    def groups(q):  # {scheme: sorted targets}: shard by shard the targets come in another order
        return {json.dumps({k: v for k, v in g.items() if k != "targets"}, sort_keys=True): sorted(g["targets"])
                for g in q["config_groups"].values()}

    assert groups(qb) == groups(qa)
    stream = Checkpoint.open(tmp_path / "stream").raw
    with safe_open(str(tmp_path / "mem" / "model.safetensors"), "pt") as f:
        assert set(stream.tensors) == set(f.keys())
        for k in f.keys():
            assert torch.equal(stream.get(k), f.get_tensor(k)), k
    ids = _calib(2, seed=3).input_ids
    with torch.no_grad():
        assert torch.equal(tc.load_compressed(tmp_path / "stream")(ids).logits, model(ids).logits)


def test_streamed_evaluation_reads_the_compressed_tensors_moe_output(tmp_path):
    """Block by block from the Mixtral output (manifest and tensors under ``block_sparse_moe`` names, the
    modules under ``mlp``) gives the in-memory model's perplexity (measured: relative difference 1.2e-7)."""
    from torchcompress.eval.perplexity import TextWindows, evaluate
    from torchcompress.eval.streaming import evaluate_streaming

    model = _model("mixtral")
    tc.quantize_(model, SCHEME)
    out = tc.save_compressed(model, tmp_path / "out")
    win = TextWindows(_calib(4, seed=2).input_ids, "random")
    assert evaluate_streaming(out, win, batch_size=2).perplexity == pytest.approx(evaluate(model, win).perplexity,
                                                                                  rel=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_export_compressed_tensors_writes_what_save_compressed_writes(family, tmp_path):
    """``export --format compressed-tensors`` (its own writer) uses the same on-disk names and ignore list."""
    from safetensors.torch import load_file

    from torchcompress.formats.compressed_tensors import save_compressed_tensors

    model = _model(family)
    tc.quantize_(model, SCHEME)
    save_compressed_tensors(model, tmp_path / "export")
    tc.save_compressed(model, tmp_path / "save")
    a, b = load_file(str(tmp_path / "export" / "model.safetensors")), load_file(str(tmp_path / "save" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    qa = json.loads((tmp_path / "export" / "config.json").read_text())["quantization_config"]
    qb = json.loads((tmp_path / "save" / "config.json").read_text())["quantization_config"]
    assert sorted(qa["ignore"]) == qb["ignore"]
    assert sorted(t for g in qa["config_groups"].values() for t in g["targets"]) == sorted(
        t for g in qb["config_groups"].values() for t in g["targets"])
