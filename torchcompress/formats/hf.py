"""Hugging Face integration: empty skeletons, and a transformers quantizer so that

    import torchcompress.hf  # registers "torchcompress" with transformers
    model = AutoModelForCausalLM.from_pretrained("out/smollm2-w4")

returns the compressed model (QuantLinear modules holding the packed tensors from disk).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import FormatError

log = logging.getLogger(__name__)


def empty_hf_model(path: str | Path):
    """A transformers model for ``path/config.json`` with parameters on the meta device (buffers such
    as rotary ``inv_freq`` stay real, since they are computed, not loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    register()  # our own checkpoints name OWN_MODEL_TYPE in config.json
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise FormatError(path, f"config.json is not a usable transformers config: {e}") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return model


def register_model_type() -> None:
    """Let ``AutoConfig`` read our own checkpoints' config.json: :data:`OWN_MODEL_TYPE` resolves to the
    config class of the architecture kept under :data:`BASE_MODEL_TYPE` (idempotent)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .checkpoint import BASE_MODEL_TYPE, OWN_MODEL_TYPE

    if OWN_MODEL_TYPE in CONFIG_MAPPING:
        return

    class OwnCheckpointConfig:
        """Not a config: ``from_dict`` hands the dict to the base architecture's config class."""

        model_type = OWN_MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict: dict, **kwargs):
            d = dict(config_dict)
            base = d.pop(BASE_MODEL_TYPE, None)
            if not isinstance(base, str) or base not in CONFIG_MAPPING or base == OWN_MODEL_TYPE:
                raise FormatError("config.json", f"{BASE_MODEL_TYPE} {base!r} is not an architecture transformers knows")
            d["model_type"] = base
            return CONFIG_MAPPING[base].from_dict(d, **kwargs)

    CONFIG_MAPPING.register(OWN_MODEL_TYPE, OwnCheckpointConfig, exist_ok=True)


def register() -> None:
    """Register the ``torchcompress`` quantization method and model type with transformers (idempotent)."""
    from transformers.quantizers import auto

    register_model_type()
    if "torchcompress" in auto.AUTO_QUANTIZER_MAPPING:
        return
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .checkpoint import FORMAT_VERSION, QUANT_METHOD, apply_manifest

    class TorchCompressConfig(QuantizationConfigMixin):
        """The manifest stored under ``quantization_config`` in config.json."""

        def __init__(self, modules=None, format_version=FORMAT_VERSION, tied=None, **kwargs):
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.modules = modules or {}
            self.tied = tied or {}
            if format_version != FORMAT_VERSION:
                raise FormatError("config.json", f"quantization_config format_version {format_version!r}; this torchcompress reads {FORMAT_VERSION}")

        def to_dict(self):
            return {"quant_method": self.quant_method, "format_version": self.format_version,
                    "modules": self.modules, "tied": self.tied}

    class TorchCompressHfQuantizer(HfQuantizer):
        requires_calibration = True  # loading only: compress with torchcompress itself
        quantization_config: TorchCompressConfig

        def validate_environment(self, *args, **kwargs):
            return None

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False

        def _process_model_before_weight_loading(self, model, **kwargs):
            # swap in empty QuantLinear modules so the checkpoint's packed tensors have a home
            cfg = self.quantization_config.to_dict()
            from ..pipeline.experts import unfuse_for_manifest

            unfuse_for_manifest(model, cfg["modules"])  # compressed MoE experts are one linear per expert
            apply_manifest(model, cfg, device="meta", source="config.json")
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def is_serializable(self):
            return True

        @property
        def is_trainable(self) -> bool:
            return True  # LoRA on top of frozen QuantLinear layers

    auto.register_quantization_config(QUANT_METHOD)(TorchCompressConfig)
    auto.register_quantizer(QUANT_METHOD)(TorchCompressHfQuantizer)
