"""`compress --recipe` with the bundled pruning recipes; the outputs load and run."""

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


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["structured-mlp-25", "sparsegpt-2of4"])
def test_prune_recipes_cli(recipe, tiny_llama_dir, tiny_text_file, tmp_path):
    out, js = tmp_path / "out", tmp_path / "r.json"
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", recipe, "--out", out, "--calib", tiny_text_file,
                     "--calib-samples", 4, "--seq-len", 32, "--json", js, "--eval", tiny_text_file, "--eval-windows", 2)
    assert rc == 0, se
    d = json.loads(js.read_text())
    assert d["stages"][0]["modules"] == (6 if recipe.startswith("structured") else 14)
    rc, so, se = run("eval", "--model", out, "--text", tiny_text_file, "--seq-len", 32, "--windows", 2)
    assert rc == 0, se
    assert f"{d['perplexity_after']:.4f}" in so
    cfg = json.loads((out / "config.json").read_text())
    if recipe.startswith("structured"):
        assert cfg["intermediate_size"] == 150  # tiny_config: 200
        assert d["size_bytes_after"] < d["size_bytes_before"]
