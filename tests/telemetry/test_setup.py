"""configure()/shutdown() against real exporters, each in a fresh interpreter (they install
OpenTelemetry's process-wide providers): bounded shutdown on a hung collector, delivery to a
receiver, console output, and no OpenTelemetry import when nothing is configured."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.telemetry.receiver import BlackHole, HttpReceiver

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _py(script: str, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    e.update(PYTHONPATH=ROOT, TORCHCOMPRESS_KERNEL="reference", **env)  # no native build inside a test
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=e, timeout=120)
    assert p.returncode == 0, p.stderr
    return p


SPANS = """
    import json, logging, time
    logging.basicConfig(level=logging.WARNING)
    from torchcompress import telemetry
    from opentelemetry import trace
    on = telemetry.configure({config})
    tr = trace.get_tracer("t")
    t0 = time.perf_counter()
    for i in range(3000):  # more than the queue holds: the overflow is dropped, and counted
        with tr.start_as_current_span("s", attributes={{"i": i}}):
            pass
    t_spans = time.perf_counter() - t0
    t0 = time.perf_counter()
    telemetry.shutdown()
    print(json.dumps({{"on": on, "spans_s": t_spans, "shutdown_s": time.perf_counter() - t0}}))
"""


@pytest.mark.parametrize("protocol", ["grpc", pytest.param("http/protobuf", marks=pytest.mark.slow)])
def test_hung_collector_bounded_shutdown_counted_drops(protocol):
    hole = BlackHole()
    try:
        cfg = f"endpoint={hole.endpoint!r}, protocol={protocol!r}, timeout=0.5, shutdown_timeout=1.0, max_queue_size=1000"
        p = _py(SPANS.format(config=cfg))
    finally:
        hole.close()
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["on"] is True
    # generous bounds, each far below the SDK defaults a hang would take (10 s export, 30 s shutdown)
    assert r["shutdown_s"] < 2.5, r
    assert r["spans_s"] < 5.0, r  # 3000 spans never wait for the collector
    assert p.stderr.count("could not export") <= 1
    lines = [ln for ln in p.stderr.splitlines() if "not delivered" in ln]
    assert len(lines) == 1 and "of 3000 spans" in lines[0], p.stderr
    assert int(lines[0].split("telemetry: ")[1].split(" of ")[0]) >= 2000  # the queue held 1000 at most
    assert "opentelemetry" not in p.stderr, p.stderr  # the SDK's per-attempt / per-span messages are held back


KNOWN_DEAD = """
    import json, logging, time
    logging.basicConfig(level=logging.WARNING)
    from torchcompress import telemetry
    from opentelemetry import trace
    telemetry.configure({config})
    if {early}:
        with trace.get_tracer("t").start_as_current_span("s"):
            pass
    time.sleep({wait})  # the batch processor's first export (after 1 s) fails, or is still waiting
    with trace.get_tracer("t").start_as_current_span("last"):  # still queued at the exit
        pass
    t0 = time.perf_counter()
    telemetry.shutdown()
    print(json.dumps({{"shutdown_s": time.perf_counter() - t0}}))
"""


@pytest.mark.parametrize("export_timeout,wait,early,why", [
    (1.5, 3.5, True, "failed"),  # the first export timed out before the exit: the collector is known dead
    (8.0, 3.0, True, "waiting"),  # the first export has waited ~2 s on a black hole and is still waiting
    (1.5, 2.5, False, "probe"),  # no span before the exit: the start-up probe timed out
])
def test_known_dead_collector_gets_a_short_final_flush(export_timeout, wait, early, why):
    """A collector that is known not to answer does not get the whole shutdown deadline (6 s here):
    the final flush gives up after DEAD_COLLECTOR_GRACE, so a dead collector adds ~0.2 s to the exit."""
    from torchcompress.telemetry.setup import DEAD_COLLECTOR_GRACE

    hole = BlackHole()
    try:
        cfg = f"endpoint={hole.endpoint!r}, protocol='grpc', timeout={export_timeout}, shutdown_timeout=6.0"
        p = _py(KNOWN_DEAD.format(config=cfg, wait=wait, early=early))
    finally:
        hole.close()
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["shutdown_s"] < DEAD_COLLECTOR_GRACE + 1.0, (why, r)  # far below the 6 s deadline
    assert p.stderr.count("could not export") == 1, p.stderr  # said once, also when nothing had failed yet
    assert p.stderr.count("not delivered") == 1 and f"{1 + early} of {1 + early} spans" in p.stderr, p.stderr


def test_collector_health_tracking():
    from torchcompress.telemetry.setup import Drops

    d = Drops()
    assert not d.unresponsive(1.0)  # nothing exported yet: no verdict
    t = d.begin()
    assert not d.unresponsive(1.0)  # waiting, but not for long
    assert d.unresponsive(0.0)  # waiting longer than the patience
    d.end(t, ok=True)
    assert not d.unresponsive(0.0)
    d.end(d.begin(), ok=False)
    assert d.unresponsive(1.0)  # the latest export failed
    d.end(d.begin(), ok=True)
    assert not d.unresponsive(1.0)  # it came back


@pytest.mark.slow
def test_delivers_to_a_receiver_and_nothing_is_dropped():
    recv = HttpReceiver()
    try:
        p = _py(SPANS.format(config=f"endpoint={recv.endpoint!r}, max_queue_size=4096"))
    finally:
        recv.close()
    assert "not delivered" not in p.stderr and "could not export" not in p.stderr, p.stderr
    spans = recv.spans()
    assert len(spans) == 3000 and sorted(s.attributes[0].value.int_value for s in spans) == list(range(3000))


@pytest.mark.slow
def test_console_exporter_for_local_runs():
    p = _py("""
        from torchcompress import telemetry
        from torchcompress.telemetry.record import record_eval, span
        assert telemetry.configure_from_env()
        with span("hello", {"torchcompress.recipe.name": "r"}):
            pass
        record_eval(12.5, baseline_perplexity=10.0)
        telemetry.shutdown()
    """, OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="console")
    assert '"name": "hello"' in p.stderr and '"torchcompress.recipe.name": "r"' in p.stderr
    assert '"name": "torchcompress.model.perplexity.increase"' in p.stderr and '"value": 0.25' in p.stderr


def test_not_configured_imports_no_opentelemetry():
    p = _py("""
        import sys, json, torch
        from torchcompress import telemetry
        from torchcompress.recipe import compress, load_recipe
        assert telemetry.configure_from_env() is False
        m = torch.nn.Sequential(torch.nn.Linear(16, 16))
        compress(m, load_recipe("w8-rtn"))
        h = telemetry.instrument(m)
        m(torch.randn(1, 16)); h.remove()
        telemetry.record_eval(1.0); telemetry.shutdown()
        print(json.dumps(sorted(k for k in sys.modules if k.startswith("opentelemetry"))))
    """, OTEL_SDK_DISABLED="true", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
