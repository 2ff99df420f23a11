"""`compress` with a GGUF-type `kind: qat` stage, then `export --format gguf` of its output: the .gguf
holds the trained GGUFLinear blocks verbatim (read back by gguf-py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.hf]


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "torchcompress", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_cli_gguf_qat_then_export(tiny_llama_dir, tiny_text_file, tmp_path):
    gguf = pytest.importorskip("gguf")
    from torchcompress.models import load_model

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: gguf-qat\nstages:\n  - kind: qat\n    qtype: Q4_0\n    steps: 2\n    lr: 1.0e-4\n"
                      "    batch_size: 2\n")
    out = tmp_path / "out"
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", recipe, "--out", out, "--calib", tiny_text_file,
                     "--calib-samples", 4, "--seq-len", 16)
    assert rc == 0, se
    rc, so, se = run("export", "--model", out, "--format", "gguf", "--out", tmp_path / "m.gguf", "--pure")
    assert rc == 2 and "--pure" in se
    rc, so, se = run("export", "--model", out, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert rc == 0, se
    # 12 Linears in Q4_0; down_proj (rows of 200: no block fits) stays float, with embeddings and norms
    assert "8 F32, 12 Q4_0" in so
    model = load_model(str(out)).model
    up = model.model.layers[0].mlp.up_proj
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}["blk.0.ffn_up.weight"]
    assert int(t.tensor_type) == int(up.qtype) and np.array_equal(np.asarray(t.data).reshape(up.blocks.shape),
                                                                 up.blocks.numpy())
