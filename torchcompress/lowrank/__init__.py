"""Low-rank techniques: LoRA adapters (PEFT-compatible) and SVD factorization of Linear layers."""

from .config import LoRAConfig, SVDConfig  # noqa: F401
