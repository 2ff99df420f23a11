"""Activations offloaded to disk between blocks: same GPTQ result, files gone afterwards."""

import copy

import pytest
import torch

from torchcompress.calibration import CalibrationConfig, build_calibration
from torchcompress.calibration.offload import ActivationStore, store_from
from torchcompress.calibration.runner import gptq_model
from torchcompress.config import GPTQConfig, QuantScheme
from torchcompress.errors import InputError


def test_store_in_memory_and_on_disk_behave_the_same(tmp_path):
    ts = [torch.randn(2, 3, 4), torch.randn(1, 5, 4, dtype=torch.bfloat16)]
    for d in (None, tmp_path):
        s = store_from(ts, d)
        assert s.on_disk == (d is not None) and len(s) == 2
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(s, ts))
        s[1] = torch.zeros(3)
        assert torch.equal(s[-1], torch.zeros(3))
        with pytest.raises(IndexError):
            s[2]
        s.close()
        assert len(s) == 0
    assert list(tmp_path.iterdir()) == []  # the per-run subdirectory is removed


def test_store_on_disk_holds_nothing_in_memory(tmp_path):
    s = store_from([torch.randn(4, 4)], tmp_path)
    assert s._mem is None and len(list(tmp_path.glob("activations-*/b0.safetensors"))) == 1


def test_unwritable_offload_dir_is_a_typed_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="offloaded activations"):
        ActivationStore(f / "sub")


def test_gptq_with_disk_offload_is_bit_identical(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config
    from torchcompress.pipeline import context

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok))).eval()
    calib = build_calibration(CalibrationConfig(sources=("pydoc",), num_samples=8, seq_len=32), model, tok)
    cfg = GPTQConfig(QuantScheme(bits=4, group_size=32, symmetric=False))
    stores = []
    real = context.ActivationStore

    def recording(directory=None):  # the store the block inputs are captured into
        stores.append(real(directory))
        return stores[-1]

    monkeypatch.setattr(context, "ActivationStore", recording)
    a = gptq_model(copy.deepcopy(model), cfg, calib, batch_size=2)
    b = gptq_model(copy.deepcopy(model), cfg, calib, batch_size=2, offload_dir=tmp_path / "act")
    assert [s.on_disk for s in stores] == [False, True]  # offloaded from the first capture on
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert list((tmp_path / "act").iterdir()) == []  # cleaned up
