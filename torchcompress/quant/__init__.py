"""Per-technique configs and transforms (GGUF block quantization, ...)."""
