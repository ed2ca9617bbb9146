"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

For a Linear layer fed by a norm, per input channel j:
``s_j = max|X_j|^α / max|W_j|^(1−α)``; the norm's weight (and bias) is divided by ``s`` and the
column j of every Linear it feeds is multiplied by ``s_j``. The product ``(X / s)(s W)ᵀ`` is
unchanged, so the model computes the same function, but the activations are flatter and quantize
to 8 bits with less error. The kernel below works on plain tensors; the pass applies it to the
folds :mod:`squeeze.calib.folds` finds and proves in each block (a norm, or a Linear layer whose
output reaches its readers through linear operations only).
"""

from __future__ import annotations

import torch


def smoothing_factors(activation_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` per input channel (``weights`` are [out, in], sharing inputs)."""
    weight_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    factors = activation_max.float().clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    # channels that never fire or have no weight keep factor 1 rather than a meaningless extreme
    dead = (activation_max == 0) | (weight_max == 0)
    return torch.where(dead, torch.ones_like(factors), factors)
