"""Two processes (gloo) on the block pipeline: calibration samples split across ranks, statistics
summed across ranks, rank 0 writes. The output equals the one-process output."""

import pytest
import torch

from torchcompress.recipe.schema import load_recipe
from torchcompress.recipe.streaming import compress_checkpoint


def _rank(rank, world, rdv, src, calib, recipe, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        compress_checkpoint(src, load_recipe(recipe), out, calib=calib, batch_size=4)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny import calibrated_tiny_llama

    model, tok, calib = calibrated_tiny_llama(samples=8, seq_len=32)
    src = tmp_path_factory.mktemp("src") / "model"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    return src, calib


@pytest.mark.parametrize("recipe", ["w4-gptq-g128", "wanda-50", "sparsegpt-2of4"])
def test_two_processes_equal_one(tiny, tmp_path, recipe):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    src, calib = tiny
    compress_checkpoint(src, load_recipe(recipe), tmp_path / "one", calib=calib, batch_size=4)
    mp.spawn(_rank, args=(2, str(tmp_path / "rdv"), str(src), calib, recipe, str(tmp_path / "two")), nprocs=2, join=True)
    one = {p.name: load_file(str(p)) for p in (tmp_path / "one").glob("model*.safetensors")}
    two = {p.name: load_file(str(p)) for p in (tmp_path / "two").glob("model*.safetensors")}
    assert one.keys() == two.keys() and one
    for f in one:
        assert one[f].keys() == two[f].keys()
        for k in one[f]:
            # rank shards are whole batches of the one-process run: the same float32 batch terms are
            # summed in float64, so the result is exact, not merely close
            assert torch.equal(one[f][k], two[f][k]), (f, k)
    assert not (tmp_path / "two.partial").exists()
