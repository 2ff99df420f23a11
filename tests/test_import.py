"""``import torchcompress`` stays lean: no transformers, triton or opentelemetry at import time."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("transformers", "triton", "opentelemetry")


def _heavy(mods) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in HEAVY)


def test_import_and_core_use_are_lean():
    # one fresh interpreter (importing torch twice would double this test's cost): the heavy
    # modules after `import torchcompress`, then after quantizing, running, saving and loading a
    # plain module, none of which needs transformers or opentelemetry
    script = (
        "import json, sys, tempfile\n"
        "import torchcompress as tc\n"
        "after_import = sorted(sys.modules)\n"
        "import torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(16, 8))\n"
        "tc.quantize_(m, tc.QuantScheme(bits=4, group_size=8))\n"
        "m(torch.randn(2, 16))\n"
        "d = tempfile.mkdtemp() + '/c'\n"
        "tc.save_compressed(m, d)\n"
        "with torch.device('meta'):\n"
        "    s = torch.nn.Sequential(torch.nn.Linear(16, 8))\n"
        "tc.load_compressed(d, s)\n"
        "print(json.dumps([after_import, sorted(sys.modules)]))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    after_import, after_use = json.loads(res.stdout.strip().splitlines()[-1])
    assert "torchcompress" in after_import and "torchcompress.nn.quant_linear" in after_import
    assert _heavy(after_import) == []
    # After a forward, triton may be present: torch itself imports torch._dynamo (and through it
    # triton, when installed) on the first call of any torch.library.custom_op. Not ours to avoid.
    assert [m for m in _heavy(after_use) if not m.startswith("triton")] == []


def test_public_names():
    import torchcompress as tc

    for name in tc.__all__:
        assert hasattr(tc, name), name
    assert callable(tc.quantize_) and callable(tc.freeze_)
    assert callable(tc.save_compressed) and callable(tc.load_compressed)
