"""A streamed GPTQ run killed with SIGKILL (between blocks, or inside one: after its GPTQ solve, or
after its shard is on disk but before the state records it) resumes from the last finished block
and ends with the output of an uninterrupted run, byte for byte."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from torchcompress.cli import main

KILLER = textwrap.dedent("""
    import os, signal, sys
    import torchcompress.pipeline.writer as w
    import torchcompress.quant.gptq as g
    import torchcompress.recipe.streaming as s
    from torchcompress.cli import main

    where, at = os.environ["KILL_AT"].split(":")
    at = int(at)
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs

    if where == "after":  # between blocks: block `at` written and recorded
        real = s.compress_checkpoint
        def killing(*a, **k):
            inner = k["on_block"]
            def on_block(b, n):
                inner(b, n)
                if b == at:
                    die()
            k["on_block"] = on_block
            return real(*a, **k)
        s.compress_checkpoint = killing
    elif where == "step":  # mid-block: block `at`'s Linears quantized in memory, its outputs not yet run
        real_step = g.gptq_step
        def gptq_step(*a, **k):
            step = real_step(*a, **k)
            inner = step.apply
            def apply(ctx):
                inner(ctx)
                if ctx.index == at:
                    die()
            step.apply = apply
            return step
        g.gptq_step = gptq_step
    elif where == "shard":  # mid-block: block `at`'s shard renamed into place, the state not yet updated
        real_write = w.ShardWriter.write_shard
        def write_shard(self, index, *a, **k):
            real_write(self, index, *a, **k)
            if index == at:
                die()
        w.ShardWriter.write_shard = write_shard
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), num_hidden_layers=4))
    d = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(d, max_shard_size="150KB")
    tok.save_pretrained(d)
    return d


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix in (".safetensors", ".json")
            and p.name != "run.json"}


@pytest.mark.parametrize("offload,kill_at,done", [(False, "after:1", 2), (True, "after:1", 2), (False, "step:2", 2),
                                                  (True, "shard:2", 2)])
def test_sigkill_then_resume_equals_uninterrupted(src, tmp_path, offload, kill_at, done):
    args = ["compress", "--model", str(src), "--recipe", "w4-gptq-g128", "--calib", "pydoc", "--calib-samples", "8",
            "--seq-len", "32", "--device", "cpu", "--stream", "on"]
    if offload:
        args += ["--offload-dir", str(tmp_path / "act")]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    env = {**os.environ, "KILL_AT": kill_at, "PYTHONPATH": os.getcwd()}
    p = subprocess.run([sys.executable, "-c", KILLER, *args, "--out", str(out)], env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not out.exists()  # no torn output: only the partial state
    state = json.loads((tmp_path / "out.partial" / "state.json").read_text())
    assert state["done_blocks"] == done
    killed_peaks = state["extra"]["memory"]["linears-w4-g128-gptq"]
    assert killed_peaks["peak_rss"] > 0
    assert main(args + ["--out", str(out), "--resume"]) == 0
    run = json.loads((out / "run.json").read_text())["report"]
    (stage,) = run["stages"]  # the stage's peak covers the blocks done before the kill too
    assert stage["peak_rss_bytes"] >= killed_peaks["peak_rss"]
    assert not (tmp_path / "out.partial").exists()
    ref, got = _files(tmp_path / "ref"), _files(out)
    assert ref.keys() == got.keys()
    assert all(ref[k] == got[k] for k in ref), [k for k in ref if ref[k] != got[k]]


def test_resume_refuses_other_settings(src, tmp_path, capsys):
    args = ["compress", "--model", str(src), "--recipe", "w4-gptq-g128", "--calib", "pydoc", "--calib-samples", "8",
            "--stream", "on", "--seq-len", "32", "--out", str(tmp_path / "out")]
    env = {**os.environ, "KILL_AT": "after:0", "PYTHONPATH": os.getcwd()}
    p = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL
    rc = main(args[:-4] + ["--seq-len", "16", "--out", str(tmp_path / "out"), "--resume"])
    assert rc == 2 and "refusing to resume" in capsys.readouterr().err
