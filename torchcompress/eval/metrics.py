"""Tensor error metrics between a reference ``x`` and an approximation ``y`` (computed in float64)."""

from __future__ import annotations

import math

import torch


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x.detach().double().flatten(), y.detach().double().flatten()


def mse(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = _pair(x, y)
    return float(((x - y) ** 2).mean())


def rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    return math.sqrt(mse(x, y))


def psnr(x: torch.Tensor, y: torch.Tensor, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB. ``peak`` defaults to ``max|x|`` of the *reference* (weights
    and activations have no fixed data range like 255 for images). Identical tensors give +inf."""
    e = mse(x, y)
    if peak is None:
        peak = float(x.detach().abs().max()) if x.numel() else 0.0
    if e == 0:
        return math.inf
    if peak == 0:
        return -math.inf
    return 10.0 * math.log10(peak * peak / e)


def sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``20*log10(||x|| / ||x - y||)`` in dB (+inf when equal)."""
    x, y = _pair(x, y)
    noise = float(torch.linalg.vector_norm(x - y))
    signal = float(torch.linalg.vector_norm(x))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)


def cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = _pair(x, y)
    nx, ny = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y))
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return float(x @ y) / (nx * ny)


def sqnr_and_mse(x: torch.Tensor, y: torch.Tensor, chunk: int = 1 << 22) -> tuple[float, float]:
    """:func:`sqnr` and :func:`mse` together, in float64 over 4M values at a time: a whole 8B-model
    MLP weight in float64 is 470 MB per copy, and the two functions make three copies each."""
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    xf, yf = x.detach().reshape(-1), y.detach().reshape(-1)
    signal = noise = 0.0
    for i in range(0, xf.numel(), chunk):
        a, b = xf[i: i + chunk].double(), yf[i: i + chunk].double()
        signal += float(a.square().sum())
        noise += float((a - b).square().sum())
    n = max(xf.numel(), 1)
    if noise == 0:
        return math.inf, 0.0
    if signal == 0:
        return -math.inf, noise / n
    return 10 * math.log10(signal / noise), noise / n
