"""In-memory OpenTelemetry SDK providers, handed to the code under test (the process-wide globals
stay untouched, so other tests never see telemetry)."""

import pytest


class Otel:
    def __init__(self):
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.spans_exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans_exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self):
        return list(self.spans_exporter.get_finished_spans())

    def metrics(self) -> dict:
        """name -> Metric (with .unit and .data.data_points)"""
        data = self.reader.get_metrics_data()
        if data is None:
            return {}
        return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


@pytest.fixture
def otel(monkeypatch):
    o = Otel()
    # what the runner and the eval helpers see as "the installed providers"
    monkeypatch.setattr("torchcompress.telemetry.run._providers", lambda: (o.tracer_provider, o.meter_provider))
    monkeypatch.setattr("torchcompress.telemetry.record._providers", lambda: (o.tracer_provider, o.meter_provider))
    yield o
    o.tracer_provider.shutdown()
    o.meter_provider.shutdown()
