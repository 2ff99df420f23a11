"""PrunedLinear storage and sizes (issue 20 item 9): the mask costs nothing where the zeros already say it,
packed bits where a kept weight is exactly 0; old checkpoints with a bool mask still load; sparse bytes."""

import json

import torch
import torch.nn as nn

from torchcompress.eval.size import model_bytes, sparse_bytes
from torchcompress.formats.checkpoint import load_compressed, save_compressed
from torchcompress.nn.pruned_linear import PrunedLinear


def _pruned(n=16, k=64, seed=0, nm=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n).to(dtype)
    if nm:
        idx = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
        mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, idx, True).reshape(n, k)
    else:
        mask = torch.rand(n, k, generator=g) > 0.5
    return PrunedLinear.from_linear(lin, mask, nm=nm)


def _skeleton():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(64, 16))


def test_pruned_model_is_not_larger_than_dense(tmp_path):
    dense = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(64, 16))
    pruned = nn.Sequential(_pruned(seed=1), nn.ReLU(), _pruned(seed=2))
    assert model_bytes(pruned) == model_bytes(dense)  # the bool mask used to add K*N bytes per layer
    assert all(not k.endswith("mask") for k in pruned.state_dict())
    save_compressed(pruned, tmp_path / "p")
    back = load_compressed(tmp_path / "p", _skeleton())
    for a, b in ((pruned[0], back[0]), (pruned[2], back[2])):
        assert isinstance(b, PrunedLinear) and torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)


def test_kept_zero_weights_store_the_mask_as_bits(tmp_path):
    m = _pruned(seed=3)
    with torch.no_grad():
        m.weight[0, m.mask[0].nonzero()[0, 0]] = 0.0  # a kept weight that is exactly 0: the zeros do not tell
    sd = m.state_dict()
    assert sd["mask_bits"].dtype == torch.uint8 and sd["mask_bits"].shape == (16, 8)
    assert model_bytes(nn.Sequential(m)) == 16 * 64 * 4 + 16 * 4 + 16 * 8
    model = nn.Sequential(m, nn.ReLU(), _pruned(seed=4))
    save_compressed(model, tmp_path / "p")
    back = load_compressed(tmp_path / "p", _skeleton())
    assert torch.equal(back[0].mask, m.mask) and torch.equal(back[2].mask, model[2].mask)
    x = torch.randn(3, 64)
    torch.testing.assert_close(back[0](x), m(x), rtol=0, atol=0)


def test_old_checkpoint_with_a_bool_mask_loads(tmp_path):
    model = nn.Sequential(_pruned(seed=5), nn.ReLU(), _pruned(seed=6))
    for m in (model[0], model[2]):
        m.mask_storage = "bool"  # how checkpoints were written before: the bool buffer, no "mask" in the manifest
    save_compressed(model, tmp_path / "old")
    man = json.loads((tmp_path / "old" / "torchcompress.json").read_text())
    assert all("mask" not in e for e in man["modules"].values())
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "old" / "model.safetensors"))["0.mask"].dtype == torch.bool
    back = load_compressed(tmp_path / "old", _skeleton())
    assert torch.equal(back[0].mask, model[0].mask) and torch.equal(back[2].mask, model[2].mask)


def test_sparse_bytes_of_2_4_layers():
    m = _pruned(nm=(2, 4), dtype=torch.float16)
    # compressed-tensors sparse-24-bitmask: the kept values (N, K/2) + a bitmask (N, K/8)
    assert sparse_bytes(nn.Sequential(m)) == 16 * 32 * 2 + 16 * 8 + 16 * 2  # + the fp16 bias
    assert sparse_bytes(nn.Sequential(_pruned())) is None  # unstructured: no sparse format is written
