"""Inference runtime for compressed models: a lean static-cache decoder (:mod:`.decoder`) over
linear layers bound once to their kernels (:mod:`.kernels`)."""

from .decoder import Decoder, UnsupportedModelError, generate

__all__ = ["Decoder", "UnsupportedModelError", "generate"]
