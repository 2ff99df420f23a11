"""Peak host memory per stage: in the report's StageRecords and on the stage spans, in memory and
streamed, and across a resume."""

import mmap
import time

import pytest
import torch
import torch.nn as nn

from torchcompress.progress import peak_rss_bytes, rss_bytes
from torchcompress.recipe import compress, parse_recipe
from torchcompress.recipe import registry
from torchcompress.telemetry import names as N
from torchcompress.telemetry.memory import PeakMemory

MIB = 2**20
BIG = 256 * MIB  # what a stage holds; the assertions leave 56 MiB for allocator and sampling slack


def _settled_rss() -> int:
    """The process's RSS after garbage from earlier tests is collected and returned to the OS: in a
    long pytest process, memory freed *during* a measured window (a collection, malloc trimming)
    otherwise pulled the window's RSS below base + BIG (measured: 15 MiB short after tests/runtime)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return rss_bytes()


def _hold(nbytes: int, seconds: float = 0.15) -> None:
    """Hold ``nbytes`` resident for ``seconds``, then give them back to the OS. An anonymous mmap,
    not a tensor: freeing a tensor leaves the return of its pages to the C allocator, and in CI's
    long pytest process (1.4 GB resident) the RSS stayed at the peak after ``del`` (both windows
    below read exactly the process peak), so what was tested was the allocator, not the meter."""
    buf = mmap.mmap(-1, nbytes)
    view = torch.frombuffer(buf, dtype=torch.uint8)
    view.fill_(1)  # written, so resident
    time.sleep(seconds)  # several sampling intervals (0.02 s)
    del view
    buf.close()  # munmap: the pages leave the RSS now


def test_meter_rules_on_a_simulated_process(monkeypatch):
    """The meter's rules with the process's counters under the test's control (no allocator, no
    timing luck): a window that raises the process peak reports it exactly even if no sample saw
    it; a window below it reports what the sampler saw; one meter keeps the max over its windows."""
    from torchcompress.telemetry import memory as memmod

    proc = {"rss": 100, "peak": 500}
    monkeypatch.setattr(memmod, "rss_bytes", lambda: proc["rss"])
    monkeypatch.setattr(memmod, "peak_rss_bytes", lambda: proc["peak"])

    def resident(v: int, seconds: float = 0.0) -> None:
        proc["rss"], proc["peak"] = v, max(proc["peak"], v)
        time.sleep(seconds)

    with PeakMemory(interval=60) as exact:  # the sampler never fires inside: only the exact path can see 900
        resident(900)
        resident(100)
    assert exact.peak_rss_bytes == 900
    with PeakMemory(interval=0.005) as low:  # below the process peak (900): what the sampler saw
        resident(300, 0.1)
        resident(100)
    assert low.peak_rss_bytes == 300
    with PeakMemory(interval=60) as missed:  # below the peak and shorter than the interval: not seen (documented)
        resident(400)
        resident(120)
    assert missed.peak_rss_bytes == 120  # the window's end sample
    acc = PeakMemory(interval=0.005)
    with acc:
        resident(250, 0.1)
        resident(100)
    with acc:
        pass
    assert acc.peak_rss_bytes == 250


def test_a_new_process_peak_is_exact_and_a_lower_one_is_sampled():
    base = _settled_rss()
    with PeakMemory() as m:  # 3x BIG above the current RSS raises the process's peak (ru_maxrss): the exact path
        _hold(3 * BIG + peak_rss_bytes() - base, 0.0)
    assert m.peak_rss_bytes == peak_rss_bytes()
    with PeakMemory() as low:  # below the process's peak now: only the sampler can see it
        _hold(BIG)
    assert base + BIG - 56 * MIB < low.peak_rss_bytes < peak_rss_bytes() - BIG
    with PeakMemory() as idle:  # a window that allocates nothing does not report the earlier peaks
        time.sleep(0.05)
    assert idle.peak_rss_bytes < low.peak_rss_bytes - BIG + 56 * MIB
    # one meter over several windows keeps the max of them (a streamed stage's blocks)
    acc = PeakMemory()
    with acc:
        _hold(BIG)
    with acc:
        pass
    assert acc.peak_rss_bytes > base + BIG - 56 * MIB and acc.as_dict() == {"peak_rss_bytes": acc.peak_rss_bytes}


RECIPE = """
name: two-stages
stages:
  - kind: rtn
    name: holds
    scheme: {bits: 8, granularity: channel, symmetric: true}
    targets: ['re:0|1']
  - kind: rtn
    name: light
    scheme: {bits: 4, group_size: 32, symmetric: true}
    targets: ['re:2']
"""


def test_in_memory_stages_carry_their_peaks_to_report_and_spans(otel, monkeypatch):
    from torchcompress.config import RTNConfig

    real = registry.RUNNERS[RTNConfig]

    def runner(model, stage, records, calib):
        if stage.name == "holds":
            _hold(BIG)
        real(model, stage, records, calib)

    monkeypatch.setitem(registry.RUNNERS, RTNConfig, runner)
    torch.manual_seed(0)
    base = _settled_rss()
    report = compress(nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64), nn.Linear(64, 32)), parse_recipe(RECIPE))
    holds, light = report.stages
    assert holds.peak_rss_bytes > base + BIG - 56 * MIB
    assert light.peak_rss_bytes < holds.peak_rss_bytes - BIG + 56 * MIB
    assert holds.peak_cuda_bytes is None  # a CPU model: no device figure
    d = report.to_dict()
    assert [s["peak_rss_bytes"] for s in d["stages"]] == [holds.peak_rss_bytes, light.peak_rss_bytes]
    spans = {s.attributes[N.STAGE]: s for s in otel.spans() if s.name == N.SPAN_STAGE}
    assert spans["holds"].attributes[N.MEM_HOST_PEAK] == holds.peak_rss_bytes
    assert spans["light"].attributes[N.MEM_HOST_PEAK] == light.peak_rss_bytes
    assert N.MEM_DEVICE_PEAK not in spans["holds"].attributes
    (run,) = [s for s in otel.spans() if s.name == N.SPAN_RUN]
    assert run.attributes[N.MEM_HOST_PEAK] >= holds.peak_rss_bytes


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), num_hidden_layers=3))
    d = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(d, max_shard_size="150KB")
    tok.save_pretrained(d)
    return d


def test_streamed_stage_peak_is_the_max_over_its_blocks(otel, monkeypatch, src, tmp_path):
    from torchcompress.recipe import stage_runners
    from torchcompress.recipe.schema import load_recipe
    from torchcompress.recipe.streaming import compress_checkpoint

    real = stage_runners.run_quantize
    seen = []

    def runner(view, stage, records, calib):
        seen.append(1)
        if len(seen) == 2:  # the second block only
            _hold(BIG)
        real(view, stage, records, calib)

    monkeypatch.setattr(stage_runners, "run_quantize", runner)
    base = _settled_rss()
    report = compress_checkpoint(src, load_recipe("w4-rtn"), tmp_path / "out")
    (st,) = report.stages
    assert len(seen) >= 3 and st.peak_rss_bytes > base + BIG - 56 * MIB
    (span,) = [s for s in otel.spans() if s.name == N.SPAN_STAGE]
    assert span.attributes[N.MEM_HOST_PEAK] == st.peak_rss_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_of_a_window():
    dev = torch.device("cuda")
    with PeakMemory(dev) as m:
        t = torch.ones(BIG // 4, device=dev)
        del t
    assert m.peak_cuda_bytes >= BIG
    with PeakMemory(dev) as idle:  # below the process's CUDA peak, nothing held: the sampled path
        torch.cuda.synchronize()
    assert idle.peak_cuda_bytes < BIG
