"""Triton kernels (CUDA; tested on CPU under ``TRITON_INTERPRET=1``). Imported lazily: never by
``import torchcompress``, only by :mod:`torchcompress.ops.fastpath` on the first CUDA call."""
