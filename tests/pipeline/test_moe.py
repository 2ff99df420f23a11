"""Mixture-of-experts families on the block pipeline (tiny random Mixtral, Qwen2-MoE with its shared
expert, Qwen3-MoE; offline). transformers 5 fuses the experts in memory (3-D ``gate_up_proj``) while
``save_pretrained`` writes one tensor per expert (``block_sparse_moe.experts.0.w1.weight``): the
pipeline reads that layout, quantizes one linear per expert projection, and equals the in-memory path."""

import copy

import pytest
import torch

from torchcompress.formats.checkpoint import load_compressed, read_manifest, save_compressed
from torchcompress.recipe.runner import compress
from torchcompress.recipe.schema import load_recipe
from torchcompress.recipe.streaming import compress_checkpoint

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


def _config(family):
    import transformers as t

    if family == "mixtral":
        return t.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":  # routed experts + a shared expert behind a sigmoid gate
        return t.Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2)
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                num_experts_per_tok=2)
    raise AssertionError(family)


def _model(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(family)).eval()


def _calib(n=16, seed=1):
    from torchcompress.calibration.data import CalibrationSet

    ids = torch.randint(1, 256, (n, 32), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, torch.ones_like(ids))


from tests.pipeline.test_streaming import _assert_same  # noqa: E402  (every tensor, dtype and value)


def test_checkpoint_layout_is_per_expert(tmp_path):
    """The premise: in memory fused 3-D experts, on disk one tensor per expert (Mixtral renames the block too)."""
    from safetensors import safe_open

    model = _model("mixtral")
    assert model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_experts_compute_the_fused_forward(family):
    from torchcompress.nn.experts import ExpertLinears
    from torchcompress.pipeline.experts import unfuse_experts_

    model = _model(family)
    ids = _calib(4).input_ids
    with torch.no_grad():
        want = model(ids).logits
        names = unfuse_experts_(model)
        got = model(ids).logits
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert all(isinstance(model.get_submodule(n), ExpertLinears) for n in names)
    # the fused module runs transformers' grouped_mm kernel, ours one matmul per expert: float32 rounding apart
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", ["w4-rtn", "w4-gptq-g128"])
def test_moe_streams_like_in_memory(family, recipe, tmp_path):
    model = _model(family)
    src = tmp_path / "src"
    model.save_pretrained(src)
    calib = _calib()
    r = load_recipe(recipe)
    mem = copy.deepcopy(model)
    rep_mem = compress(mem, r, calib)
    save_compressed(mem, tmp_path / "mem")
    rep = compress_checkpoint(src, r, tmp_path / "stream", calib=calib)
    a, b = load_compressed(tmp_path / "mem"), load_compressed(tmp_path / "stream")
    _assert_same(a, b)
    # every expert projection is quantized, the router stays float
    modules = read_manifest(tmp_path / "stream")["modules"]
    leaves = {"mixtral": ("w1", "w3", "w2")}.get(family, ("gate_proj", "up_proj", "down_proj"))
    for layer in range(2):
        for e in range(4):
            for leaf in leaves:
                assert f"model.layers.{layer}.mlp.experts.{e}.{leaf}" in modules
        assert not any(n.startswith(f"model.layers.{layer}.mlp.gate") for n in modules)
        assert b.model.layers[layer].mlp.gate.weight.dtype == torch.float32
    assert sorted(x.module for x in rep.layers) == sorted(x.module for x in rep_mem.layers)
    assert {x.module: x.rtn_fallback for x in rep.layers} == {x.module: x.rtn_fallback for x in rep_mem.layers}


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_forward_equals_the_model_forward(family, tmp_path):
    """Block by block from the per-expert checkpoint (keys renamed by transformers' conversion mapping)
    gives the whole fused model's own perplexity to float precision."""
    from torchcompress.eval.perplexity import TextWindows, evaluate
    from torchcompress.eval.streaming import evaluate_streaming

    model = _model(family)
    model.save_pretrained(tmp_path / "src")
    win = TextWindows(_calib(4, seed=2).input_ids, "random")
    whole = evaluate(model, win)
    streamed = evaluate_streaming(tmp_path / "src", win, batch_size=2)
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-5)


def _starve_expert(model, layer: int, expert: int) -> None:
    """No token reaches ``expert`` of ``layer`` (and the model's weights say so, not a test hook):
    embedding column 0 is +50 for every token, so after the RMS norms the routers' input has a large
    positive coordinate 0 (about sqrt(hidden) = 8, the others ~1e-3). Every router ignores that
    coordinate (column 0 zeroed, so the others route as before) but the row of ``expert``, which gets
    -10 there: a logit near -80 where the others are ~1e-2."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0
        for block in model.model.layers:
            block.mlp.gate.weight[:, 0] = 0.0
        model.model.layers[layer].mlp.gate.weight[expert, 0] = -10.0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_starved_expert_falls_back_to_rtn_and_is_recorded(family, tmp_path):
    from torchcompress.nn.gptq_linear import module_from_gptq
    from torchcompress.primitives.gptq import rtn_result

    model = _model(family)
    _starve_expert(model, 0, 3)
    src = tmp_path / "src"
    model.save_pretrained(src)
    calib = _calib()
    # a threshold of half a token per input feature: the random routers of these tiny models may give a
    # live expert fewer than 2 x 64 tokens, never fewer than 32 (measured: 46 and 69 at the least)
    r = _with_min_tokens(load_recipe("w4-gptq-g128"), 0.5)
    mem = copy.deepcopy(model)
    rep_mem = compress(mem, r, calib)
    rep = compress_checkpoint(src, r, tmp_path / "stream", calib=calib)
    save_compressed(mem, tmp_path / "mem")
    _assert_same(load_compressed(tmp_path / "mem"), load_compressed(tmp_path / "stream"))

    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    starved = {f"model.layers.0.mlp.experts.3.{n}" for n in names}
    for report in (rep, rep_mem):
        fell = {x.module: x.rtn_fallback for x in report.layers if x.rtn_fallback and ".layers.0." in x.module}
        assert set(fell) == starved, fell  # in layer 0 only the starved expert: the others got enough tokens
        assert all(v.startswith("0 routed tokens") for v in fell.values())
    modules = read_manifest(tmp_path / "stream")["modules"]
    for n in starved:
        assert modules[n]["gptq"]["fallback_rtn"] is True
    others = [n for n in modules if ".layers.0.mlp.experts." in n and n not in starved]
    assert others and not any(modules[n]["gptq"]["fallback_rtn"] for n in others)

    # the fallback is round-to-nearest of the float weight with the stage's scheme and observer, nothing else
    cfg = r.stages[0].config
    float_w = model.model.layers[0].mlp.experts.down_proj[3].detach()  # (H, I): the starved expert's down projection
    ref = rtn_result(float_w, cfg.scheme, mse=cfg.mse, act_order=cfg.act_order, static_groups=cfg.static_groups)
    ref_mod = module_from_gptq(torch.nn.Linear(float_w.shape[1], float_w.shape[0], bias=False), ref, cfg.scheme, cfg)
    down = load_compressed(tmp_path / "stream").get_submodule(f"model.layers.0.mlp.experts.3.{names[2]}")
    assert torch.equal(down.dequantize(torch.float32), ref_mod.dequantize(torch.float32))


def _with_min_tokens(recipe, value):
    import dataclasses

    stage = recipe.stages[0]
    stage = dataclasses.replace(stage, config=dataclasses.replace(stage.config, expert_min_tokens=value))
    return dataclasses.replace(recipe, stages=(stage,))


def test_expert_min_tokens_is_the_threshold_and_spares_dense_layers(tmp_path):
    """With an unreachable threshold every expert projection falls back and no attention or shared-expert linear does."""
    model = _model("qwen2_moe")
    rep = compress(model, _with_min_tokens(load_recipe("w4-gptq-g128"), 1e6), _calib())
    fell = {x.module for x in rep.layers if x.rtn_fallback}
    experts = {x.module for x in rep.layers if ".mlp.experts." in x.module}
    assert len(experts) == 2 * 4 * 3 and fell == experts


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_gives_the_same_logits(family, tmp_path):
    model = _model(family)
    compress(model, load_recipe("w4-gptq-g128"), _calib())
    save_compressed(model, tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    ids = _calib(2, seed=3).input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # transformers itself (with the torchcompress quantization method registered) rebuilds the unfused experts
    import torchcompress.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)


def test_expert_statistics_use_only_real_routed_tokens():
    """An expert's Hessian sums the real tokens routed to it, never padding: a right-padded batch gives
    the statistics of the same real tokens run unpadded (causal attention: padding on the right does not
    change the real tokens' hidden states, hence not their routing)."""
    from torchcompress.pipeline.context import BlockContext, capture_inputs
    from torchcompress.pipeline.experts import unfuse_experts_

    model = _model("mixtral")
    unfuse_experts_(model)
    ids = _calib(2, seed=4).input_ids[:, :16]
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0  # sample 0 has 12 real tokens, then padding
    experts = model.model.layers[0].mlp.experts
    lins = {f"mlp.experts.{e}.w1": experts[e].w1 for e in range(4)} | {f"mlp.experts.{e}.w2": experts[e].w2
                                                                      for e in range(4)}

    def stats(batches):
        with torch.no_grad():
            inputs = capture_inputs(model, model.model.layers, batches, "cpu")
            return BlockContext(model.model.layers[0], "model.layers.0.", inputs, "cpu").collect(lins, "hessian")

    padded = stats([(ids, mask)])
    plain = stats([(ids[:1, :12], mask[:1, :12]), (ids[1:], mask[1:])])
    total = 0
    for n in lins:
        assert padded[n].tokens == plain[n].tokens, n
        # float32 batch terms of other shapes: equal to float32 rounding (measured: max abs difference
        # 4.8e-6 on w1 entries up to 41, 1.7e-9 on w2 entries up to 0.012)
        torch.testing.assert_close(padded[n].sum, plain[n].sum, rtol=1e-5, atol=1e-6)
        total += plain[n].tokens if n.endswith("w1") else 0
    assert total == 2 * (12 + 16)  # top-2 routing: each real token reaches two experts


def test_python_verbs_quantize_the_experts():
    """``quantize_`` and ``gptq_model`` on a fused transformers MoE quantize every expert projection too."""
    from torchcompress.api import quantize_
    from torchcompress.config import GPTQConfig, QuantScheme
    from torchcompress.nn.quant_linear import QuantLinear
    from torchcompress.quant.gptq import gptq_model

    for verb in ("rtn", "gptq"):
        model = _model("qwen3_moe")
        if verb == "rtn":
            quantize_(model, QuantScheme(bits=4, group_size=32))
        else:
            gptq_model(model, GPTQConfig(QuantScheme(bits=4, group_size=32)), _calib())
        for layer in model.model.layers:
            for e in range(4):
                assert all(isinstance(m, QuantLinear) for m in layer.mlp.experts.projections(e)), verb
