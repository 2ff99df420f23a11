"""Wall time and exit lag of `torchcompress compress` with a dead OTLP collector, beside telemetry off.

    HF_HUB_OFFLINE=1 python benchmarks/telemetry_dead_collector.py [--model default] [--rounds 2]

Runs the CLI (``compress --recipe w4-rtn``, plus a 4-window pydoc eval) in fresh processes: telemetry
off, telemetry to a live gRPC receiver (what telemetry itself costs), gRPC endpoint refusing connections, gRPC and HTTP endpoints that accept and never answer
(the fault tests' receivers from tests/). Prints the run phase (start to the summary line), the exit
lag (summary line to process exit) and the total wall time of each, round by round, then medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.test_telemetry_otlp import _env, run_cli  # noqa: E402
from tests.telemetry.receiver import BlackHole, GrpcReceiver, closed_port_endpoint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    hole, live = BlackHole(), GrpcReceiver()
    times: dict[str, list[tuple[float, float, float]]] = {}
    try:
        cases = {"off": {},
                 "grpc-ok": dict(OTEL_EXPORTER_OTLP_ENDPOINT=live.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="grpc"),
                 "grpc-down": dict(OTEL_EXPORTER_OTLP_ENDPOINT=closed_port_endpoint(), OTEL_EXPORTER_OTLP_PROTOCOL="grpc"),
                 "grpc-hung": dict(OTEL_EXPORTER_OTLP_ENDPOINT=hole.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="grpc"),
                 "http-hung": dict(OTEL_EXPORTER_OTLP_ENDPOINT=hole.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")}
        print(f"{'collector':10s} {'rc':>3s} {'run s':>7s} {'exit lag s':>10s} {'wall s':>7s}")
        for _ in range(a.rounds):
            for tag, otel in cases.items():
                env = _env(**otel)
                env.pop("TORCHCOMPRESS_KERNEL", None)  # the native kernels, as users run it
                out = tempfile.mkdtemp()
                rc, _, _, wall, lag = run_cli(["compress", "--model", a.model, "--recipe", "w4-rtn", "--eval", "pydoc",
                                               "--eval-windows", "4", "--out", out + "/o"], env)
                lag = float("nan") if lag is None else lag
                print(f"{tag:10s} {rc:3d} {wall - lag:7.2f} {lag:10.2f} {wall:7.2f}", flush=True)
                times.setdefault(tag, []).append((wall - lag, lag, wall))
    finally:
        hole.close()
        live.close()
    med = {t: [statistics.median(x[i] for x in v) for i in range(3)] for t, v in times.items()}
    print(f"\nmedians over {a.rounds} rounds, and wall as a ratio to telemetry off and to a live collector")
    print(f"{'collector':10s} {'run s':>7s} {'exit lag s':>10s} {'wall s':>7s} {'/off':>6s} {'/grpc-ok':>8s}")
    for t, (run, lag, wall) in med.items():
        print(f"{t:10s} {run:7.2f} {lag:10.2f} {wall:7.2f} {wall / med['off'][2]:6.3f} {wall / med['grpc-ok'][2]:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
