"""``import torchcompress.hf`` registers the torchcompress quantization method with transformers."""

from .formats.hf import register

register()
