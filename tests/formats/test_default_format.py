"""``save_compressed`` / ``compress`` write compressed-tensors whenever a standard holds the model, and our own
format otherwise, which plain transformers refuses by name instead of loading random weights (issue #21 item 1).

Oracles: the compressed-tensors package's own decompressor, and plain transformers in a fresh process that
never imports torchcompress."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import torchcompress as tc
from torchcompress import QuantLinear, QuantScheme
from torchcompress.errors import FormatError

pytest.importorskip("compressed_tensors")
from tests.formats.ct_oracle import their_weight  # noqa: E402
pytestmark = pytest.mark.hf

SCHEMES = {
    "w4g32-sym": QuantScheme(bits=4, group_size=32),
    "w4g32-asym": QuantScheme(bits=4, group_size=32, symmetric=False),
    "w3g32-sym": QuantScheme(bits=3, group_size=32),
    "w2g64-asym": QuantScheme(bits=2, group_size=64, symmetric=False),
    "w8-channel": QuantScheme(bits=8, granularity="channel"),
    "w8g32-bf16": QuantScheme(bits=8, group_size=32, scale_dtype="bfloat16"),
}


def _quantized(tiny_llama, scheme, tied=True):
    model = tiny_llama(tied=tied)
    tc.quantize_(model, scheme)
    return model




@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("key", list(SCHEMES))
def test_int_schemes_are_written_as_compressed_tensors_and_reload_bit_exactly(tmp_path, tiny_llama, token_ids, key, tied):
    model = _quantized(tiny_llama, SCHEMES[key], tied)
    with torch.no_grad():
        ref = model(token_ids).logits
    out = tc.save_compressed(model, tmp_path / key)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert cfg["model_type"] == "llama" and qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    assert sum(len(g["targets"]) for g in qc["config_groups"].values()) == 14
    name = "model.layers.1.mlp.down_proj"
    src = model.get_submodule(name)
    # their decompressor gives our dequantized weight: they multiply in the scale's dtype, we in fp32 and
    # round once to it; (q - z) * scale rounded once either way, so equal bit for bit
    theirs = their_weight(out, name)
    assert torch.equal(theirs.float(), src.dequantize(torch.float32).to(theirs.dtype).float())

    loaded = tc.load_compressed(out)
    q = loaded.get_submodule(name)
    assert type(q) is QuantLinear and q.scheme == SCHEMES[key]
    for buf in ("qweight", "scale", "zero"):
        a, b = getattr(q, buf, None), getattr(src, buf, None)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), buf
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, ref)


_LOADER = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    path, ids_file, out_file, plugin = sys.argv[1:5]
    if plugin == "1":
        import torchcompress.hf
    from transformers import AutoModelForCausalLM
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except Exception as e:
        print("REFUSED", type(e).__name__, str(e).splitlines()[0])
        sys.exit(3)
    assert plugin == "1" or "torchcompress" not in sys.modules, "the loader imported torchcompress"
    with torch.no_grad():
        logits = m(load_file(ids_file)["ids"]).logits.float()
    save_file({"logits": logits.contiguous()}, out_file)
""")


def _transformers(path, ids, tmp_path, plugin=False):
    """(return code, stdout, logits or None) of ``from_pretrained`` in a fresh process."""
    from safetensors.torch import load_file, save_file

    save_file({"ids": ids.contiguous()}, str(tmp_path / "ids.safetensors"))
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if plugin:
        from pathlib import Path

        from torchcompress.models import cache_dir

        env["PYTHONPATH"] = str(Path(tc.__file__).resolve().parents[1])
        env["TORCHCOMPRESS_CACHE"] = str(cache_dir())  # the native kernels already built for this checkout
    r = subprocess.run([sys.executable, "-c", _LOADER, str(path), str(tmp_path / "ids.safetensors"),
                        str(tmp_path / "logits.safetensors"), "1" if plugin else "0"],
                       capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    logits = load_file(str(tmp_path / "logits.safetensors"))["logits"] if r.returncode == 0 else None
    return r.returncode, r.stdout + r.stderr[-2000:], logits


# Symmetric schemes load in plain transformers. Asymmetric pack-quantized does not load there with
# compressed-tensors 0.20.1 (its meta-device compression leaves weight_zero_point unpacked, so every
# checkpoint's packed zero point is a size mismatch: an upstream defect, llm-compressor's outputs too);
# vLLM reads them, and load_compressed does (test above).
@pytest.mark.parametrize("key", ["w4g32-sym", "w8-channel", "w3g32-sym"])
def test_plain_transformers_in_a_fresh_process_gives_our_logits(tmp_path, tiny_llama, token_ids, key):
    model = _quantized(tiny_llama, SCHEMES[key])
    with torch.no_grad():
        mine = model(token_ids).logits
    out = tc.save_compressed(model, tmp_path / "m")
    rc, log, theirs = _transformers(out, token_ids, tmp_path)
    assert rc == 0, log
    # measured max |diff| 0 .. 2e-6 on logits of magnitude ~0.5 (the same fp32 dequantization, other op order)
    assert (theirs - mine).abs().max().item() <= 1e-5


def _own_format(tiny_llama):
    """Partial last groups (48 does not divide 64 or 128): no compressed-tensors form."""
    return _quantized(tiny_llama, QuantScheme(bits=4, group_size=48, symmetric=False))


def test_own_format_is_refused_by_plain_transformers_naming_the_import(tmp_path, tiny_llama, token_ids):
    model = _own_format(tiny_llama)
    with torch.no_grad():
        mine = model(token_ids).logits
    out = tc.save_compressed(model, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "torchcompress"
    rc, log, theirs = _transformers(out, token_ids, tmp_path)
    assert rc == 3 and theirs is None, log
    assert "REFUSED ValueError" in log and "import torchcompress.hf" in log, log
    rc, log, theirs = _transformers(out, token_ids, tmp_path, plugin=True)  # the same call once we are imported
    assert rc == 0, log
    assert torch.equal(theirs, mine)


def test_old_manifests_stay_loadable(tmp_path, tiny_llama, token_ids):
    """Checkpoints written before the standard default kept model_type and quant_method: torchcompress."""
    model = _own_format(tiny_llama)
    with torch.no_grad():
        mine = model(token_ids).logits
    out = tc.save_compressed(model, tmp_path / "m")
    p = out / "config.json"
    cfg = json.loads(p.read_text())
    cfg["model_type"] = cfg.pop("torchcompress_model_type")
    p.write_text(json.dumps(cfg))
    with torch.no_grad():
        assert torch.equal(tc.load_compressed(out)(token_ids).logits, mine)


def test_a_mix_with_an_own_format_module_stays_in_our_format(tmp_path, tiny_llama, token_ids):
    from torchcompress.config import HQQConfig
    from torchcompress.formats.checkpoint import build_manifest, standard_format_reason

    model = tiny_llama()
    name = "model.layers.0.self_attn.q_proj"
    tc.quantize_(model, HQQConfig(iters=2), targets=[name])  # float zero points: no compressed-tensors form
    tc.quantize_(model, SCHEMES["w4g32-sym"], ignore=[name, "lm_head"])
    reason = standard_format_reason(build_manifest(model))
    assert reason is not None and name in reason and "float zero" in reason
    with torch.no_grad():
        mine = model(token_ids).logits
    out = tc.save_compressed(model, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "torchcompress"
    with torch.no_grad():
        assert torch.equal(tc.load_compressed(out)(token_ids).logits, mine)


def test_llm_compressor_style_targets_load(tmp_path, tiny_llama, token_ids):
    """Checkpoints from other tools target the class ``Linear`` with an ignore list, not exact names."""
    model = _quantized(tiny_llama, SCHEMES["w4g32-sym"])
    with torch.no_grad():
        mine = model(token_ids).logits
    out = tc.save_compressed(model, tmp_path / "m")
    p = out / "config.json"
    cfg = json.loads(p.read_text())
    (group,) = cfg["quantization_config"]["config_groups"].values()
    group["targets"] = ["Linear"]
    p.write_text(json.dumps(cfg))
    with torch.no_grad():
        assert torch.equal(tc.load_compressed(out)(token_ids).logits, mine)


def test_unsupported_compressed_tensors_group_is_refused_by_module(tmp_path, tiny_llama):
    model = _quantized(tiny_llama, SCHEMES["w4g32-sym"])
    out = tc.save_compressed(model, tmp_path / "m")
    p = out / "config.json"
    cfg = json.loads(p.read_text())
    (group,) = cfg["quantization_config"]["config_groups"].values()
    group["format"] = "marlin-24"
    p.write_text(json.dumps(cfg))
    with pytest.raises(FormatError) as ei:
        tc.load_compressed(out)
    assert "model.layers.0.self_attn.q_proj" in str(ei.value) and "marlin-24" in str(ei.value)


def test_scheme_modules_are_written_as_compressed_tensors(tmp_path, tiny_llama, token_ids):
    from torchcompress.quant.scheme_config import FP8Config
    from torchcompress.quant.schemes import apply_scheme_

    model = apply_scheme_(copy.deepcopy(tiny_llama()), FP8Config(), None)
    with torch.no_grad():
        mine = model(token_ids).logits
    out = tc.save_compressed(model, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "float-quantized"
    loaded = tc.load_compressed(out)
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "FP8Linear"
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, mine)
