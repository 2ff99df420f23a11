"""``import torchcompress`` stays lean: no transformers, triton or opentelemetry at import time."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("transformers", "triton", "opentelemetry")


def _heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return the heavy modules it imported."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    mods = json.loads(res.stdout.strip().splitlines()[-1])
    assert "torchcompress" in mods
    return [m for m in mods if m.split(".")[0] in HEAVY]


def test_import_is_lean():
    assert _heavy_modules_after("import torchcompress") == []


def test_core_use_is_lean():
    # quantizing, saving and loading a plain module never needs transformers
    code = (
        "import tempfile, torch, torchcompress as tc\n"
        "m = torch.nn.Sequential(torch.nn.Linear(16, 8))\n"
        "tc.quantize_(m, tc.QuantScheme(bits=4, group_size=8))\n"
        "m(torch.randn(2, 16))\n"
        "d = tempfile.mkdtemp() + '/c'\n"
        "tc.save_compressed(m, d)\n"
        "with torch.device('meta'):\n"
        "    s = torch.nn.Sequential(torch.nn.Linear(16, 8))\n"
        "tc.load_compressed(d, s)\n"
    )
    assert _heavy_modules_after(code) == []


def test_public_names():
    import torchcompress as tc

    for name in tc.__all__:
        assert hasattr(tc, name), name
    assert callable(tc.quantize_) and callable(tc.freeze_)
    assert callable(tc.save_compressed) and callable(tc.load_compressed)
