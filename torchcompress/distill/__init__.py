"""Knowledge distillation: losses, a Distiller (frozen teacher + loss), self- and progressive distillation."""

from .config import KDConfig, TrainSettings
from .distiller import Distiller
from .losses import hidden_state_loss, kd_loss, shift_for_causal_lm

__all__ = ["Distiller", "KDConfig", "TrainSettings", "hidden_state_loss", "kd_loss", "shift_for_causal_lm"]
