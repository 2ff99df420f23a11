"""Wall time and exit lag of `torchcompress compress` with a dead OTLP collector, beside telemetry off.

    HF_HUB_OFFLINE=1 python benchmarks/telemetry_dead_collector.py [--model default] [--rounds 2]

Runs the CLI (``compress --recipe w4-rtn``, plus a 4-window pydoc eval) in fresh processes: telemetry
off, telemetry to a live gRPC receiver (what telemetry itself costs), gRPC endpoint refusing connections, gRPC and HTTP endpoints that accept and never answer
(the fault tests' receivers from tests/). Prints the run phase (start to the summary line), the exit
lag (summary line to process exit) and the total wall time of each, round by round, then medians
and each case's wall time as a ratio to telemetry off in the same round: the mean over rounds with
its 95% confidence interval. Rounds alternate the order of the cases. A single round on this 2-core
machine varies by about +-1 s (5%), so use 8 rounds or more before reading a difference of a few percent.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.test_telemetry_otlp import _env, run_cli  # noqa: E402
from tests.telemetry.receiver import BlackHole, GrpcReceiver, closed_port_endpoint  # noqa: E402


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then ~1.96)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired(ratios: list[float]) -> tuple[float, float]:
    """Mean of per-round ratios and the half-width of its 95% confidence interval (nan for one round)."""
    n = len(ratios)
    if n < 2:
        return statistics.fmean(ratios), float("nan")
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    return statistics.fmean(ratios), t * statistics.stdev(ratios) / n ** 0.5


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
        print(f"{'round':>5s} {'collector':10s} {'rc':>3s} {'run s':>7s} {'exit lag s':>10s} {'wall s':>7s}")
        for r in range(a.rounds):
            # every other round runs the cases in reverse order, so a slow drift of the machine's speed
            # does not favour the cases that come first
            for tag in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
                env = _env(**cases[tag])
                env.pop("TORCHCOMPRESS_KERNEL", None)  # the native kernels, as users run it
                out = tempfile.mkdtemp()
                rc, _, _, wall, lag = run_cli(["compress", "--model", a.model, "--recipe", "w4-rtn", "--eval", "pydoc",
                                               "--eval-windows", "4", "--out", out + "/o"], env)
                shutil.rmtree(out, ignore_errors=True)
                lag = float("nan") if lag is None else lag
                print(f"{r:5d} {tag:10s} {rc:3d} {wall - lag:7.2f} {lag:10.2f} {wall:7.2f}", flush=True)
                times.setdefault(tag, []).append((wall - lag, lag, wall))
    finally:
        hole.close()
        live.close()
    med = {t: [statistics.median(x[i] for x in v) for i in range(3)] for t, v in times.items()}
    print(f"\nmedians over {a.rounds} rounds; then wall as a ratio to telemetry off in the same round "
          "(mean over rounds, with its 95% confidence interval)")
    print(f"{'collector':10s} {'run s':>7s} {'exit lag s':>10s} {'wall s':>7s} {'wall/off':>17s}")
    for t, (run, lag, wall) in med.items():
        mean, half = paired([x[2] / o[2] for x, o in zip(times[t], times["off"])])
        print(f"{t:10s} {run:7.2f} {lag:10.2f} {wall:7.2f} {mean:8.3f} +- {half:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
