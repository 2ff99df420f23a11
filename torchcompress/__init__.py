"""torchcompress: PyTorch-native model compression.

Stays lean at import: no transformers, triton or opentelemetry (tests/test_import.py checks).

>>> import torchcompress as tc
>>> tc.quantize_(model, tc.RTNConfig(tc.QuantScheme(bits=4, group_size=128)))
"""

from .api import freeze_, quantize_
from .config import Granularity, QATConfig, QuantScheme, RTNConfig
from .errors import ConfigError, FormatError, InputError, NumericError, RecipeError, TorchCompressError
from .nn import QuantLinear
from .api import add_lora_, lowrank_, prune_  # noqa: E402  (low-rank #8, pruning #6)
from .lowrank import LoRAConfig, SVDConfig  # noqa: E402
from .quant.scheme_config import FP4Config, FP8Config, SmoothQuantConfig, W8A8Int8Config  # noqa: E402  (#21)

__version__ = "0.1.0"


def save_compressed(model, out_dir, tokenizer=None):
    """Write a compressed model to ``out_dir`` (safetensors + JSON manifest), atomically."""
    from .formats.checkpoint import save_compressed as _save

    return _save(model, out_dir, tokenizer)


def load_compressed(path, model=None):
    """Load a directory written by :func:`save_compressed` (``model``: skeleton for non-HF modules)."""
    from .formats.checkpoint import load_compressed as _load

    return _load(path, model)


__all__ = [
    "ConfigError", "FormatError", "Granularity", "InputError", "NumericError", "QATConfig", "QuantLinear",
    "QuantScheme", "RTNConfig", "RecipeError", "TorchCompressError", "freeze_", "load_compressed",
    "quantize_", "save_compressed",
    "LoRAConfig", "SVDConfig", "add_lora_", "lowrank_", "prune_",
    "FP4Config", "FP8Config", "SmoothQuantConfig", "W8A8Int8Config",
]
