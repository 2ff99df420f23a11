"""Evaluation: tensor metrics, perplexity, KL divergence / top-1 agreement, sizes."""

from .metrics import cosine_similarity, mse, psnr, rmse, sqnr  # noqa: F401
