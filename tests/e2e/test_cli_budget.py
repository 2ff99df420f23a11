"""`compress --target-bpw / --target-size` (mixed precision under a size budget) through the CLI: the
saved output respects the budget, the report plots bits per layer, a budget out of range is a one-line
error with exit 2 and no output, and a GGUF mix exports to a .gguf that gguf-py reads with the chosen types."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.hf]


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torchcompress", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHCOMPRESS_CACHE_DIR", str(tmp_path / "cache"))


def _calib(text):
    return ("--calib", text, "--calib-samples", 4, "--seq-len", 32)


def _layer_bits(out, modules):
    from safetensors import safe_open

    bits = 0
    for f in out.glob("model*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                mod, _, leaf = key.rpartition(".")
                if mod in modules and leaf in ("qweight", "scale", "zero", "blocks"):
                    t = sf.get_tensor(key)
                    bits += t.numel() * t.element_size() * 8
    return bits


@pytest.mark.parametrize("recipe", ["w4-rtn", "mixed-4.5bpw-gptq"])
def test_target_bpw(tiny_llama_dir, tiny_text_file, tmp_path, recipe):
    out, js, rep = tmp_path / "out", tmp_path / "r.json", tmp_path / "report"
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", recipe, "--out", out, *_calib(tiny_text_file),
                     "--target-bpw", 3.75, "--json", js, "--report", rep)
    assert rc == 0, se
    d = json.loads(js.read_text())
    assert [s["kind"] for s in d["stages"]] == ["budget"]
    layers = {r["module"]: r for r in d["layers"]}
    assert len(layers) == 14 and all(r["choice"] for r in layers.values())
    assert len({r["choice"] for r in layers.values()}) > 1
    params = sum(r["params"] for r in layers.values())  # weights only: these Linears have no bias
    bpw = _layer_bits(out, set(layers)) / params
    assert 3.5 < bpw <= 3.75
    assert (rep / "bits_per_layer.png").is_file() and "Bits per layer" in (rep / "report.md").read_text()


def test_target_size(tiny_llama_dir, tiny_text_file, tmp_path):
    out = tmp_path / "out"
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w4-rtn", "--out", out, *_calib(tiny_text_file),
                     "--target-size", "0.2MB")
    assert rc == 0, se
    disk = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    assert 190_000 < disk <= 200_000


@pytest.mark.parametrize("flag,value,words", [("--target-bpw", 1.0, ["target_bpw", "1 bits", "feasible range"]),
                                              ("--target-bpw", 33, ["target_bpw", "33", "32.000"]),
                                              ("--target-size", "10KB", ["target_size", "10KB", "feasible range"]),
                                              ("--target-size", "1GB", ["target_size", "1GB", "feasible range"])])
def test_budget_out_of_range_exit_2_no_output(tiny_llama_dir, tiny_text_file, tmp_path, flag, value, words):
    out = tmp_path / "out"
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w4-rtn", "--out", out, *_calib(tiny_text_file),
                     flag, value)
    assert rc == 2, se
    lines = se.strip().splitlines()  # (progress lines of loading and calibration come first)
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("error:"), se
    for w in words:
        assert w in lines[-1], (w, lines[-1])
    assert not out.exists() and not (tmp_path / "out.state").exists()
    assert not list(tmp_path.glob("out*"))


def test_budget_flag_errors(tiny_llama_dir, tmp_path):
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "wanda-50", "--out", tmp_path / "o",
                     "--target-bpw", 4)
    assert rc == 2 and "--target-bpw" in se and "exactly one" in se
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w4-rtn", "--out", tmp_path / "o",
                     "--target-size", "80 parsecs")
    assert rc == 2 and "--target-size" in se
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "w4-rtn", "--out", tmp_path / "o",
                     "--target-size", "80MB", "--target-bpw", 4)
    assert rc == 2 and "not allowed with" in se


def test_gguf_mix_exports_with_the_chosen_types(tiny_llama_dir, tiny_text_file, tmp_path):
    gguf = pytest.importorskip("gguf")
    out, js = tmp_path / "out", tmp_path / "r.json"
    rc, so, se = run("compress", "--model", tiny_llama_dir, "--recipe", "gguf-mixed-4.5bpw", "--out", out,
                     *_calib(tiny_text_file), "--target-bpw", 5.0, "--json", js)
    assert rc == 0, se
    layers = {r["module"]: r["choice"] for r in json.loads(js.read_text())["layers"]}
    assert len(layers) == 12  # down_proj's rows of 200 fit no block: they stay float
    rc, so, se = run("export", "--model", out, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert rc == 0, se
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    bits = params = 0
    for module, choice in layers.items():
        b, leaf = module.split(".")[2], module.split(".", 3)[3]
        t = tensors[f"blk.{b}.{names[leaf]}.weight"]
        assert t.tensor_type.name == choice, (module, t.tensor_type.name, choice)
        bits += int(t.n_bytes) * 8
        params += int(t.n_elements)
    assert bits / params <= 5.0
    assert len(set(layers.values())) > 1
    try:
        import llama_cpp  # noqa: F401
    except ImportError:  # llama.cpp's binding is not installed here: gguf-py's reader is the check
        return
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False)
    assert len(llm.tokenize(b"hello")) > 0 and llm.eval(llm.tokenize(b"hello")) is None
