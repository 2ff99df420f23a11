"""Layer-by-layer GPTQ on a tiny Llama: better than RTN, padding-free Hessians, 2-process all-reduce."""

import copy

import pytest
import torch
import torch.nn as nn

from torchcompress.calibration import CalibrationConfig, CalibrationSet, build_calibration
from torchcompress.calibration.runner import gptq_model
from torchcompress.pipeline.stats import Statistic
from torchcompress.config import GPTQConfig, QuantScheme
from torchcompress.errors import ConfigError
from torchcompress.nn.gptq_linear import GPTQLinear
from torchcompress.nn.quant_linear import QuantLinear


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok))).eval()
    calib = build_calibration(CalibrationConfig(sources=("pydoc",), num_samples=16, seq_len=64), model, tok)
    held = build_calibration(CalibrationConfig(sources=("pydoc",), num_samples=8, seq_len=64, seed=99), model, tok)
    return model, calib, held


def _logit_mse(model, ref, ids):
    with torch.no_grad():
        return float(((model(ids).logits - ref(ids).logits) ** 2).mean())


@pytest.mark.parametrize("act_order,true_seq", [(True, True), (False, False)])
def test_gptq_model_beats_rtn(setup, act_order, true_seq):
    import torchcompress as tc

    ref, calib, held = setup
    scheme = QuantScheme(bits=3, group_size=32, symmetric=False)
    g = gptq_model(copy.deepcopy(ref), GPTQConfig(scheme, act_order=act_order, true_sequential=true_seq), calib)
    r = tc.quantize_(copy.deepcopy(ref), tc.RTNConfig(scheme))
    kinds = {type(m) for m in g.modules() if isinstance(m, QuantLinear)}
    assert kinds == ({GPTQLinear} if act_order else {QuantLinear})
    assert isinstance(g.lm_head, nn.Linear) and type(g.lm_head) is nn.Linear  # ignored by default
    gm, rm = _logit_mse(g, ref, held.input_ids), _logit_mse(r, ref, held.input_ids)
    assert gm < 0.5 * rm  # measured ~0.15-0.2 x RTN on this model


def test_padding_does_not_enter_hessians(setup):
    ref, calib, _ = setup
    ids = calib.input_ids[:4, :40]
    full = CalibrationSet(ids.clone(), torch.ones_like(ids))
    padded_ids = torch.cat([ids, torch.full((4, 24), 7)], 1)  # 24 junk tokens, masked out
    mask = torch.cat([torch.ones_like(ids), torch.zeros(4, 24, dtype=torch.long)], 1)
    padded = CalibrationSet(padded_ids, mask)

    def hessians(calib):
        from torchcompress.pipeline.context import BlockContext, capture_inputs
        from torchcompress.pipeline.skeleton import find_blocks

        prefix, blocks = find_blocks(ref)
        inputs = capture_inputs(ref, blocks, calib.batches(2), "cpu")
        named = {"q": blocks[0].self_attn.q_proj, "down": blocks[0].mlp.down_proj}
        stats = BlockContext(blocks[0], f"{prefix}.0.", inputs, "cpu").collect(named, "hessian")
        return {n: s.hessian() for n, s in stats.items()}, {n: s.tokens for n, s in stats.items()}

    a, ta = hessians(full)
    b, tb = hessians(padded)
    junk, _ = hessians(CalibrationSet(padded_ids, torch.ones_like(mask)))  # control: padding counted
    assert ta == tb == {"q": 160, "down": 160}
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6)  # same real tokens, float32 products
        assert not torch.allclose(junk[n], a[n], rtol=1e-2, atol=1e-3)


def test_gptq_needs_calibration(setup):
    with pytest.raises(ConfigError, match="calibration"):
        gptq_model(copy.deepcopy(setup[0]), GPTQConfig(), None)


def _rank(rank, world, path, x, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        stat = Statistic("hessian", x.shape[-1], "cpu")
        for batch in x.chunk(world)[rank].split(2):
            stat.add(batch.reshape(-1, x.shape[-1]))
        torch.save(stat.all_reduce().hessian(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_hessian_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    x = torch.randn(8, 5, 16, dtype=torch.float32)
    mp.spawn(_rank, args=(2, str(tmp_path / "rdv"), x, str(tmp_path / "h")), nprocs=2, join=True)
    one = Statistic("hessian", 16, "cpu")
    for batch in x.split(2):
        one.add(batch.reshape(-1, 16))
    h1 = one.all_reduce().hessian()
    for r in range(2):
        h2 = torch.load(f"{tmp_path / 'h'}.{r}", weights_only=True)
        torch.testing.assert_close(h2, h1, rtol=1e-12, atol=1e-12)  # float64 sums of the same float32 products


class _Killed(Exception):
    pass


def test_killed_run_resumes_bit_identical_and_refuses_changes(setup, tmp_path):
    from torchcompress.errors import InputError

    ref, calib, _ = setup
    cfg = GPTQConfig(QuantScheme(bits=3, group_size=32), act_order=True)
    whole = gptq_model(copy.deepcopy(ref), cfg, calib)

    def kill(b, n):
        if b == 0:
            raise _Killed  # dies right after block 0 was recorded

    state = tmp_path / "state"
    with pytest.raises(_Killed):
        gptq_model(copy.deepcopy(ref), cfg, calib, state_dir=state, on_block=kill)
    assert (state / "block-0.safetensors").is_file() and not (state / "block-1.safetensors").exists()
    seen = []
    resumed = gptq_model(copy.deepcopy(ref), cfg, calib, state_dir=state, on_block=lambda b, n: seen.append(b))
    assert seen == [1]  # block 0 came from disk
    sd_a, sd_b = whole.state_dict(), resumed.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    # a different config, data or model is refused
    with pytest.raises(InputError, match="refusing to resume"):
        gptq_model(copy.deepcopy(ref), GPTQConfig(QuantScheme(bits=4, group_size=32)), calib, state_dir=state)
    other = CalibrationSet(calib.input_ids.flip(0), calib.attention_mask.flip(0))
    with pytest.raises(InputError, match="refusing to resume"):
        gptq_model(copy.deepcopy(ref), cfg, other, state_dir=state)
    changed = copy.deepcopy(ref)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(InputError, match="refusing to resume"):
        gptq_model(changed, cfg, calib, state_dir=state)


def test_gptq_loss_reaches_the_report(setup):
    from torchcompress.recipe import compress, parse_recipe
    from torchcompress.telemetry import names as N
    from torchcompress.telemetry.run import layer_attributes

    ref, calib, _ = setup
    recipe = parse_recipe("name: g\nstages:\n  - kind: gptq\n    name: w4\n"
                          "    scheme: {bits: 4, group_size: 32, symmetric: false}\n")
    model = copy.deepcopy(ref)
    seen = {}
    gptq_model(copy.deepcopy(ref), GPTQConfig(QuantScheme(bits=4, group_size=32, symmetric=False)), calib,
               on_loss=seen.__setitem__)
    report = compress(model, recipe, calib)
    assert len(report.layers) == len(seen) == 14
    for rec in report.layers:
        assert rec.gptq_loss is not None and rec.gptq_loss > 0
        assert rec.gptq_loss == pytest.approx(seen[rec.module], rel=1e-9)  # same data, same result
        assert layer_attributes(rec)[N.GPTQ_LOSS] == rec.gptq_loss
