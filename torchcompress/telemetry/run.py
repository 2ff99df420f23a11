"""Spans and metrics for a recipe run: run > stage > layer, fed by the runner's LayerRecords.

``for_run(recipe)`` returns :data:`OFF` (pure Python, imports nothing) unless an OpenTelemetry SDK
provider is installed (by :func:`torchcompress.telemetry.configure` or by the application).
A layer span covers the time from the previous module's record (or the stage start) to its own,
so it holds the work done for that module. Telemetry never raises into the job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import sys
import time

from . import names as N

log = logging.getLogger("torchcompress.telemetry")


def _providers():
    """(tracer provider, meter provider), each None when it is OpenTelemetry's no-op default."""
    if "opentelemetry" not in sys.modules:  # nobody imported it: nothing can be configured
        return None, None
    from opentelemetry import metrics, trace

    tp, mp = trace.get_tracer_provider(), metrics.get_meter_provider()
    noop = ("ProxyTracerProvider", "NoOpTracerProvider", "ProxyMeterProvider", "NoOpMeterProvider")
    return (None if type(tp).__name__ in noop else tp), (None if type(mp).__name__ in noop else mp)


def enabled() -> bool:
    """Whether an OpenTelemetry SDK tracer or meter provider is installed (no import when not)."""
    tp, mp = _providers()
    return tp is not None or mp is not None


def _tracer(tp):
    from opentelemetry import trace

    from .. import __version__

    return (tp or trace.NoOpTracerProvider()).get_tracer(N.SCOPE, __version__)


class Instruments:
    """The metric instruments on one meter (an OpenTelemetry no-op meter when metrics are off)."""

    def __init__(self, mp):
        from opentelemetry import metrics

        from .. import __version__

        m = (mp or metrics.NoOpMeterProvider()).get_meter(N.SCOPE, __version__)
        hist = lambda spec, buckets=None: m.create_histogram(  # noqa: E731
            spec[0], unit=spec[1], description=spec[2], explicit_bucket_boundaries_advisory=buckets)
        gauge = lambda spec: m.create_gauge(spec[0], unit=spec[1], description=spec[2])  # noqa: E731
        self.ratio, self.size, self.ppl, self.ppl_increase = gauge(N.M_RATIO), gauge(N.M_SIZE), gauge(N.M_PPL), gauge(N.M_PPL_INCREASE)
        self.accuracy, self.accuracy_drop = gauge(N.M_ACCURACY), gauge(N.M_ACCURACY_DROP)
        self.top1, self.kl, self.speedup = gauge(N.M_TOP1), gauge(N.M_KL), gauge(N.M_SPEEDUP)
        self.duration = hist(N.M_DURATION, N.SECONDS_BUCKETS)
        self.stage_duration = hist(N.M_STAGE_DURATION, N.SECONDS_BUCKETS)
        self.layer_sqnr = hist(N.M_LAYER_SQNR, (0, 5, 10, 15, 20, 25, 30, 35, 40, 50, 60))
        self.layer_mse = hist(N.M_LAYER_MSE, (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1))
        self.layer_ratio = hist(N.M_LAYER_RATIO, (1, 1.5, 2, 3, 4, 5, 6, 8, 10, 16, 32))
        self.infer = hist(N.M_INFER, N.INFER_BUCKETS)


def _scalar(v):
    if isinstance(v, enum.Enum):
        v = v.value
    return v if isinstance(v, (bool, int, float, str)) else None


def stage_attributes(recipe: str, index: int, stage) -> dict:
    """Technique, stage name and the config's settings: ``torchcompress.quant.*`` for the scheme
    (bits, group_size, granularity, symmetric, scale_dtype), ``torchcompress.<kind>.<field>`` for
    the rest (e.g. ``torchcompress.gptq.damp``, ``torchcompress.gguf.qtype``, ``torchcompress.prune.sparsity``)."""
    attrs = {N.RECIPE: recipe, N.STAGE: stage.name, N.TECHNIQUE: stage.kind, N.STAGE_INDEX: index}
    cfg = stage.config
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if dataclasses.is_dataclass(v):  # the QuantScheme
                prefix = N.QUANT if f.name == "scheme" else f"torchcompress.{stage.kind}.{f.name}"
                for g in dataclasses.fields(v):
                    s = _scalar(getattr(v, g.name))
                    if s is not None:
                        attrs[f"{prefix}.{g.name}"] = s
            elif (s := _scalar(v)) is not None:
                attrs[f"torchcompress.{stage.kind}.{f.name}"] = s
    return attrs


def calibration_attributes(calib) -> dict:
    """Which calibration data the run used (a CalibrationSet's describe()), or nothing."""
    if calib is None or not hasattr(calib, "describe"):
        return {}
    d = calib.describe()
    return {N.CALIB_SOURCES: [str(s["source"]) for s in d["sources"]], N.CALIB_SAMPLES: d["samples"],
            N.CALIB_SEQ_LEN: d["seq_len"], N.CALIB_TOKENS: d["tokens"], N.CALIB_SHA256: d["sha256"]}


def layer_attributes(rec) -> dict:
    attrs = {N.MODULE: rec.module, N.STAGE: rec.stage, N.TECHNIQUE: rec.kind, N.PARAMS: rec.params,
             N.BYTES_BEFORE: rec.bytes_before, N.BYTES_AFTER: rec.bytes_after,
             N.RATIO: rec.bytes_before / max(rec.bytes_after, 1)}
    for key, value in ((N.SQNR, rec.sqnr_db), (N.MSE, rec.mse), (N.BITS_PER_WEIGHT, rec.bits_per_weight),
                       (N.GPTQ_LOSS, getattr(rec, "gptq_loss", None))):
        if value is not None:
            attrs[key] = float(value)
    return attrs


def memory_attributes(mem: dict) -> dict:
    """Span attributes of a ``{"peak_rss_bytes", "peak_cuda_bytes"}`` dict (bytes)."""
    out = {}
    if mem.get("peak_rss_bytes") is not None:
        out[N.MEM_HOST_PEAK] = int(mem["peak_rss_bytes"])
    if mem.get("peak_cuda_bytes") is not None:
        out[N.MEM_DEVICE_PEAK] = int(mem["peak_cuda_bytes"])
    return out


def _guard(what: str):
    """Decorator: telemetry bookkeeping that fails logs at DEBUG and lets the job go on."""
    def wrap(fn):
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:
                log.debug("telemetry: %s failed: %s: %s", what, type(e).__name__, e)
        return run
    return wrap


class _Records(list):
    """The stage's record list: every appended LayerRecord also becomes a layer span and metrics."""

    def __init__(self, tel: "RunTelemetry", stage_attrs: dict):
        super().__init__()
        self.tel, self.attrs, self.last = tel, stage_attrs, time.time_ns()

    def append(self, rec) -> None:
        super().append(rec)
        self.tel._layer(rec, self)

    def extend(self, recs) -> None:
        for r in recs:
            self.append(r)


class _Off:
    """Telemetry off: context managers that do nothing (no OpenTelemetry import)."""

    def run(self, report, calib=None):
        return contextlib.nullcontext()

    def stage(self, index, stage, records, memory=None):
        return contextlib.nullcontext(records)


OFF = _Off()


class RunTelemetry:
    def __init__(self, recipe, tracer_provider=None, meter_provider=None):
        self.recipe = recipe
        self.tracer = _tracer(tracer_provider)
        self.m = Instruments(meter_provider)

    @contextlib.contextmanager
    def run(self, report, calib=None):
        attrs = {N.RECIPE: self.recipe.name, N.STAGE_COUNT: len(self.recipe.stages), **calibration_attributes(calib)}
        t0, err = time.perf_counter(), None
        with self.tracer.start_as_current_span(N.SPAN_RUN, attributes=attrs) as span:
            try:
                yield span
            except BaseException as e:
                err = type(e).__qualname__
                raise
            finally:
                self._run_done(span, report, attrs, time.perf_counter() - t0, err)

    @_guard("run metrics")
    def _run_done(self, span, report, attrs, seconds, err):
        if err is None:
            ratio = report.compression_ratio
            span.set_attributes({N.BYTES_BEFORE: report.size_bytes_before, N.BYTES_AFTER: report.size_bytes_after,
                                 N.RATIO: ratio, N.MODULE_COUNT: len(report.layers)})
            from ..progress import peak_rss_bytes

            span.set_attributes({N.MEM_HOST_PEAK: peak_rss_bytes()})  # the process's peak: the run's, for a CLI run
            base = {N.RECIPE: attrs[N.RECIPE]}
            self.m.ratio.set(ratio, base)
            self.m.size.set(report.size_bytes_before, {**base, N.MODEL_STATE: "uncompressed"})
            self.m.size.set(report.size_bytes_after, {**base, N.MODEL_STATE: "compressed"})
        self.m.duration.record(seconds, {N.RECIPE: attrs[N.RECIPE], **({"error.type": err} if err else {})})

    @contextlib.contextmanager
    def stage(self, index, stage, records, memory=None):
        """``memory``: a :class:`~.memory.PeakMemory` (or anything with ``as_dict()``) read when the
        stage ends: its peaks go on the stage span."""
        attrs = stage_attributes(self.recipe.name, index, stage)
        obs = _Records(self, attrs)
        t0, err = time.perf_counter(), None
        with self.tracer.start_as_current_span(N.SPAN_STAGE, attributes=attrs) as span:
            obs.last = time.time_ns()
            try:
                yield obs
            except BaseException as e:
                err = type(e).__qualname__
                raise
            finally:
                list.extend(records, obs)
                self._stage_done(span, obs, attrs, time.perf_counter() - t0, err, memory)

    @_guard("stage metrics")
    def _stage_done(self, span, obs, attrs, seconds, err, memory=None):
        before, after = sum(r.bytes_before for r in obs), sum(r.bytes_after for r in obs)
        span.set_attributes({N.MODULE_COUNT: len(obs), N.BYTES_BEFORE: before, N.BYTES_AFTER: after,
                             N.RATIO: before / max(after, 1)})
        if memory is not None:
            span.set_attributes(memory_attributes(memory.as_dict()))
        keys = (N.RECIPE, N.STAGE, N.TECHNIQUE)
        self.m.stage_duration.record(seconds, {**{k: attrs[k] for k in keys}, **({"error.type": err} if err else {})})

    @_guard("layer span")
    def _layer(self, rec, obs: _Records) -> None:
        now = time.time_ns()
        attrs = layer_attributes(rec)
        span = self.tracer.start_span(N.SPAN_LAYER, start_time=obs.last, attributes=attrs)
        span.end(end_time=now)
        obs.last = now
        metric_attrs = {k: obs.attrs[k] for k in (N.RECIPE, N.STAGE, N.TECHNIQUE)}
        if rec.sqnr_db is not None and rec.sqnr_db == rec.sqnr_db and abs(rec.sqnr_db) != float("inf"):
            self.m.layer_sqnr.record(float(rec.sqnr_db), metric_attrs)
        if rec.mse is not None:
            self.m.layer_mse.record(float(rec.mse), metric_attrs)
        self.m.layer_ratio.record(attrs[N.RATIO], metric_attrs)


def for_run(recipe):
    """The run's telemetry: :data:`OFF` unless an OpenTelemetry SDK provider is installed."""
    tp, mp = _providers()
    if tp is None and mp is None:
        return OFF
    try:
        return RunTelemetry(recipe, tp, mp)
    except Exception as e:  # telemetry must never stop a run
        log.debug("telemetry: off for this run: %s: %s", type(e).__name__, e)
        return OFF
