"""`torchcompress export --format onnx`: a compress output in, an onnxruntime-genai folder out; bad input exit 2."""

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_cli_exports_a_w4_compress_output(tmp_path, tiny_llama_dir, capsys):
    from torchcompress.cli import main

    comp = tmp_path / "w4"
    assert main(["compress", "--model", str(tiny_llama_dir), "--recipe", "w4-rtn", "--out", str(comp)]) == 0
    capsys.readouterr()
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(comp), "--format", "onnx", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    import re

    counts = re.search(r"MatMulNBits: ([^;]*);", line).group(1)  # e.g. "12 w4 channel asym, 2 w4 g128 asym"
    assert sum(int(c.split()[0]) for c in counts.split(", ")) == 14 and "w4" in counts, line
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def test_cli_refuses_nvfp4_with_exit_2_and_writes_nothing(tmp_path, tiny_text_file, capsys):
    import torch
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config
    from torchcompress.cli import main

    src = tmp_path / "tiny192"  # every in_features a multiple of NVFP4's 16-column blocks
    tok = make_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(vocab_size=len(tok), intermediate_size=192)).save_pretrained(src)
    tok.save_pretrained(src)
    comp = tmp_path / "nvfp4"
    assert main(["compress", "--model", str(src), "--recipe", "nvfp4", "--out", str(comp),
                 "--calib", str(tiny_text_file), "--calib-samples", "2", "--seq-len", "16"]) == 0
    capsys.readouterr()
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(comp), "--format", "onnx", "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "model.layers.0." in err[0] and "NVFP4" in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")]  # no partial output
