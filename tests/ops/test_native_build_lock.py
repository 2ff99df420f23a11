"""A build killed midway leaves torch's ``lock`` file; the next load must not wait for it forever."""

import subprocess
import sys

import pytest

from torchcompress.ops import native


def test_stale_torch_lock_is_removed(tmp_path):
    try:
        native.build()  # the cached build (or build it once)
    except native.NativeUnavailable as e:
        pytest.skip(f"no native build here: {e}")
    from torchcompress.models import cache_dir

    lock = cache_dir() / "ext" / f"torchcompress_C_{native.build_key()}" / "lock"
    lock.write_text("")  # as left by a build that was killed
    code = "from torchcompress.ops import native; native.build(); print('ok')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    assert not lock.exists()
