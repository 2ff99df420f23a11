"""Pure tensor math: tensors in, tensors out. No hooks, no logging, no device moves."""
