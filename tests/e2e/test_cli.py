"""The CLI contract (shared/docs/CLI.md) on a tiny saved Llama, through a real subprocess."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.hf]


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "torchcompress", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_compress_eval_info_roundtrip(tiny_llama_dir, tiny_text_file, tmp_path):
    out, js, rep = tmp_path / "out", tmp_path / "r.json", tmp_path / "report"
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w8-rtn", "--out", out,
                     "--eval", tiny_text_file, "--seq-len", 32, "--eval-windows", 4, "--json", js, "--report", rep)
    assert rc == 0, se
    d = json.loads(js.read_text())
    for key in ("size_bytes_before", "size_bytes_after", "compression_ratio", "stages",
                "perplexity_before", "perplexity_after", "kl_divergence", "top1_agreement"):
        assert key in d, key
    assert d["stages"][0]["kind"] == "rtn" and d["stages"][0]["seconds"] >= 0
    assert d["compression_ratio"] > 1
    # w8 per-channel barely moves a random model's perplexity
    assert d["perplexity_after"] == pytest.approx(d["perplexity_before"], rel=0.01)
    assert (rep / "report.md").is_file() and (rep / "layer_sqnr.png").is_file()
    assert "perplexity" in so

    # the output is a MODEL for every other command
    rc, so, se = run("eval", "--model", out, "--text", tiny_text_file, "--seq-len", 32, "--windows", 4,
                     "--json", tmp_path / "e.json")
    assert rc == 0, se
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["perplexity"] == pytest.approx(d["perplexity_after"], rel=1e-5)
    assert e["tokens"] == 4 * 31

    rc, so, se = run("info", out)
    assert rc == 0, se
    assert "QuantLinear w8 channel sym" in so and "compressed modules" in so


def test_recipe_check(tmp_path):
    assert run("recipe", "check", "w4-rtn")[0] == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - kind: rtn\n    scheme:\n      bits: 12\n")
    rc, so, se = run("recipe", "check", bad)
    assert rc == 2
    lines = se.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:4" in lines[0] and "bits" in lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["compress", "--model", "/no/such/model", "--recipe", "w4-rtn", "--out", "{tmp}/o"], "/no/such/model"),
    (["compress", "--model", "{model}", "--recipe", "nope", "--out", "{tmp}/o"], "nope"),
    (["compress", "--model", "{model}", "--recipe", "w4-rtn", "--out", "{tmp}/o", "--seq-len", "0"], "--seq-len"),
    (["compress", "--model", "{model}", "--recipe", "w4-rtn", "--out", "{tmp}/o", "--eval", "{tmp}/missing.txt"],
     "missing.txt"),
    (["compress", "--model", "{model}", "--recipe", "w4-rtn", "--out", "{tmp}/o", "--calib", "{tmp}/nocalib.txt"],
     "nocalib.txt"),
    (["eval", "--model", "{model}", "--text", "{tmp}/missing.txt"], "missing.txt"),
    (["info", "{tmp}/nothing"], "nothing"),
    (["compress", "--model", "{model}"], "required"),
])
def test_bad_input_exits_2_with_one_line(args, fragment, tiny_llama_dir, tmp_path):
    args = [a.format(tmp=tmp_path, model=tiny_llama_dir) for a in args]
    rc, so, se = run(*args)
    assert rc == 2, se
    lines = se.strip().splitlines()
    assert fragment in lines[-1]
    assert "Traceback" not in se


def test_unwritable_output_dir(tiny_llama_dir, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"  # root can write anywhere; a path under a regular file cannot be created
        blocker.write_text("x")
        out = blocker / "sub" / "out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = ro / "out"
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w4-rtn", "--out", out)
    assert rc == 2, se
    assert str(out.parent) in se.strip().splitlines()[-1]


def test_resume_reuses_a_finished_run_and_refuses_a_different_one(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert run("compress", "--model", tiny_llama_dir, "--recipe", "w4-rtn", "--out", out)[0] == 0
    before = (out / "model.safetensors").read_bytes()
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w4-rtn", "--out", out, "--resume",
                     "--json", tmp_path / "r.json")
    assert rc == 0, se
    assert "skipping compression" in se
    assert (out / "model.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "r.json").read_text())["stages"][0]["modules"] > 0
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w8-rtn", "--out", out, "--resume")
    assert rc == 2 and "refusing to resume" in se
    assert (out / "model.safetensors").read_bytes() == before  # untouched
