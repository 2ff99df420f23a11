"""What to export where, read from the standard ``OTEL_*`` environment variables (no OpenTelemetry import).

Nothing configured means ``TelemetryConfig.from_env()`` returns None and nothing is set up.
Configured means: an OTLP endpoint is given (``OTEL_EXPORTER_OTLP_ENDPOINT`` or a per-signal
``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``), or ``OTEL_TRACES_EXPORTER`` /
``OTEL_METRICS_EXPORTER`` names an exporter (``otlp``, ``console``). ``OTEL_SDK_DISABLED=true``
turns everything off.

Example::

    OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317 OTEL_EXPORTER_OTLP_PROTOCOL=grpc \\
        torchcompress compress --model default --recipe w4-rtn --out out/w4
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ..errors import ConfigError

PROTOCOLS = ("grpc", "http/protobuf")
EXPORTERS = ("otlp", "console", "none")
_HTTP_PATHS = {"traces": "/v1/traces", "metrics": "/v1/metrics"}


@dataclass(frozen=True)
class SignalConfig:
    """One signal's (traces or metrics) exporter: ``exporter`` in EXPORTERS; for otlp, where and how."""

    exporter: str = "otlp"
    endpoint: str | None = None  # full URL for http/protobuf, host:port or http(s)://host:port for grpc
    protocol: str = "http/protobuf"
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.exporter not in EXPORTERS:
            raise ConfigError("exporter", f"must be one of {', '.join(EXPORTERS)}, got {self.exporter!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError("protocol", f"must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.exporter == "otlp" and not self.endpoint:
            raise ConfigError("endpoint", "an otlp exporter needs an endpoint")


@dataclass(frozen=True)
class TelemetryConfig:
    """Traces and metrics exporters plus the limits that keep telemetry from hurting the job.

    ``timeout``: seconds one export may take (retries included); ``shutdown_timeout``: seconds
    :func:`torchcompress.telemetry.shutdown` waits at most; ``export_interval``: seconds between
    metric exports; ``max_queue_size``: spans buffered before new ones are dropped (and counted).
    """

    traces: SignalConfig | None
    metrics: SignalConfig | None
    service_name: str = "torchcompress"
    timeout: float = 2.0
    shutdown_timeout: float = 3.0
    export_interval: float = 5.0
    max_queue_size: int = 2048

    def __post_init__(self):
        for name in ("timeout", "shutdown_timeout", "export_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(name, f"must be a positive number of seconds, got {v!r}")
        if isinstance(self.max_queue_size, bool) or not isinstance(self.max_queue_size, int) or self.max_queue_size < 1:
            raise ConfigError("max_queue_size", f"must be a positive integer, got {self.max_queue_size!r}")

    @property
    def enabled(self) -> bool:
        return any(s is not None and s.exporter != "none" for s in (self.traces, self.metrics))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "TelemetryConfig | None":
        """The configuration the ``OTEL_*`` variables ask for, or None when they ask for nothing."""
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        signals = {s: _signal(env, s) for s in ("traces", "metrics")}
        if all(s is None or s.exporter == "none" for s in signals.values()):
            return None
        kw = dict(traces=signals["traces"], metrics=signals["metrics"],
                  service_name=env.get("OTEL_SERVICE_NAME") or "torchcompress")
        interval = env.get("OTEL_METRIC_EXPORT_INTERVAL")  # milliseconds, as the spec says
        if interval:
            kw["export_interval"] = _number(interval, "OTEL_METRIC_EXPORT_INTERVAL") / 1000
        timeout = env.get("OTEL_EXPORTER_OTLP_TIMEOUT")  # milliseconds; unset: our 2 s (the spec's 10 s is
        if timeout:                                       # too long to wait on a dead collector at exit)
            kw["timeout"] = _number(timeout, "OTEL_EXPORTER_OTLP_TIMEOUT") / 1000
        kw.update(overrides)
        return cls(**kw)


def _number(s: str, name: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {s!r}") from None


def _signal(env: Mapping[str, str], signal: str) -> SignalConfig | None:
    up = signal.upper()
    exporter = env.get(f"OTEL_{up}_EXPORTER", "").strip().lower()
    if exporter and "," in exporter:  # the spec allows a list; we honour the first we know
        exporter = next((e.strip() for e in exporter.split(",") if e.strip() in EXPORTERS), exporter)
    own = env.get(f"OTEL_EXPORTER_OTLP_{up}_ENDPOINT", "").strip()
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if exporter in ("none", "console"):
        return SignalConfig(exporter=exporter)
    if exporter not in ("", "otlp"):
        raise ConfigError(f"OTEL_{up}_EXPORTER", f"must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if not own and not base:
        if exporter == "otlp":  # asked for explicitly with no endpoint: the spec's localhost default
            base = "http://localhost:4318"
        else:
            return None
    protocol = (env.get(f"OTEL_EXPORTER_OTLP_{up}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol not in PROTOCOLS:
        raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if own:
        endpoint = own  # a per-signal endpoint is used as given
    elif protocol == "http/protobuf":
        endpoint = base.rstrip("/") + _HTTP_PATHS[signal]
    else:
        endpoint = base
    headers = _headers(env.get("OTEL_EXPORTER_OTLP_HEADERS", ""))
    headers.update(_headers(env.get(f"OTEL_EXPORTER_OTLP_{up}_HEADERS", "")))
    return SignalConfig("otlp", endpoint, protocol, tuple(headers.items()))


def _headers(s: str) -> dict:
    """``key1=value1,key2=value2`` with URL-encoded values (W3C baggage-like, as the spec says)."""
    from urllib.parse import unquote

    out = {}
    for part in s.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError("OTEL_EXPORTER_OTLP_HEADERS", f"expected key=value pairs, got {part.strip()!r}")
        k, v = part.split("=", 1)
        out[unquote(k.strip()).lower()] = unquote(v.strip())
    return out
