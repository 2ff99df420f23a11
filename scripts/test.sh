#!/usr/bin/env bash
# Installs everything, then runs the whole test suite on CPU (no network, no hub).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
python3 -m pytest -q "$@"
