import pytest

from tests.tiny import calibrated_tiny_llama


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer, pydoc calibration 8 x 32): 4 query / 2 kv heads of 24 dims, intermediate 200."""
    return calibrated_tiny_llama(hidden_size=96, intermediate_size=200)
