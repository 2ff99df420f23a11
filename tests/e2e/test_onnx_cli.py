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
    assert "MatMulNBits: 14 w4" in line, line
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def test_cli_refuses_nvfp4_with_exit_2_and_writes_nothing(tmp_path, tiny_llama_dir, tiny_text_file, capsys):
    from torchcompress.cli import main

    comp = tmp_path / "nvfp4"
    assert main(["compress", "--model", str(tiny_llama_dir), "--recipe", "nvfp4", "--out", str(comp),
                 "--calib", str(tiny_text_file), "--calib-samples", "2", "--seq-len", "16"]) == 0
    capsys.readouterr()
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(comp), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.0." in err[0] and "FP4Linear" in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")]
