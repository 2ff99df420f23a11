#!/usr/bin/env bash
# Installs everything, then runs the whole test suite on CPU (no network, no hub).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# -rfEs: name every failure, error and skip at the end; --durations: the slowest tests, for CI's log
python3 -m pytest -q -rfEs --durations=15 "$@"
