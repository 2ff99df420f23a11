"""On-disk formats: our safetensors checkpoint, Hugging Face integration, (later) GGUF and others."""
