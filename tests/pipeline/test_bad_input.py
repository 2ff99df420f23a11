"""Bad checkpoints and flags on the block pipeline: one line naming the file or flag, exit 2, no output left."""

import json

import pytest
import torch

from torchcompress.cli import main


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok)))
    d = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(d, max_shard_size="150KB")
    tok.save_pretrained(d)
    return d


def _copy(src, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(src, d)
    return d


def _run(capsys, model, tmp_path, *extra, recipe="w4-rtn"):
    out = tmp_path / "out"
    rc = main(["compress", "--model", str(model), "--recipe", recipe, "--out", str(out), "--stream", "on", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert not out.exists() and not (tmp_path / "out.partial").exists()  # nothing left behind
    return rc, err[-1] if err else ""


def _shards(d):
    return sorted(d.glob("model-*.safetensors"))


def test_missing_shard(src, tmp_path, capsys):
    d = _copy(src, tmp_path)
    gone = _shards(d)[1]
    gone.unlink()
    rc, err = _run(capsys, d, tmp_path)
    assert rc == 2 and "missing shard" in err and gone.name in err


def test_truncated_shard(src, tmp_path, capsys):
    d = _copy(src, tmp_path)
    shard = _shards(d)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    rc, err = _run(capsys, d, tmp_path)
    assert rc == 2 and "truncated" in err and shard.name in err


def test_index_names_a_tensor_the_shard_lacks(src, tmp_path, capsys):
    d = _copy(src, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = _shards(d)[0].name
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = first
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, err = _run(capsys, d, tmp_path)
    assert rc == 2 and "model.layers.0.mlp.extra.weight" in err and first in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(src, tmp_path, capsys):
    rc, err = _run(capsys, src, tmp_path, "--device", "cuda")
    assert rc == 2 and "--device cuda" in err and "CUDA is not available" in err


def test_dtype_the_checkpoint_cannot_take(src, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d = _copy(src, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.up_proj.weight"  # a later block: the failure comes after block 0 was written
    shard = d / index["weight_map"][key]
    sd = load_file(str(shard))
    sd[key] = sd[key] * 1e6  # beyond float16's 65504
    save_file(sd, str(shard), metadata={"format": "pt"})
    rc, err = _run(capsys, d, tmp_path, "--dtype", "float16")
    assert rc == 2 and "--dtype float16" in err and key in err


def test_architecture_without_known_blocks(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tiny import make_tokenizer

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    rc, err = _run(capsys, d, tmp_path)
    assert rc == 2 and "'gpt2'" in err and "no known decoder blocks" in err
