"""The runner's spans (compress > stage > layer) and metrics, checked against its own Report."""

import pytest
import torch
import torch.nn as nn

from torchcompress.recipe import compress, parse_recipe
from torchcompress.recipe import registry
from torchcompress.recipe import runner as runner_mod
from torchcompress.telemetry import names as N

RECIPE = """
name: two-stages
stages:
  - kind: rtn
    name: w8-first
    scheme: {bits: 8, granularity: channel, symmetric: true}
    targets: ['re:0|1']
  - kind: rtn
    name: w4-rest
    scheme: {bits: 4, group_size: 32, symmetric: false, scale_dtype: float32}
    targets: ['re:2']
"""


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64), nn.Linear(64, 32)).eval()


def _by_name(spans):
    out = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def test_span_tree_and_attributes_match_the_report(otel):
    report = compress(_model(), parse_recipe(RECIPE))
    spans = _by_name(otel.spans())
    (run,) = spans[N.SPAN_RUN]
    stages = sorted(spans[N.SPAN_STAGE], key=lambda s: s.attributes[N.STAGE_INDEX])
    layers = spans[N.SPAN_LAYER]
    assert run.parent is None and [s.parent.span_id for s in stages] == [run.context.span_id] * 2
    assert run.attributes[N.RECIPE] == "two-stages" and run.attributes[N.STAGE_COUNT] == 2
    assert run.attributes[N.BYTES_BEFORE] == report.size_bytes_before
    assert run.attributes[N.BYTES_AFTER] == report.size_bytes_after
    assert run.attributes[N.RATIO] == pytest.approx(report.compression_ratio)

    s0, s1 = (dict(s.attributes) for s in stages)
    assert s0[N.STAGE] == "w8-first" and s0[N.TECHNIQUE] == "rtn" and s0["torchcompress.quant.bits"] == 8
    assert s0["torchcompress.quant.granularity"] == "channel" and s0["torchcompress.quant.symmetric"] is True
    assert s1["torchcompress.quant.bits"] == 4 and s1["torchcompress.quant.group_size"] == 32
    assert s1["torchcompress.quant.scale_dtype"] == "float32" and s1[N.MODULE_COUNT] == 1
    assert s0[N.MODULE_COUNT] == 2 and s0[N.BYTES_BEFORE] == sum(r.bytes_before for r in report.layers[:2])

    # one layer span per LayerRecord, under its stage, carrying the record's numbers
    assert len(layers) == len(report.layers) == 3
    stage_of = {s.context.span_id: s.attributes[N.STAGE] for s in stages}
    for span, rec in zip(sorted(layers, key=lambda s: s.start_time), report.layers):
        a = span.attributes
        assert stage_of[span.parent.span_id] == rec.stage == a[N.STAGE]
        assert a[N.MODULE] == rec.module and a[N.PARAMS] == rec.params
        assert (a[N.BYTES_BEFORE], a[N.BYTES_AFTER]) == (rec.bytes_before, rec.bytes_after)
        assert a[N.SQNR] == rec.sqnr_db and a[N.MSE] == rec.mse and a[N.BITS_PER_WEIGHT] == rec.bits_per_weight
        assert a[N.RATIO] == pytest.approx(rec.bytes_before / rec.bytes_after)
    # layer spans tile their stage: each starts where the previous ended
    for st in stages:
        mine = sorted((s for s in layers if s.parent.span_id == st.context.span_id), key=lambda s: s.start_time)
        assert mine[0].start_time >= st.start_time and mine[-1].end_time <= st.end_time
        for a, b in zip(mine, mine[1:]):
            assert b.start_time == a.end_time


def test_metrics_units_and_values(otel):
    report = compress(_model(), parse_recipe(RECIPE))
    ms = otel.metrics()
    for name, unit, _ in (N.M_RATIO, N.M_DURATION, N.M_STAGE_DURATION, N.M_SIZE, N.M_LAYER_SQNR, N.M_LAYER_MSE,
                          N.M_LAYER_RATIO):
        assert ms[name].unit == unit, name
    (p,) = ms[N.M_RATIO[0]].data.data_points
    assert p.value == pytest.approx(report.compression_ratio) and dict(p.attributes) == {N.RECIPE: "two-stages"}
    sizes = {p.attributes[N.MODEL_STATE]: p.value for p in ms[N.M_SIZE[0]].data.data_points}
    assert sizes == {"uncompressed": report.size_bytes_before, "compressed": report.size_bytes_after}
    (p,) = ms[N.M_DURATION[0]].data.data_points
    assert p.count == 1 and p.sum == pytest.approx(sum(s.seconds for s in report.stages), rel=0.5, abs=0.05)
    stage_pts = {p.attributes[N.STAGE]: p for p in ms[N.M_STAGE_DURATION[0]].data.data_points}
    assert set(stage_pts) == {"w8-first", "w4-rest"} and all(p.count == 1 for p in stage_pts.values())
    sqnr = {p.attributes[N.STAGE]: p for p in ms[N.M_LAYER_SQNR[0]].data.data_points}
    assert sqnr["w8-first"].count == 2 and sqnr["w4-rest"].count == 1
    assert sqnr["w8-first"].sum == pytest.approx(report.layers[0].sqnr_db + report.layers[1].sqnr_db)
    assert sqnr["w4-rest"].max == sqnr["w4-rest"].min == report.layers[2].sqnr_db
    assert sqnr["w8-first"].min > sqnr["w4-rest"].max + 15  # 8-bit vs 4-bit weights: ~6 dB per bit


def test_a_failing_stage_is_recorded_on_its_span(otel, monkeypatch):
    from torchcompress.config import RTNConfig

    real = registry.RUNNERS[RTNConfig]

    def boom(model, stage, records, calib):
        if stage.name == "w4-rest":
            raise RuntimeError("kernel exploded")
        real(model, stage, records, calib)

    monkeypatch.setitem(registry.RUNNERS, RTNConfig, boom)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        compress(_model(), parse_recipe(RECIPE))
    spans = _by_name(otel.spans())
    from opentelemetry.trace import StatusCode

    (run,) = spans[N.SPAN_RUN]
    bad = next(s for s in spans[N.SPAN_STAGE] if s.attributes[N.STAGE] == "w4-rest")
    good = next(s for s in spans[N.SPAN_STAGE] if s.attributes[N.STAGE] == "w8-first")
    assert bad.status.status_code == StatusCode.ERROR and run.status.status_code == StatusCode.ERROR
    assert good.status.status_code == StatusCode.UNSET
    ev = [e for e in bad.events if e.name == "exception"]
    assert ev and ev[0].attributes["exception.type"] == "RuntimeError"
    assert ev[0].attributes["exception.message"] == "kernel exploded"
    (p,) = otel.metrics()[N.M_DURATION[0]].data.data_points
    assert p.attributes["error.type"] == "RuntimeError"


def test_records_reach_the_report_with_telemetry_on_or_off(otel):
    on = compress(_model(), parse_recipe(RECIPE))
    from torchcompress.telemetry import run as run_mod

    assert run_mod.for_run(parse_recipe(RECIPE)) is not run_mod.OFF
    assert [type(r) for r in on.layers] == [runner_mod.LayerRecord] * 3 and type(on.layers) is list


def test_off_is_a_null_context(monkeypatch):
    from torchcompress.telemetry import run as run_mod

    monkeypatch.setattr(run_mod, "_providers", lambda: (None, None))
    assert run_mod.for_run(parse_recipe(RECIPE)) is run_mod.OFF
    report = compress(_model(), parse_recipe(RECIPE))
    assert len(report.layers) == 3


def test_run_span_names_the_calibration_data(otel):
    from torchcompress.calibration import CalibrationSet

    ids = torch.arange(24).reshape(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    calib = CalibrationSet(ids, mask, [{"source": "notes.txt", "description": "x", "samples": 2, "weight": 1.0}])
    compress(_model(), parse_recipe(RECIPE), calib)
    (run,) = _by_name(otel.spans())[N.SPAN_RUN]
    a = run.attributes
    assert tuple(a[N.CALIB_SOURCES]) == ("notes.txt",) and a[N.CALIB_SAMPLES] == 2 and a[N.CALIB_SEQ_LEN] == 12
    assert a[N.CALIB_TOKENS] == 20 and a[N.CALIB_SHA256] == calib.sha256()
