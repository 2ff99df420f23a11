"""OpenTelemetry traces and metrics for compression runs and, opt-in, inference.

Off unless configured, and then free: importing this package imports no OpenTelemetry module, and
with nothing configured the runner's hooks are ``contextlib.nullcontext``. Configure it with the
standard ``OTEL_*`` environment variables (the CLI calls :func:`configure_from_env`) or in Python::

    from torchcompress import telemetry
    telemetry.configure(endpoint="http://localhost:4317", protocol="grpc")
    report = compress(model, recipe)               # spans: compress > stage > layer, plus metrics
    h = telemetry.instrument(model, modules=[nn.Linear], sample_ratio=0.1)
    ...
    telemetry.shutdown(timeout=3)                  # bounded; also runs at exit

Names (spans, attributes, metrics and their units) are listed in :mod:`.names`.
"""

from __future__ import annotations

import logging

from .config import SignalConfig, TelemetryConfig

log = logging.getLogger("torchcompress.telemetry")

__all__ = ["SignalConfig", "TelemetryConfig", "command_span", "configure", "configure_from_env", "enabled", "eval_scope",
           "flush", "instrument", "record_eval", "record_eval_result", "record_speedup", "shutdown", "uninstrument"]


def configure(config: TelemetryConfig | None = None, *, endpoint: str | None = None, protocol: str = "http/protobuf",
              headers: dict | None = None, console: bool = False, **limits) -> bool:
    """Install OpenTelemetry SDK providers and exporters. Returns True when telemetry is on.

    With no arguments: what the ``OTEL_*`` variables say (off when they say nothing). ``endpoint``
    (+ ``protocol`` ``"grpc"`` or ``"http/protobuf"``, ``headers``): OTLP traces and metrics there
    (for http/protobuf a base URL; ``/v1/traces`` and ``/v1/metrics`` are appended). ``console``:
    print to stderr. ``limits``: other :class:`TelemetryConfig` fields (``timeout``, ``service_name``...).
    """
    if config is None:
        if endpoint is not None or console:
            sigs = {}
            for signal, path in (("traces", "/v1/traces"), ("metrics", "/v1/metrics")):
                if console:
                    sigs[signal] = SignalConfig("console")
                else:
                    url = endpoint.rstrip("/") + path if protocol == "http/protobuf" else endpoint
                    sigs[signal] = SignalConfig("otlp", url, protocol, tuple((headers or {}).items()))
            config = TelemetryConfig(**sigs, **limits)
        else:
            config = TelemetryConfig.from_env(**limits)
    if config is None or not config.enabled:
        return False
    from .setup import configure as _configure

    return _configure(config)


def configure_from_env() -> bool:
    """What the CLI calls: set up from ``OTEL_*`` if they ask for anything. Never raises: a bad
    variable logs one warning and leaves telemetry off (telemetry must not stop the job)."""
    try:
        config = TelemetryConfig.from_env()
        if config is None:
            return False
        from .setup import configure as _configure

        return _configure(config)
    except Exception as e:
        log.warning("telemetry off: %s", e)
        return False


def shutdown(timeout: float | None = None) -> None:
    """Flush and stop exporting, waiting at most ``timeout`` seconds. A no-op when never configured."""
    import sys

    setup = sys.modules.get(__name__ + ".setup")
    if setup is not None:
        setup.shutdown(timeout)


def flush(timeout: float = 2.0) -> bool:
    import sys

    setup = sys.modules.get(__name__ + ".setup")
    return True if setup is None else setup.flush(timeout)


def enabled() -> bool:
    """Whether an OpenTelemetry SDK provider is installed (ours or the application's)."""
    from .run import enabled as _enabled

    return _enabled()


def instrument(model, modules=None, *, sample_ratio: float = 1.0, attributes: dict | None = None, meter_provider=None):
    from .hooks import instrument as _instrument

    return _instrument(model, modules, sample_ratio=sample_ratio, attributes=attributes, meter_provider=meter_provider)


def uninstrument(model) -> int:
    from .hooks import uninstrument as _uninstrument

    return _uninstrument(model)


def record_eval(*args, **kwargs) -> None:
    from .record import record_eval as _record_eval

    _record_eval(*args, **kwargs)


def record_speedup(speedup: float, attributes: dict | None = None) -> None:
    from .record import record_speedup as _record_speedup

    _record_speedup(speedup, attributes)


def command_span(command: str):
    """The CLI's root span for one command (nothing when telemetry is off)."""
    from .record import command_span as _command_span

    return _command_span(command)


def eval_scope(model, reference=None, attributes: dict | None = None):
    """Span + forward timing (+ speedup vs ``reference``) around an evaluation; nothing when off."""
    from .record import eval_scope as _eval_scope

    return _eval_scope(model, reference, attributes)


def record_eval_result(res, attributes: dict | None = None) -> None:
    """Perplexity (before/after, increase), KL and top-1 agreement of an EvalResult as metrics."""
    from .record import record_eval_result as _record

    _record(res, attributes)


instrument.__doc__ = "Time forward passes with removable hooks (see :func:`torchcompress.telemetry.hooks.instrument`)."
uninstrument.__doc__ = "Remove every hook :func:`instrument` put on ``model``."
