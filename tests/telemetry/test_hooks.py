"""instrument()/uninstrument(): forward timing hooks, sampling, removal."""

import time

import pytest
import torch
import torch.nn as nn

from torchcompress.errors import ConfigError
from torchcompress.telemetry import instrument, names as N, uninstrument


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _hooks(m: nn.Module) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


def _points(otel) -> dict:
    ms = otel.metrics()
    if N.M_INFER[0] not in ms:
        return {}
    assert ms[N.M_INFER[0]].unit == "s"
    return {(p.attributes[N.SCOPE_KIND], p.attributes.get(N.MODULE)): p
            for p in ms[N.M_INFER[0]].data.data_points}


def test_every_forward_timed_at_ratio_1_and_hooks_removed(otel):
    m = _model()
    x = torch.randn(4, 16)
    want = m(x)
    h = instrument(m, modules=[nn.Linear], attributes={"run": "t"}, meter_provider=otel.meter_provider)
    assert _hooks(m) == 6  # pre + post on the model and on both Linears
    for _ in range(5):
        torch.testing.assert_close(m(x), want)  # timing changes nothing
    pts = _points(otel)
    assert set(pts) == {("model", None), ("module", "0"), ("module", "2")}
    for p in pts.values():
        assert p.count == 5 and p.sum > 0 and p.attributes["run"] == "t" and p.attributes[N.DEVICE] == "cpu"
    assert pts[("model", None)].attributes[N.MODULE_TYPE] == "Sequential"
    assert pts[("module", "0")].attributes[N.MODULE_TYPE] == "Linear"
    # the model's time includes its modules'
    assert pts[("model", None)].sum >= pts[("module", "0")].sum + pts[("module", "2")].sum
    assert h.count == 5 and h.mean_ms == pytest.approx(pts[("model", None)].sum / 5 * 1000)  # metric in s
    assert uninstrument(m) == 1 and _hooks(m) == 0 and not hasattr(m, "_torchcompress_instrumentation")
    m(x)
    assert _points(otel)[("model", None)].count == 5


def test_sampling_times_one_forward_in_n(otel):
    m = _model()
    h = instrument(m, modules=["0"], sample_ratio=0.25, meter_provider=otel.meter_provider)
    for _ in range(20):
        m(torch.randn(2, 16))
    pts = _points(otel)
    assert pts[("model", None)].count == 5 and pts[("module", "0")].count == 5  # the 1st, 5th, 9th...
    h.remove()
    assert _hooks(m) == 0


def test_below_ratio_1_module_hooks_exist_only_during_a_sampled_forward(otel):
    m = _model()
    seen = []

    class Probe(nn.Module):  # counts the hooks on the Linears while the model runs
        def forward(self, x):
            seen.append(_hooks(m[0]) + _hooks(m[3]))
            return x

    m.insert(1, Probe())
    h = instrument(m, modules=[nn.Linear], sample_ratio=0.5, meter_provider=otel.meter_provider)
    assert _hooks(m) == 2  # the model's own pre/post hooks only
    for _ in range(4):
        m(torch.randn(2, 16))
        assert _hooks(m) == 2
    assert seen == [4, 0, 4, 0]  # sampled, unsampled, sampled, unsampled
    pts = _points(otel)
    assert pts[("model", None)].count == 2 and pts[("module", "0")].count == 2 and pts[("module", "3")].count == 2
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 15))  # a sampled forward that raises still takes the module hooks off
    assert _hooks(m) == 2
    h.remove()
    assert _hooks(m) == 0


def test_modules_outside_a_sampled_forward_are_not_timed(otel):
    m = _model()
    instrument(m, modules=[nn.Linear], sample_ratio=0.5, meter_provider=otel.meter_provider)
    m[0](torch.randn(2, 16))  # a module called on its own
    m(torch.randn(2, 16))
    m(torch.randn(2, 16))
    pts = _points(otel)
    assert pts[("model", None)].count == 1 and pts[("module", "0")].count == 1
    uninstrument(m)


def test_an_exception_in_forward_leaves_hooks_consistent(otel):
    m = _model()
    instrument(m, modules=[nn.Linear], meter_provider=otel.meter_provider)
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 15))  # wrong width: the first Linear raises
    m(torch.randn(2, 16))
    pts = _points(otel)
    assert pts[("module", "0")].count == 1 and pts[("module", "2")].count == 1  # failed forwards: not timed
    assert pts[("model", None)].count == 1
    uninstrument(m)
    assert _hooks(m) == 0


def test_two_instrumentations_and_uninstrument_removes_both(otel):
    m = _model()
    instrument(m, meter_provider=otel.meter_provider)
    instrument(m, modules=["re:2"], meter_provider=otel.meter_provider)
    assert _hooks(m) == 6
    assert uninstrument(m) == 2 and _hooks(m) == 0


def test_off_hooks_nothing(monkeypatch):
    monkeypatch.setattr("torchcompress.telemetry.run._providers", lambda: (None, None))
    m = _model()
    h = instrument(m, modules=[nn.Linear])
    assert _hooks(m) == 0 and h.count == 0
    h.remove()


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, True, "0.1"])
def test_bad_sample_ratio(ratio):
    with pytest.raises(ConfigError, match="sample_ratio"):
        instrument(_model(), sample_ratio=ratio)


class _GpuSleep(nn.Module):
    """GPU work that takes long (a spin kernel) but returns to Python at once: a CPU clock around
    its forward would measure microseconds."""

    def __init__(self, cycles: int):
        super().__init__()
        self.cycles = cycles
        self.register_buffer("one", torch.ones(()))

    def forward(self, x):
        torch.cuda._sleep(self.cycles)
        return x + self.one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forwards_are_timed_on_the_gpu_without_synchronizing(otel):
    cycles = 50_000_000  # ~25-35 ms at the GPU's clock
    m = nn.Sequential(nn.Linear(64, 64), _GpuSleep(cycles)).cuda()
    x = torch.randn(8, 64, device="cuda")
    m(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    gpu_ms = start.elapsed_time(end)  # what the sleep takes on the GPU, measured apart

    h = instrument(m, modules=[_GpuSleep], meter_provider=otel.meter_provider)
    for _ in range(3):
        t0 = time.perf_counter()
        m(x)
        cpu_ms = (time.perf_counter() - t0) * 1e3
        # the forward came back long before the GPU finished: the hooks did not synchronize, and the
        # timings still wait as events (model + module per forward), read once they completed
        assert cpu_ms < gpu_ms / 2, (cpu_ms, gpu_ms)
    assert len(h._pending) >= 2
    h.remove()  # the one synchronize: reads every pending timing back
    assert not h._pending and _hooks(m) == 0
    pts = _points(otel)
    sleep, model = pts[("module", "1")], pts[("model", None)]
    assert sleep.count == 3 and model.count == 3 and h.count == 3
    assert sleep.attributes[N.DEVICE] == "cuda" and model.attributes[N.DEVICE] == "cuda"
    # GPU time, not the microseconds a CPU clock would have seen; the model's includes the module's
    assert sleep.sum / 3 * 1000 == pytest.approx(gpu_ms, rel=0.2)  # the metric is in s
    assert model.sum >= sleep.sum and h.mean_ms == pytest.approx(model.sum / 3 * 1000)
