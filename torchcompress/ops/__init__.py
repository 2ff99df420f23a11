"""One dispatch point per op family. See :mod:`torchcompress.ops.int_linear`."""

from .backend import Backend, selected_backend  # noqa: F401
