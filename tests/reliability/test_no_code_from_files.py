"""Nothing runs code found in a file: no unpickling, no remote code, no rendering of metadata templates.

Every hostile payload here would create a marker file if it ran; each test asserts the marker is absent
as well as the typed error (or the safe load) that we promise.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

import torchcompress
from torchcompress.errors import FormatError, InputError
from torchcompress.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore")


class _Payload:
    """Unpickling this runs ``touch marker`` (a stand-in for any code an attacker wants)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(path: Path, marker: Path):
    with open(path, "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, f)


def _the_payload_works(tmp_path):
    """Guard against a test that cannot fail: unpickling the payload really creates the marker."""
    m = tmp_path / "control-marker"
    _plant_pickle(tmp_path / "control.bin", m)
    with open(tmp_path / "control.bin", "rb") as f:
        pickle.load(f)  # the only unpickling in this file, of our own payload, to prove it is live
    assert m.exists()


def test_payload_is_live(tmp_path):
    _the_payload_works(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "model.ckpt"])
def test_pickle_weights_are_refused(model_copy, tmp_path, name):
    marker = tmp_path / "pwned"
    (model_copy / "model.safetensors").unlink()
    _plant_pickle(model_copy / name, marker)
    with pytest.raises(InputError, match="pickle"):
        load_model(model_copy)
    assert not marker.exists()


def test_pickle_beside_safetensors_is_never_read(model_copy, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    _plant_pickle(model_copy / "pytorch_model.bin", marker)

    def boom(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    lm = load_model(model_copy)
    assert lm.model is not None and not marker.exists()


def test_pickle_model_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "model.pt", marker)
    with pytest.raises(InputError, match=r"\.gguf"):
        load_model(tmp_path / "model.pt")
    assert not marker.exists()


def test_cli_refuses_pickle_model_with_exit_2(model_copy, tmp_path, capsys):
    from torchcompress.cli import main

    marker = tmp_path / "pwned"
    (model_copy / "model.safetensors").unlink()
    _plant_pickle(model_copy / "pytorch_model.bin", marker)
    assert main(["compress", "--model", str(model_copy), "--recipe", "w8-rtn", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pickle" in err[0] and not marker.exists()


def test_pickle_calibration_file_is_not_unpickled(tiny_model_dir, tmp_path, capsys):
    """--calib payload.pt is read as text (and refused), never unpickled."""
    from torchcompress.cli import main

    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "calib.pt", marker)
    rc = main(["compress", "--model", str(tiny_model_dir), "--recipe", "w4-gptq-g128", "--out", str(tmp_path / "o"),
               "--calib", str(tmp_path / "calib.pt"), "--calib-samples", "2", "--seq-len", "16"])
    assert rc == 2, capsys.readouterr().err
    assert "calib.pt" in capsys.readouterr().err and not marker.exists()


# --------------------------------------------------------------------------------------------- remote code


_EVIL_CODE = """import pathlib
pathlib.Path({marker!r}).write_text("pwned")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _plant_code(d: Path, marker: Path, model_type: str | None = None, tokenizer: bool = False):
    (d / "evil.py").write_text(_EVIL_CODE.format(marker=str(marker)))
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    if model_type:
        cfg["model_type"] = model_type
    (d / "config.json").write_text(json.dumps(cfg))
    if tokenizer:
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
        tc["tokenizer_class"] = "EvilTokenizer"
        (d / "tokenizer_config.json").write_text(json.dumps(tc))


def test_auto_map_on_a_known_architecture_loads_without_running_it(model_copy, tmp_path):
    marker = tmp_path / "pwned"
    _plant_code(model_copy, marker, tokenizer=True)
    lm = load_model(model_copy)
    assert type(lm.model).__module__.startswith("transformers.")  # the library's class, not evil.EvilModel
    assert lm.tokenizer is None or type(lm.tokenizer).__module__.startswith("transformers.")
    assert not marker.exists()


def test_custom_architecture_is_refused(model_copy, tmp_path):
    marker = tmp_path / "pwned"
    _plant_code(model_copy, marker, model_type="evil")
    with pytest.raises(FormatError, match="custom code"):
        load_model(model_copy)
    assert not marker.exists()


def test_compressed_checkpoint_with_custom_code_is_refused(tiny_model_dir, tmp_path):
    """load_compressed rebuilds the skeleton from config.json: with trust_remote_code off."""
    lm = load_model(tiny_model_dir)
    torchcompress.quantize_(lm.model, torchcompress.RTNConfig(torchcompress.QuantScheme(bits=8, granularity="channel")))
    out = torchcompress.save_compressed(lm.model, tmp_path / "c", lm.tokenizer)
    marker = tmp_path / "pwned"
    _plant_code(out, marker, model_type="evil")
    with pytest.raises(InputError):
        load_model(out)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- templates


_SSTI = "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}"


def test_hostile_chat_template_is_sandboxed_and_typed(tiny_model_dir, tmp_path):
    """Chat calibration data renders with the tokenizer's template only inside transformers' sandbox;
    a template reaching for Python internals is a typed error naming the file:line."""
    from transformers import AutoTokenizer

    from torchcompress.calibration import CalibrationConfig, build_calibration
    from torchcompress.calibration.sources import CalibrationDataError

    marker = tmp_path / "pwned"
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = _SSTI.replace("MARKER", str(marker))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there"}]}) + "\n")
    lm = load_model(tiny_model_dir)
    with pytest.raises(CalibrationDataError, match=r"chat.jsonl:1.*SecurityError"):
        build_calibration(CalibrationConfig(sources=(str(chat),), num_samples=1, seq_len=8), lm.model, tok)
    assert not marker.exists()


def test_gguf_metadata_strings_are_data(tmp_path):
    """Template-looking strings in GGUF metadata come back verbatim from our reader and from `info`;
    nothing renders them (a rendered '{{ 7*7 }}' would read 49)."""
    from torchcompress.formats.gguf_file import KV, TensorPlan, VType, write_gguf
    from torchcompress.formats.gguf_read import read_gguf
    from torchcompress.info import describe
    from torchcompress.primitives.gguf_common import GGMLType

    marker = tmp_path / "pwned"
    kvs = [KV("general.architecture", VType.STRING, "{{ 7*7 }}"),
           KV("tokenizer.chat_template", VType.STRING, _SSTI.replace("MARKER", str(marker))),
           KV("general.name", VType.STRING, "{% for x in range(10**9) %}x{% endfor %}")]
    p = tmp_path / "m.gguf"
    write_gguf(p, kvs, [TensorPlan("w", (2, 32), GGMLType.F32)], lambda t: torch.zeros(t.nbytes, dtype=torch.uint8))
    g = read_gguf(p)
    assert g.value("tokenizer.chat_template") == _SSTI.replace("MARKER", str(marker))
    text = describe(p)
    assert "{{ 7*7 }}" in text and "49" not in text
    assert not marker.exists()


def test_training_resume_state_is_not_unpickled(tiny_model_dir, tmp_path):
    """training.loop resumes from train_state.pt: loaded with weights_only=True, so a planted payload is a
    FormatError and never runs (it used weights_only=False: found by the source guard below)."""
    from transformers import AutoModelForCausalLM

    from torchcompress.training.loop import STATE_FILE, BatchSchedule, train

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _plant_pickle(ckpt / STATE_FILE, marker)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    data = BatchSchedule(torch.randint(0, 100, (4, 8)), batch_size=2)
    with pytest.raises(FormatError, match=STATE_FILE):
        train(model, data, checkpoint_dir=ckpt)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- the source


def test_package_source_has_no_unsafe_loaders():
    """A guard that keeps it so: no unpickling, eval/exec, unsafe YAML or remote code in the package."""
    root = Path(torchcompress.__file__).parent
    bad = re.compile(r"\btorch\.load\((?!.*weights_only=True)|\bpickle\.loads?\(|\bdill\.|(?<![\w.])eval\(|(?<![\w.])exec\(|yaml\.load\(|"
                     r"yaml\.unsafe_load|yaml\.full_load|trust_remote_code\s*=\s*True|weights_only\s*=\s*False|"
                     r"from_string\(|jinja2\.Template\(")
    hits = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in root.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert not hits, hits
