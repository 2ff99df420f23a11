import json
import math

import pytest
import torch

from tests.tiny import tiny_config
from torchcompress.nn import QuantLinear
from torchcompress.recipe import compress, load_recipe, parse_recipe
from torchcompress.recipe.report_md import write_report

pytestmark = pytest.mark.hf


def _model(tied=False):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(hidden_size=160, intermediate_size=320, tie_word_embeddings=tied)).eval()


def test_w4_recipe_compresses_and_reports_each_layer():
    m = _model()
    n_linear = sum(1 for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head")
    report = compress(m, load_recipe("w4-rtn"))
    assert sum(isinstance(mod, QuantLinear) for mod in m.modules()) == n_linear
    assert type(m.lm_head) is torch.nn.Linear  # ignored by the recipe
    assert len(report.layers) == n_linear and report.stages[0].modules == n_linear
    for rec in report.layers:
        assert rec.bytes_after < rec.bytes_before
        assert 16 < rec.sqnr_db < 25 and math.isfinite(rec.mse)
        # 4-bit codes + one fp16 scale per group of <= 128 (160 = 128 + partial 32)
        assert 4.0 < rec.bits_per_weight < 4.5
    assert report.size_bytes_after < report.size_bytes_before
    assert report.compression_ratio == pytest.approx(report.size_bytes_before / report.size_bytes_after)
    assert report.bytes_by_type_after["QuantLinear"] > 0 and "QuantLinear" not in report.bytes_by_type_before


def test_size_accounts_tied_weights_once():
    m = _model(tied=True)
    total = sum(p.numel() * 4 for p in m.parameters())  # parameters() already dedupes tied ones
    report = compress(m, load_recipe("w8-rtn"))
    assert report.size_bytes_before == total


def test_stage_that_matches_nothing_still_runs(caplog):
    m = _model()
    recipe = parse_recipe("stages:\n  - kind: rtn\n    targets: ['re:nothing.*']\n")
    report = compress(m, recipe)
    assert report.stages[0].modules == 0 and "changed no module" in caplog.text


def test_report_files(tmp_path):
    m = _model()
    report = compress(m, load_recipe("w4-rtn"))
    out = write_report(report, tmp_path / "rep")
    md = (out / "report.md").read_text()
    assert "compression ratio" in md and "layer_sqnr.png" in md and "model.layers.0.mlp.up_proj" in md
    for png in ("layer_sqnr.png", "bytes_by_type.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    d = json.loads((out / "report.json").read_text())
    assert d["compression_ratio"] == pytest.approx(report.compression_ratio)
    assert len(d["layers"]) == len(report.layers)
