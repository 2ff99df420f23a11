"""Recipe stage configs for training-time compression: ``kind: qat`` and ``kind: distill``.

Both train on the calibration text (CLI: ``--calib``, ``--calib-samples``, ``--seq-len``).

Example recipe stages::

    - kind: qat                      # fake-quant, distil from the float model, then pack
      scheme: {bits: 3, group_size: 128, symmetric: false}
      steps: 200
      lr: 1.0e-5
    - kind: qat                      # the same with a GGUF block type: freezes to GGUFLinear (llama.cpp's bytes)
      qtype: Q4_0
      steps: 200
    - kind: distill                  # drop every other decoder layer, distil from the model before
      keep: every_other
      steps: 200
      temperature: 2.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import QuantScheme
from ..distill.config import KDConfig, TrainSettings
from ..errors import ConfigError
from ..primitives.gguf_common import GGMLType

# GGUF block types QAT can fake-quantize: every type primitives/gguf_blocks.py quantizes (Q8_1 is
# ggml's activation format, not a weight type llama.cpp stores, so it is left out)
GGUF_QAT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _check_gguf_type(value, field_name: str = "qtype") -> str:
    if not isinstance(value, str) or value.strip().upper() not in GGUF_QAT_TYPES:
        raise ConfigError(field_name, f"must be a GGUF block type, one of {', '.join(GGUF_QAT_TYPES)}; got {value!r}")
    return value.strip().upper()


@dataclass(frozen=True)
class GGUFQATConfig:
    """Prepare Linear layers for QAT with a GGUF block type as the fake quantizer (``quantize_``).

    Each layer trains a float master weight whose forward is ``dequantize(quantize(w, t))`` with our
    bit-exact ggml block functions (straight-through gradient, see ``nn/gguf_qat.py``);
    :func:`torchcompress.freeze_` turns it into the :class:`GGUFLinear` that ``quantize_gguf_`` with
    ``GGUFConfig(<t>, pure=True)`` would make from the trained weight, byte for byte. ``t`` is
    ``qtype`` unless the layer's rows are not a multiple of its block (K-quants need 256): then
    llama.cpp's fallback (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); a row
    that fits no block at all stays a float ``nn.Linear`` (as quantize_gguf_ leaves it F16/F32).
    """

    qtype: str = "Q4_0"

    def __post_init__(self):
        object.__setattr__(self, "qtype", _check_gguf_type(self.qtype))

    @property
    def ggml_type(self) -> GGMLType:
        return GGMLType[self.qtype]

_TEACHERS_QAT = ("float", "none")
_TEACHERS_DISTILL = ("copy", "ema")


def _settings(c) -> TrainSettings:
    return TrainSettings(steps=c.steps, lr=c.lr, batch_size=c.batch_size, warmup_steps=c.warmup_steps, seed=c.seed)


@dataclass(frozen=True)
class QATTrainConfig:
    """Quantization-aware training stage: prepare (fake-quant), train ``steps`` steps, pack (``freeze``).

    ``qtype`` (a GGUF block type, e.g. Q4_0, Q4_K): fake-quantize with that ggml block format instead
    of ``scheme`` and freeze to GGUFLinear (see :class:`GGUFQATConfig`); give one of the two.

    ``teacher: float``: KD loss against a frozen copy of the model as it was before the stage
    (``temperature``, ``hard_weight`` for the label CE next to it); ``none``: plain next-token CE.
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    learnable_scale: bool = False
    qtype: str | None = None
    teacher: str = "float"
    temperature: float = 1.0
    hard_weight: float = 0.0
    steps: int = 100
    lr: float = 1e-5
    batch_size: int = 4
    warmup_steps: int = 0
    seed: int = 0
    freeze: bool = True
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.scheme, QuantScheme):
            raise ConfigError("scheme", f"must be a QuantScheme, got {type(self.scheme).__name__}")
        for name in ("learnable_scale", "freeze"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.teacher not in _TEACHERS_QAT:
            raise ConfigError("teacher", f"must be one of {', '.join(_TEACHERS_QAT)}, got {self.teacher!r}")
        if self.qtype is not None:
            object.__setattr__(self, "qtype", _check_gguf_type(self.qtype))
            if self.scheme != QuantScheme():
                raise ConfigError("scheme", "give either scheme (integer groups) or qtype (a GGUF block type), not both")
            if self.learnable_scale:
                raise ConfigError("learnable_scale", "learned step sizes are for integer schemes; GGUF block scales "
                                  "are recomputed from the weights in every forward")
        _settings(self)
        self.kd()

    def kd(self) -> KDConfig | None:
        if self.teacher == "none":
            return None
        return KDConfig(temperature=self.temperature, soft_weight=1.0, hard_weight=self.hard_weight)

    def settings(self) -> TrainSettings:
        return _settings(self)

    def prepare_config(self):
        """The ``quantize_`` config this stage prepares the model with."""
        from ..config import QATConfig

        if self.qtype is not None:
            return GGUFQATConfig(self.qtype)
        return QATConfig(self.scheme, learnable_scale=self.learnable_scale)


@dataclass(frozen=True)
class DistillConfig:
    """Distillation stage, in place. ``keep``: decoder layers the student keeps (``every_other``, a count,
    a list of indices; ``null``: same architecture, e.g. after ``qat_prepare``). ``teacher: copy``: a
    frozen copy of the model at the start of the stage; ``ema``: self-distillation from an exponential
    moving average (``ema_decay``) of the student."""

    keep: object = None
    teacher: str = "copy"
    ema_decay: float = 0.999
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    hidden_weight: float = 0.0
    layer_map: tuple = ()
    steps: int = 100
    lr: float = 1e-5
    batch_size: int = 4
    warmup_steps: int = 0
    seed: int = 0
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        if self.teacher not in _TEACHERS_DISTILL:
            raise ConfigError("teacher", f"must be one of {', '.join(_TEACHERS_DISTILL)}, got {self.teacher!r}")
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) or not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay!r}")
        if self.keep is not None:
            from ..distill.progressive import resolve_keep

            if isinstance(self.keep, list):
                object.__setattr__(self, "keep", tuple(self.keep))
            if self.keep != "every_other":
                resolve_keep(self.keep, 10**6)  # shape check; the range is checked against the model
        if isinstance(self.layer_map, list):
            object.__setattr__(self, "layer_map", tuple(tuple(p) if isinstance(p, list) else p for p in self.layer_map))
        _settings(self)
        self.kd()

    def kd(self) -> KDConfig:
        return KDConfig(temperature=self.temperature, soft_weight=self.soft_weight, hard_weight=self.hard_weight,
                        hidden_weight=self.hidden_weight, layer_map=self.layer_map)

    def settings(self) -> TrainSettings:
        return _settings(self)
