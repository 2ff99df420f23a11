"""Hypothesis settings for the fuzz tests: short in the normal suite, long for release checks.

    TORCHCOMPRESS_FUZZ_SCALE=50 python -m pytest -q tests/reliability -k fuzz   # 50x the examples

Every fuzz test runs with a fixed seed (``derandomize``) so a CI failure reproduces; a release run
with a scale > 1 draws fresh examples (random seed) and prints the failing one.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("TORCHCOMPRESS_FUZZ_SCALE", "1"))


def fuzz(max_examples: int):
    return settings(
        max_examples=max(1, int(max_examples * SCALE)),
        deadline=None,  # wall time is bounded by max_examples; a per-example deadline flakes on 2 shared cores
        derandomize=SCALE <= 1,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
        print_blob=True,
    )


class Hang(AssertionError):
    pass


class no_hang:
    """Fail an example that runs longer than ``seconds`` (SIGALRM; main thread, POSIX)."""

    def __init__(self, seconds: float = 10.0):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def boom(signum, frame):
            raise Hang(f"no result after {self.seconds}s: the input made the reader hang")

        self._old = signal.signal(signal.SIGALRM, boom)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        import signal

        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)
        return False


def json_values():
    """Any JSON value, including the NaN/Infinity that Python's json module writes and reads."""
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64])
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=8)
