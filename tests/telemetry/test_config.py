"""OTEL_* environment variables -> TelemetryConfig (pure: no OpenTelemetry import, no side effects)."""

import logging

import pytest

from torchcompress.errors import ConfigError
from torchcompress.telemetry import SignalConfig, TelemetryConfig, configure_from_env


def test_nothing_configured_is_off():
    assert TelemetryConfig.from_env({}) is None
    assert TelemetryConfig.from_env({"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) is None
    assert TelemetryConfig.from_env({"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}) is None


def test_sdk_disabled_wins():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "console"}
    assert TelemetryConfig.from_env(env) is not None
    assert TelemetryConfig.from_env({**env, "OTEL_SDK_DISABLED": "TRUE"}) is None
    assert TelemetryConfig.from_env({**env, "OTEL_SDK_DISABLED": "false"}) is not None


def test_http_base_endpoint_gets_signal_paths_and_headers_are_decoded():
    c = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c.example:4318/",
                                  "OTEL_EXPORTER_OTLP_HEADERS": "X-Api-Key=a%3Db, tenant = t1",
                                  "OTEL_SERVICE_NAME": "job-7"})
    assert c.traces == SignalConfig("otlp", "https://c.example:4318/v1/traces", "http/protobuf",
                                    (("x-api-key", "a=b"), ("tenant", "t1")))
    assert c.metrics.endpoint == "https://c.example:4318/v1/metrics"
    assert c.service_name == "job-7" and c.enabled


def test_per_signal_variables_override():
    c = TelemetryConfig.from_env({
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:4318/custom", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "a=1", "OTEL_METRIC_EXPORT_INTERVAL": "250"})
    assert (c.traces.endpoint, c.traces.protocol, c.traces.headers) == ("http://base:4317", "grpc", (("a", "1"),))
    assert (c.metrics.endpoint, c.metrics.protocol, c.metrics.headers) == ("http://m:4318/custom", "http/protobuf", ())
    assert c.export_interval == 0.25


def test_console_and_none_exporters():
    c = TelemetryConfig.from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert c.traces == SignalConfig("console") and c.metrics is None and c.enabled
    c = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRICS_EXPORTER": "none"})
    assert c.metrics.exporter == "none" and c.traces.exporter == "otlp"
    # otlp asked for by name with no endpoint: the spec's default
    assert TelemetryConfig.from_env({"OTEL_TRACES_EXPORTER": "otlp"}).traces.endpoint == "http://localhost:4318/v1/traces"


@pytest.mark.parametrize("env, field", [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS"),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "soon"}, "OTEL_METRIC_EXPORT_INTERVAL"),
])
def test_bad_variables_name_themselves(env, field):
    with pytest.raises(ConfigError, match=field):
        TelemetryConfig.from_env(env)


def test_cli_setup_never_raises_on_bad_variables(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with caplog.at_level(logging.WARNING, logger="torchcompress.telemetry"):
        assert configure_from_env() is False
    assert "carrier-pigeon" in caplog.text


@pytest.mark.parametrize("kw, field", [
    (dict(timeout=0), "timeout"), (dict(shutdown_timeout=-1), "shutdown_timeout"),
    (dict(max_queue_size=0), "max_queue_size"), (dict(export_interval=True), "export_interval"),
])
def test_limits_are_validated(kw, field):
    with pytest.raises(ConfigError, match=field):
        TelemetryConfig(traces=SignalConfig("console"), metrics=None, **kw)
    with pytest.raises(ConfigError, match="protocol"):
        SignalConfig("otlp", "http://x", "thrift")
    with pytest.raises(ConfigError, match="endpoint"):
        SignalConfig("otlp")


def test_otlp_timeout_variable_is_milliseconds():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert TelemetryConfig.from_env(env).timeout == 2.0  # our bounded default
    assert TelemetryConfig.from_env({**env, "OTEL_EXPORTER_OTLP_TIMEOUT": "500"}).timeout == 0.5
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_TIMEOUT"):
        TelemetryConfig.from_env({**env, "OTEL_EXPORTER_OTLP_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="timeout"):
        TelemetryConfig.from_env({**env, "OTEL_EXPORTER_OTLP_TIMEOUT": "0"})
