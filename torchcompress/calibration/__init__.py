"""Calibration data and the layer-by-layer calibration runner (GPTQ and other activation-aware techniques)."""

from .data import CalibrationConfig, CalibrationSet, build_calibration, parse_sources
from .sources import CalibrationDataError
from .selfgen import SelfGenConfig

__all__ = ["CalibrationConfig", "CalibrationSet", "CalibrationDataError", "SelfGenConfig", "build_calibration",
           "parse_sources"]
