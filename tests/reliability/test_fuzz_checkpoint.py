"""Fuzz our checkpoint loader (JSON manifest + safetensors): lying shapes, dtypes, offsets, counts.

Invariant: ``load_compressed`` raises a :class:`~torchcompress.errors.InputError` subclass or returns a
model that runs; no other exception, no hang. Inputs are mutations of a real saved checkpoint.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchcompress as tc
from tests.formats.test_checkpoint import quantized_seq, skeleton, x_in
from tests.reliability._fuzz import fuzz, json_values, no_hang
from torchcompress.errors import InputError
from torchcompress.formats.checkpoint import MANIFEST_NAME, MODULE_KINDS, WEIGHTS_NAME

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tc.save_compressed(quantized_seq(), root / "good")
    data = (root / "good" / WEIGHTS_NAME).read_bytes()
    n = int.from_bytes(data[:8], "little")
    return _Base({"root": root, "manifest": json.loads((root / "good" / MANIFEST_NAME).read_text()),
            "header": json.loads(data[8 : 8 + n]), "body": data[8 + n :], "raw": data})


class _Base(dict):
    def __repr__(self):  # hypothesis prints fixtures in a falsifying example: keep it short
        return "<saved checkpoint>"


def _write(base, manifest=None, weights: bytes | None = None):
    d = base["root"] / "case"
    d.mkdir(exist_ok=True)
    (d / MANIFEST_NAME).write_text(json.dumps(base["manifest"] if manifest is None else manifest))
    (d / WEIGHTS_NAME).write_bytes(base["raw"] if weights is None else weights)
    return d


def _weights(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + body


def check_loads_or_typed_error(d):
    """The invariant: a typed error, or a model that computes."""
    with no_hang(20):
        try:
            model = tc.load_compressed(d, skeleton())
        except InputError:
            return None
        with torch.no_grad():
            y = model(x_in())
    assert y.shape == (5, 10)
    return model


def _paths(obj, prefix=()):
    """Every (container path) inside a JSON value, so a mutation can hit any depth."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    if not path:
        return value
    obj = copy.deepcopy(obj)
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return obj


@fuzz(50)
@given(data=st.data())
def test_fuzz_manifest(base, data):
    """Any node of the manifest replaced by any JSON value (huge ints, NaN, Infinity, wrong types)."""
    paths = list(_paths(base["manifest"]))
    path = data.draw(st.sampled_from(paths), label="path")
    value = data.draw(json_values(), label="value")
    check_loads_or_typed_error(_write(base, manifest=_set(base["manifest"], path, value)))


@fuzz(40)
@given(data=st.data())
def test_fuzz_manifest_module_entries(base, data):
    """A module entry with plausible but lying numbers: sizes, bits, group sizes, granularity, type."""
    m = copy.deepcopy(base["manifest"])
    name = data.draw(st.sampled_from(sorted(m["modules"]) + ["1", "", "9", "0.weight"]), label="module")
    entry = copy.deepcopy(m["modules"].get(name, m["modules"]["0"]))
    entry["in_features"] = data.draw(st.sampled_from([0, 1, 40, 48, 64, 2**31, 2**62]) | st.integers(-5, 200))
    entry["out_features"] = data.draw(st.sampled_from([0, 1, 10, 40, 64, 2**40]) | st.integers(-5, 200))
    entry["scheme"]["bits"] = data.draw(st.integers(0, 10))
    entry["scheme"]["group_size"] = data.draw(st.sampled_from([-1, 0, 1, 7, 32, 48, 2**62]))
    entry["scheme"]["granularity"] = data.draw(st.sampled_from(["group", "channel", "tensor", "row", ""]))
    entry["scheme"]["symmetric"] = data.draw(st.booleans())
    entry["type"] = data.draw(st.sampled_from(sorted(MODULE_KINDS) + ["Linear", "os.system"]))  # every kind, as they land
    if entry["type"] == "GGUFLinear":
        entry["qtype"] = data.draw(st.sampled_from(["Q4_0", "Q8_0", "Q6_K", "F32", "nope"]))
    m["modules"][name] = entry
    check_loads_or_typed_error(_write(base, manifest=m))


_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U64", "X9", ""]


@fuzz(80)
@given(data=st.data())
def test_fuzz_safetensors_header(base, data):
    """A tensor entry of the safetensors header with lying dtype, shape or data offsets."""
    header = copy.deepcopy(base["header"])
    keys = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        key = data.draw(st.sampled_from(keys), label="tensor")
        if not isinstance(header.get(key), dict):
            continue
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "rename", "drop", "any"]), label="field")
        dim = st.sampled_from([0, 1, 2, 24, 40, 64, 2**31, 2**62, 2**64 - 1]) | st.integers(-2, 100)
        if field == "dtype":
            header[key]["dtype"] = data.draw(st.sampled_from(_DTYPES))
        elif field == "shape":
            header[key]["shape"] = data.draw(st.lists(dim, max_size=5))
        elif field == "data_offsets":
            end = len(base["body"])
            off = st.sampled_from([0, 1, end - 1, end, end + 1, 2**63, 2**64 - 1]) | st.integers(0, end)
            header[key]["data_offsets"] = data.draw(st.lists(off, min_size=0, max_size=3))
        elif field == "rename":
            header[data.draw(st.text(max_size=12))] = header.pop(key)
        elif field == "drop":
            header.pop(key)
        else:
            header[key] = data.draw(json_values())
        if key not in header:
            keys = sorted(k for k in header if k != "__metadata__") or keys
            if not set(keys) & set(header):
                break
    check_loads_or_typed_error(_write(base, weights=_weights(header, base["body"])))


@fuzz(80)
@given(data=st.data())
def test_fuzz_safetensors_bytes(base, data):
    """Raw corruption: the header length field, bytes of the JSON header, truncation, appended junk."""
    raw = bytearray(base["raw"])
    n = int.from_bytes(raw[:8], "little")
    how = data.draw(st.sampled_from(["length", "flip", "truncate", "append"]), label="how")
    if how == "length":
        v = data.draw(st.sampled_from([0, 1, n - 1, n + 1, len(raw), 2**31, 2**63, 2**64 - 1]) | st.integers(0, 2 * n))
        raw[:8] = v.to_bytes(8, "little")
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 6))):
            i = data.draw(st.integers(0, 8 + n - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=64))
    check_loads_or_typed_error(_write(base, weights=bytes(raw)))


def test_unmutated_checkpoint_loads(base):
    """The fuzzers' starting point is valid (otherwise every case would be a trivial error)."""
    assert check_loads_or_typed_error(base["root"] / "good") is not None


@fuzz(30)
@given(data=st.data())
def test_fuzz_info_on_manifest(base, data):
    """`torchcompress info` reads the same manifest: a typed error or a description, nothing else."""
    from torchcompress.info import describe

    paths = list(_paths(base["manifest"]))
    m = _set(base["manifest"], data.draw(st.sampled_from(paths), label="path"), data.draw(json_values(), label="value"))
    d = _write(base, manifest=m)
    with no_hang(10):
        try:
            assert isinstance(describe(d), str)
        except InputError:
            pass
