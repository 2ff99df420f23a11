"""Layer-by-layer GPTQ (kept for existing imports): see :mod:`torchcompress.quant.gptq`, which runs it
on the block pipeline (:mod:`torchcompress.pipeline`)."""

from ..quant.gptq import gptq_model  # noqa: F401
