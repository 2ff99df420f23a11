"""Recipe stages `qat` and `distill`: parsed from YAML, run by compress(), bad fields named."""

import pytest
import torch

from tests.tiny import tiny_config
from torchcompress.calibration import CalibrationSet
from torchcompress.errors import InputError, RecipeError
from torchcompress.nn import QuantLinear
from torchcompress.recipe import compress, load_recipe, parse_recipe

pytestmark = pytest.mark.hf


def _model(layers=2):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(hidden_size=64, intermediate_size=96, num_hidden_layers=layers)).eval()


def _calib():
    ids = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(ids, torch.ones_like(ids))


def _loss(m, calib):
    with torch.no_grad():
        return float(m(input_ids=calib.input_ids, labels=calib.input_ids).loss)


QAT = """
name: t
stages:
  - kind: qat
    scheme: {bits: 3, group_size: 32, symmetric: false}
    learnable_scale: %s
    steps: 4
    lr: 1.0e-3
    batch_size: 4
"""


@pytest.mark.parametrize("lsq", ["false", "true"])
def test_qat_stage_trains_and_packs(lsq):
    m, calib = _model(), _calib()
    report = compress(m, parse_recipe(QAT % lsq), calib)
    qls = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    assert qls and all(q.is_packed for q in qls) and not m.training
    assert len(report.layers) == len(qls) and all(r.sqnr_db is not None and r.bits_per_weight < 4 for r in report.layers)


def test_distill_stage_drops_layers_in_place():
    m, calib = _model(layers=4), _calib()
    report = compress(m, parse_recipe("""
stages:
  - kind: distill
    keep: every_other
    temperature: 2.0
    hard_weight: 0.5
    steps: 3
    lr: 1.0e-3
    batch_size: 4
"""), calib)
    assert m.config.num_hidden_layers == 2 and len(m.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in m.model.layers] == [0, 1]
    assert report.size_bytes_after < report.size_bytes_before
    out = m.generate(calib.input_ids[:1, :4], max_new_tokens=3, do_sample=False)  # KV cache indices consistent
    assert out.shape == (1, 7)


def test_bundled_training_recipes_parse():
    assert load_recipe("w3-qat-g128").stages[0].config.scheme.bits == 3
    assert load_recipe("distill-half-depth").stages[0].config.keep == "every_other"


def test_bad_fields_are_named_with_lines():
    with pytest.raises(RecipeError, match=r":5: stages\[0\]\.teacher"):
        parse_recipe("stages:\n  - kind: qat\n    steps: 2\n    lr: 1.0e-3\n    teacher: teacherless\n")
    with pytest.raises(RecipeError, match="keep"):
        parse_recipe("stages:\n  - kind: distill\n    keep: half\n")
    with pytest.raises(RecipeError, match="steps"):
        parse_recipe("stages:\n  - kind: distill\n    steps: 0\n")
    with pytest.raises(InputError, match="calib"):
        compress(_model(), parse_recipe(QAT % "false"), None)
