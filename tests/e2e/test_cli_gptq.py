"""`compress` with a GPTQ recipe: calibration from --calib (or the model itself), recorded in the JSON."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.hf]


def run(*args, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    p = subprocess.run([sys.executable, "-m", "torchcompress", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.slow
def test_gptq_recipe_with_text_calibration(tiny_llama_dir, tiny_text_file, tmp_path):
    out, js = tmp_path / "out", tmp_path / "r.json"
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w4-gptq-g128", "--out", out,
                     "--calib", tiny_text_file, "--calib-samples", 4, "--seq-len", 32, "--json", js,
                     "--eval", tiny_text_file, "--eval-windows", 2)
    assert rc == 0, se
    d = json.loads(js.read_text())
    cal = d["calibration"]
    assert cal["samples"] == 4 and cal["seq_len"] == 32 and len(cal["sha256"]) == 64
    assert cal["sources"][0]["source"] == str(tiny_text_file)
    assert d["stages"][0]["kind"] == "gptq" and d["stages"][0]["modules"] == 14
    assert "calibration: 4 x 32" in se
    # the act-order output (GPTQLinear with g_idx) is a MODEL for eval: loads through the HF quantizer
    rc, so, se = run("eval", "--model", out, "--text", tiny_text_file, "--seq-len", 32, "--windows", 2)
    assert rc == 0, se
    assert f"{d['perplexity_after']:.4f}" in so


@pytest.mark.slow
def test_gptq_default_calibration_is_self_sampled_and_cached(tiny_llama_dir, tmp_path):
    env = {"TORCHCOMPRESS_CACHE": str(tmp_path / "cache")}
    for i in range(2):
        rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w3-gptq-g128", "--out", tmp_path / f"o{i}",
                         "--calib-samples", 2, "--seq-len", 16, "--json", tmp_path / f"{i}.json", env_extra=env)
        assert rc == 0, se
    a, b = (json.loads((tmp_path / f"{i}.json").read_text())["calibration"] for i in range(2))
    assert a["sources"][0]["source"] == "self" and a["sha256"] == b["sha256"]
    assert len(list((tmp_path / "cache" / "calibration").glob("self-*.safetensors"))) == 1


def test_bad_calibration_sources_exit_2(tiny_llama_dir, tmp_path):
    rc, _, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w4-gptq-g128", "--out", tmp_path / "o",
                    "--calib", "hf:some/dataset:train:text", "--calib-samples", 2, "--seq-len", 16)
    last = se.strip().splitlines()[-1]  # (transformers prints its loading bar before)
    assert rc == 2 and last.startswith("error: ") and "hf:some/dataset" in last
    rc, _, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w4-gptq-g128", "--out", tmp_path / "o",
                    "--calib", tmp_path / "missing.txt")
    assert rc == 2 and "no such file" in se


def test_offload_dir_flag(tiny_llama_dir, tiny_text_file, tmp_path):
    off = tmp_path / "offload"
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w4-gptq-g128", "--out", tmp_path / "o",
                     "--calib", tiny_text_file, "--calib-samples", 2, "--seq-len", 16, "--offload-dir", off)
    assert rc == 0, se
    assert off.is_dir() and list(off.iterdir()) == []  # used, then cleaned up
