#!/usr/bin/env bash
# The main job on the embedded default: compress SmolLM2-135M-Instruct with the bundled w4-rtn
# recipe, evaluate perplexity/KL before and after on Python's bundled documentation, print the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
python3 -m torchcompress compress --model default --recipe "${RECIPE:-w4-rtn}" --out out/smollm2-w4-rtn \
  --eval pydoc --eval-windows 16 --json out/smollm2-w4-rtn.json --report out/smollm2-w4-rtn-report
echo "report: out/smollm2-w4-rtn-report/report.md"
