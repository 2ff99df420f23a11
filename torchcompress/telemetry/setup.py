"""Set up the OpenTelemetry SDK (providers, batching, OTLP or console exporters) and shut it down, bounded.

Imported only when telemetry is configured: it imports the SDK and the exporters.

Never hurts the job: every export has a short deadline (retries included), spans wait in a bounded
queue (new ones are dropped when it is full), export runs on the SDK's daemon threads, and
:func:`shutdown` waits at most ``shutdown_timeout`` seconds however dead the collector is. What
did not reach the collector is counted; the first failure is logged once and the totals once at
shutdown. The exporters' own per-attempt log lines are held back (kept at DEBUG on our logger).
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time

from .config import SignalConfig, TelemetryConfig

log = logging.getLogger("torchcompress.telemetry")

# Loggers of the SDK and exporters that log on every failed attempt; we count and report instead.
_NOISY = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._common._http",
    "opentelemetry.exporter.otlp.proto.http",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.metrics._internal.export",
    "opentelemetry.sdk.trace.export",
)


class Drops:
    """What did not reach the collector: counts, the first reason, and whether we said so."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spans_ended = 0
        self.spans_exported = 0
        self.metric_points_failed = 0
        self.failed_exports = 0
        self.first_reason: str | None = None
        self._warned = False
        self.last_ok: bool | None = None  # outcome of the latest finished export (None: none finished yet)
        self._inflight: dict[int, float] = {}  # export id -> monotonic start, while it waits on the collector
        self._next = 0

    def begin(self) -> int:
        """An export starts now; returns its id for :meth:`end`."""
        with self.lock:
            self._next += 1
            self._inflight[self._next] = time.monotonic()
            return self._next

    def end(self, token: int, ok: bool) -> None:
        with self.lock:
            self._inflight.pop(token, None)
            self.last_ok = ok

    def unresponsive(self, patience: float) -> bool:
        """True when the collector is known not to answer: the latest finished export failed, or an
        export has waited longer than ``patience`` seconds without an answer (a black hole)."""
        with self.lock:
            now = time.monotonic()
            stuck = any(now - t0 > patience for t0 in self._inflight.values())
            return stuck or self.last_ok is False

    def failure(self, what: str, n: int, where: str, reason: str | None) -> None:
        with self.lock:
            self.failed_exports += 1
            if what == "metrics":
                self.metric_points_failed += n
            reason = reason or self.first_reason or "no answer"
            warn, self._warned = not self._warned, True
        if warn:
            log.warning("telemetry: could not export %s to %s (%s); the job goes on, undelivered telemetry "
                        "is counted and reported at exit (logged once)", what, where, reason)

    def summary(self) -> str | None:
        with self.lock:
            spans = max(0, self.spans_ended - self.spans_exported)
            if not spans and not self.metric_points_failed and not self.failed_exports:
                return None
            return (f"telemetry: {spans} of {self.spans_ended} spans and {self.metric_points_failed} metric data "
                    f"points not delivered ({self.failed_exports} failed exports)")


class _Quiet(logging.Filter):
    """Keeps the exporters' per-attempt messages off the console; remembers the first as the reason."""

    def __init__(self, drops: Drops, reasons: bool):
        super().__init__()
        self.drops, self.reasons = drops, reasons  # reasons: an exporter's logger (its messages say why)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.reasons and record.levelno >= logging.WARNING and self.drops.first_reason is None:
            try:
                msg = record.getMessage().splitlines()[0]
                for marker in ("Error details: ", "error details: "):  # grpc: keep the cause, not the retry plan
                    if marker in msg:
                        msg = msg.split(marker, 1)[1]
                self.drops.first_reason = msg[:300]
            except Exception:  # a malformed record must not break anything
                pass
        log.debug("otel: %s", record.getMessage() if record.args is not None else record.msg)
        return False


def _span_exporter(sig: SignalConfig, timeout: float):
    if sig.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)
    headers = dict(sig.headers) or None
    if sig.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=sig.endpoint, headers=headers, timeout=timeout)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=sig.endpoint, headers=headers, timeout=timeout)


def _metric_exporter(sig: SignalConfig, timeout: float):
    if sig.exporter == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter(out=sys.stderr)
    headers = dict(sig.headers) or None
    if sig.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(endpoint=sig.endpoint, headers=headers, timeout=timeout)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(endpoint=sig.endpoint, headers=headers, timeout=timeout)


def _counting_span_exporter(inner, drops: Drops, where: str):
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class CountingSpanExporter(SpanExporter):
        def export(self, spans):
            token = drops.begin()
            try:
                res = inner.export(spans)
            except Exception as e:  # an exporter bug must not reach the job
                res, reason = SpanExportResult.FAILURE, f"{type(e).__name__}: {e}"
            else:
                reason = None
            drops.end(token, res == SpanExportResult.SUCCESS)
            if res == SpanExportResult.SUCCESS:
                with drops.lock:
                    drops.spans_exported += len(spans)
            else:
                drops.failure("spans", len(spans), where, reason)
            return res

        def shutdown(self):
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return inner.force_flush(timeout_millis)

    return CountingSpanExporter()


def _counting_metric_exporter(inner, drops: Drops, where: str):
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    class CountingMetricExporter(MetricExporter):
        def __init__(self):
            super().__init__(preferred_temporality=inner._preferred_temporality,
                             preferred_aggregation=inner._preferred_aggregation)

        def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
            token = drops.begin()
            try:
                res = inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
            except Exception as e:
                res, reason = MetricExportResult.FAILURE, f"{type(e).__name__}: {e}"
            else:
                reason = None
            drops.end(token, res == MetricExportResult.SUCCESS)
            if res != MetricExportResult.SUCCESS:
                drops.failure("metrics", _points(metrics_data), where, reason)
            return res

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return inner.force_flush(timeout_millis)

        def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
            inner.shutdown(timeout_millis=timeout_millis)

    return CountingMetricExporter()


def _points(metrics_data) -> int:
    try:
        return sum(len(m.data.data_points) for rm in metrics_data.resource_metrics
                   for sm in rm.scope_metrics for m in sm.metrics)
    except Exception:
        return 0


def _counting_processor(inner, drops: Drops):
    from opentelemetry.sdk.trace import SpanProcessor

    class CountingProcessor(SpanProcessor):
        def on_start(self, span, parent_context=None):
            inner.on_start(span, parent_context=parent_context)

        def on_end(self, span):
            with drops.lock:
                drops.spans_ended += 1
            inner.on_end(span)

        def shutdown(self):
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return inner.force_flush(timeout_millis)

    return CountingProcessor()


class _State:
    """The providers :func:`configure` installed (OpenTelemetry's own globals point at them too)."""

    def __init__(self, config, tracer_provider, meter_provider, drops, filters):
        self.config, self.tracer_provider, self.meter_provider = config, tracer_provider, meter_provider
        self.drops, self.filters = drops, filters


# The one process-level handle, mirroring OpenTelemetry's own global providers: what to shut down.
_STATE: list[_State] = []


def configure(config: TelemetryConfig) -> bool:
    """Install SDK tracer/meter providers for ``config`` as OpenTelemetry's globals. True when on."""
    if _STATE or not config.enabled:
        return bool(_STATE)
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": config.service_name})
    drops = Drops()
    filters = []
    for name in _NOISY:
        f = _Quiet(drops, reasons=".exporter." in name)
        logging.getLogger(name).addFilter(f)
        filters.append((name, f))
    tp = mp = None
    tsig, msig = config.traces, config.metrics
    if tsig is not None and tsig.exporter != "none":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = _counting_span_exporter(_span_exporter(tsig, config.timeout), drops, tsig.endpoint or tsig.exporter)
        if tsig.exporter == "otlp":
            _probe(exporter)
        batch = BatchSpanProcessor(exporter, max_queue_size=config.max_queue_size, schedule_delay_millis=1000,
                                   max_export_batch_size=min(512, config.max_queue_size),
                                   export_timeout_millis=config.timeout * 1000)
        tp = TracerProvider(resource=resource, shutdown_on_exit=False)
        tp.add_span_processor(_counting_processor(batch, drops))
        trace.set_tracer_provider(tp)
    if msig is not None and msig.exporter != "none":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        exporter = _counting_metric_exporter(_metric_exporter(msig, config.timeout), drops,
                                             msig.endpoint or msig.exporter)
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=config.export_interval * 1000,
                                               export_timeout_millis=config.timeout * 1000)
        mp = MeterProvider(resource=resource, metric_readers=[reader], shutdown_on_exit=False)
        metrics.set_meter_provider(mp)
    _STATE.append(_State(config, tp, mp, drops, filters))
    atexit.register(shutdown)
    log.info("telemetry: traces -> %s, metrics -> %s", _where(tsig), _where(msig))
    return True


def _probe(exporter) -> None:
    """Export an empty batch now, in the background, so the collector's health is known early.

    A job's spans mostly end at its end, so without this a short job's first export would be the
    final flush, and a collector that never answers would hold up the exit for the whole export
    deadline. The probe's outcome feeds :meth:`Drops.unresponsive` (a refused or hung collector
    then gets the short final flush); a live collector receives one empty request."""
    threading.Thread(target=exporter.export, args=([],), daemon=True, name="torchcompress-telemetry-probe").start()


def _where(sig: SignalConfig | None) -> str:
    if sig is None or sig.exporter == "none":
        return "off"
    return sig.exporter if sig.exporter != "otlp" else f"otlp {sig.protocol} {sig.endpoint}"


def is_configured() -> bool:
    return bool(_STATE)


def flush(timeout: float = 2.0) -> bool:
    """Export what is buffered now, waiting at most ``timeout`` seconds. True when it finished in time."""
    if not _STATE:
        return True
    st = _STATE[0]
    return _bounded([p.force_flush for p in (st.tracer_provider, st.meter_provider) if p is not None], timeout)


# At exit, a collector known not to answer (its latest export failed, or one has waited longer than
# UNRESPONSIVE_AFTER seconds) gets only DEAD_COLLECTOR_GRACE seconds for the final flush instead of the
# full shutdown deadline: a last attempt that a collector which came back can still take (a refused
# connection fails in milliseconds), without holding up the exit of every job beside a dead one.
UNRESPONSIVE_AFTER = 1.0
DEAD_COLLECTOR_GRACE = 0.2


def shutdown(timeout: float | None = None) -> None:
    """Flush and stop the exporters, waiting at most ``timeout`` seconds (default: the config's
    ``shutdown_timeout``; at most ``DEAD_COLLECTOR_GRACE`` when the collector is known not to
    answer); then report undelivered telemetry once. Safe to call twice."""
    if not _STATE:
        return
    st = _STATE.pop()
    timeout = st.config.shutdown_timeout if timeout is None else timeout
    if st.drops.unresponsive(UNRESPONSIVE_AFTER):
        timeout = min(timeout, DEAD_COLLECTOR_GRACE)
        log.debug("telemetry: the collector is not answering; giving the final flush %.1fs", timeout)
    calls = []
    if st.tracer_provider is not None:
        calls.append(st.tracer_provider.shutdown)
    if st.meter_provider is not None:
        calls.append(lambda: st.meter_provider.shutdown(timeout_millis=timeout * 1000))
    finished = _bounded(calls, timeout)
    if not finished:
        log.debug("telemetry: shutdown took longer than %.1fs; leaving the exporters behind", timeout)
        # an export still waiting on the collector has not failed yet: say so once, as a failure would
        st.drops.failure("telemetry", 0, _where(st.config.traces if st.tracer_provider is not None
                                                 else st.config.metrics), f"no answer; gave up at exit after {timeout:g}s")
    msg = st.drops.summary()
    if msg:
        log.warning(msg + ("" if finished else "; the final flush was abandoned"))
    if finished:  # an exporter left behind still logs its failure later: keep it quiet
        for name, f in st.filters:
            logging.getLogger(name).removeFilter(f)


def _bounded(calls, timeout: float) -> bool:
    """Run ``calls`` on daemon threads in parallel; wait for them at most ``timeout`` seconds in all."""
    errors = []

    def guard(fn):
        try:
            fn()
        except Exception as e:  # never let telemetry raise into the job
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(fn,), daemon=True, name="torchcompress-telemetry") for fn in calls]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    for e in errors:
        log.debug("telemetry: %s: %s", type(e).__name__, e)
    return not any(t.is_alive() for t in threads)
