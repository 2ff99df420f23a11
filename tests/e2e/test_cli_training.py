"""`compress --recipe` with training stages (qat, distill) on the tiny saved Llama; text from --calib."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.hf]


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "torchcompress", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_cli_qat_then_distill_recipe(tiny_llama_dir, tiny_text_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""name: qat-distill
stages:
  - kind: distill
    keep: 1
    steps: 3
    lr: 1.0e-3
    batch_size: 2
  - kind: qat
    scheme: {bits: 4, group_size: 32, symmetric: false}
    steps: 3
    lr: 1.0e-4
    batch_size: 2
""")
    out, js = tmp_path / "out", tmp_path / "r.json"
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", recipe, "--out", out, "--calib", tiny_text_file,
                     "--calib-samples", 4, "--seq-len", 16, "--eval", tiny_text_file, "--eval-windows", 2, "--json", js)
    assert rc == 0, se
    d = json.loads(js.read_text())
    assert [s["kind"] for s in d["stages"]] == ["distill", "qat"]
    assert d["calibration"]["samples"] == 4 and d["compression_ratio"] > 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1
    rc, so, se = run("info", out)
    assert rc == 0, se
    assert "QuantLinear" in so, so
