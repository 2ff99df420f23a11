"""The mmap-free safetensors reader/writer, shard merging, and the chunked NaN check."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from torchcompress.errors import FormatError
from torchcompress.formats.checkpoint import all_finite
from torchcompress.pipeline.shards import INDEX_NAME, merge_shards, read_header, write_safetensors


def test_writer_output_is_what_safetensors_reads(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int32), "c": torch.randn(4).to(torch.bfloat16),
          "e": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "x.safetensors", ts)
    got = load_file(str(tmp_path / "x.safetensors"))
    assert got.keys() == ts.keys() and all(torch.equal(got[k], ts[k]) for k in ts)


def test_header_checked_against_the_file_size(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(p))
    assert read_header(p)["w"].shape == (64, 64)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(FormatError, match="truncated: tensor 'w'"):
        read_header(p)
    p.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(FormatError, match="header"):
        read_header(p)


def test_merge_shards_equals_the_tensors(tmp_path):
    parts = [{"x.0": torch.randn(5, 3)}, {"x.1": torch.randn(2), "y": torch.arange(4)}]
    wm = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(part, str(tmp_path / name))
        wm.update({k: name for k in part})
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": wm}))
    out = merge_shards(tmp_path)
    got = load_file(str(out))
    want = {k: v for part in parts for k, v in part.items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_all_finite_finds_a_nan_in_any_chunk(dtype):
    t = torch.zeros(1000).to(dtype)
    assert all_finite(t, chunk=64)
    bad = torch.zeros(1000)
    bad[999] = float("nan")  # in the last, partial chunk
    assert not all_finite(bad.to(dtype), chunk=64)
    assert all_finite(torch.arange(10))  # integer tensors hold no NaN
