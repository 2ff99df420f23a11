import os

import pytest


@pytest.fixture(scope="module", autouse=True)
def _reference_kernels():
    """Fuzzers time every example (no_hang); the native CPU extension's first-use build (minutes on a
    cold cache) must not run inside that window, and these tests check loaders, not kernels."""
    old = os.environ.get("TORCHCOMPRESS_KERNEL")
    os.environ["TORCHCOMPRESS_KERNEL"] = "reference"
    yield
    if old is None:
        os.environ.pop("TORCHCOMPRESS_KERNEL", None)
    else:
        os.environ["TORCHCOMPRESS_KERNEL"] = old
