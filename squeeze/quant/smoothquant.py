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

from squeeze.quant.rtn import fake_quantize
from squeeze.quant.scheme import QuantArgs


def smoothing_factors(activation_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` per input channel (``weights`` are [out, in], sharing inputs)."""
    weight_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    factors = activation_max.float().clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    # channels that never fire or have no weight keep factor 1 rather than a meaningless extreme
    dead = (activation_max == 0) | (weight_max == 0)
    return torch.where(dead, torch.ones_like(factors), factors)


@torch.no_grad()
def alpha_search(
    x: torch.Tensor,
    activation_max: torch.Tensor,
    weights: list[torch.Tensor],
    weight_args: QuantArgs,
    act_args: QuantArgs,
    alphas: tuple[float, ...],
) -> tuple[torch.Tensor, float | None, float]:
    """The smoothing factors, among those of ``alphas`` and none at all, that give the fold's layers
    the smallest W8A8 output error ``Σ ‖x Wᵀ − Q(x / s) Q(W·s)ᵀ‖²`` on the rows ``x`` [n, in].

    ``activation_max`` is the per-channel input maximum over all the calibration text (the factors'
    formula); ``x`` a sample of its rows. Activations are fake-quantized as the scheme does (a
    static per-tensor scale is stood in for by the sample's own range). Returns (factors, the
    alpha, or None when not smoothing was best, and that error); ties keep the earlier candidate.
    """
    x = x.float()
    weights = [w.detach().float() for w in weights]
    exact = [x @ w.T for w in weights]

    def error(factors: torch.Tensor) -> float:
        xq = fake_quantize(x / factors, act_args)
        return sum(float((e - xq @ fake_quantize(w * factors, weight_args).T).square().sum()) for e, w in zip(exact, weights))

    best = torch.ones_like(activation_max, dtype=torch.float32)
    best_alpha: float | None = None
    best_error = error(best)
    for alpha in alphas:
        factors = smoothing_factors(activation_max, weights, alpha)
        candidate = error(factors)
        if candidate < best_error:
            best, best_alpha, best_error = factors, alpha, candidate
    return best, best_alpha, best_error
