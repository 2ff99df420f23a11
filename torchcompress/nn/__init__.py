"""Drop-in replacements for ``nn.Linear``."""

from .quant_linear import QuantLinear  # noqa: F401
