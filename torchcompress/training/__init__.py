"""Training-time compression: plain-loop hooks, Hugging Face Trainer integration (training.hf), schedules.

Kept lean: importing this package imports neither transformers nor accelerate.
"""
