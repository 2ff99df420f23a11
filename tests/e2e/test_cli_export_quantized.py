"""`export --format gptq|compressed-tensors`: a `compress` output becomes a directory other tools load."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.e2e, pytest.mark.hf]


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "torchcompress", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def rtn_out(tiny_llama_dir, tmp_path_factory):
    # W4 g8 symmetric (every tiny layer width is a multiple of 8, so compressed-tensors can hold it too)
    d = tmp_path_factory.mktemp("exp")
    recipe = d / "w4.yaml"
    recipe.write_text("name: w4-g8\nstages:\n  - name: q\n    kind: rtn\n    scheme:\n      bits: 4\n"
                      "      granularity: group\n      group_size: 8\n      symmetric: true\n")
    rc, _, se = run("compress", "--model", tiny_llama_dir, "--recipe", recipe, "--out", d / "out")
    assert rc == 0, se
    return d / "out"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_export_directory_loads_with_same_outputs(rtn_out, tmp_path, fmt):
    from torchcompress.models import load_model

    out = tmp_path / fmt
    rc, so, se = run("export", "--model", rtn_out, "--format", fmt, "--out", out)
    assert rc == 0, se
    assert f"({fmt})" in so
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == ("gptq" if fmt == "gptq" else "compressed-tensors")
    ours = load_model(rtn_out).model.eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    if fmt == "gptq":
        from torchcompress.formats.gptq import load_gptq

        back = load_gptq(out).eval()
        torch.testing.assert_close(_logits(back, ids), _logits(ours, ids), rtol=1e-5, atol=1e-5)
    else:
        pytest.importorskip("compressed_tensors")
        from transformers import AutoModelForCausalLM

        back = AutoModelForCausalLM.from_pretrained(out).eval()  # compressed-tensors' own decompressor
        torch.testing.assert_close(_logits(back, ids), _logits(ours, ids), rtol=1e-4, atol=1e-4)


def test_export_float_model_is_refused(tiny_llama_dir, tmp_path):
    rc, _, se = run("export", "--model", tiny_llama_dir, "--format", "gptq", "--out", tmp_path / "g")
    last = se.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: --model") and "no quantized Linear" in last
    assert not (tmp_path / "g").exists()


def test_export_directory_format_refuses_gguf_name(rtn_out, tmp_path):
    rc, _, se = run("export", "--model", rtn_out, "--format", "compressed-tensors", "--out", tmp_path / "x.gguf")
    assert rc == 2 and "writes a directory" in se
