"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss.

The kernel is plain tensors in, plain tensors out: ``W [out, in]`` and ``H = 2/n Σ x xᵀ [in, in]``
(accumulated by :class:`HessianAccumulator` from the layer's calibration inputs) give integer
codes, scales and zero points in the layout of :mod:`squeeze.quant.rtn`, so a GPTQ layer is stored
and dequantized exactly like a round-to-nearest one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeeze.quant.rtn import compute_qparams
from squeeze.quant.scheme import QuantArgs

MAX_DAMP_RETRIES = 6


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` over every input row a Linear layer sees (float32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        total = self.rows + x.shape[0]
        self.hessian.mul_(self.rows / total)
        self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.rows = total


@dataclass(frozen=True)
class GPTQResult:
    codes: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # shaped as compute_qparams returns for the strategy
    zero_point: torch.Tensor
    damp: float  # the damping finally added to H's diagonal, as a fraction of its mean
    retries: int  # times the Cholesky factorisation failed and the damping was raised tenfold
    row_loss: torch.Tensor  # per output row, Σ_j (w − ŵ)² / [H⁻¹]_jj² / 2: GPTQ's estimate of its output error

    @property
    def loss(self) -> float:
        return float(self.row_loss.sum())


def _inverse_cholesky(hessian: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of H⁻¹ after damping; raise the damping tenfold until it factorises."""
    mean_diag = float(torch.diag(hessian).mean())
    damp = damp_percent
    for retry in range(MAX_DAMP_RETRIES + 1):
        damped = hessian + torch.eye(hessian.shape[0], device=hessian.device) * damp * mean_diag
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp, retry
        damp *= 10
    raise ArithmeticError(f"the Hessian is not positive definite even with damping {damp / 10:g}")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    block_size: int = 128,
    damp_percent: float = 0.01,
    act_order: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` [out, in] with GPTQ against ``hessian`` [in, in].

    ``act_order`` quantizes columns in order of decreasing Hessian diagonal (the inputs with the
    most energy first); group scales are then computed up front from the original weight so the
    groups keep their contiguous layout (compressed-tensors' ``actorder: weight``). Without it,
    a group's scale is computed when its first column is reached, from the error-updated weights.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out_features, in_features = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    group_size = args.group_size if args.strategy == "group" else None
    if group_size:
        block_size = max(group_size, (block_size // group_size) * group_size)
        n_groups = in_features // group_size
        scale_dtype = getattr(torch, args.scale_dtype or "float32")
        scale = torch.empty(out_features, n_groups, dtype=scale_dtype, device=w.device)
        zero_point = torch.empty(out_features, n_groups, dtype=torch.int8, device=w.device)
    else:
        scale, zero_point = compute_qparams(w, args)

    channel_args = QuantArgs(num_bits=args.num_bits, symmetric=args.symmetric, strategy="channel",
                             scale_dtype=args.scale_dtype)

    def set_group(g: int, columns: torch.Tensor) -> None:
        s, z = compute_qparams(columns, channel_args)
        scale[:, g] = s[:, 0]
        zero_point[:, g] = z[:, 0]

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features, device=w.device)
    if act_order and group_size:
        for g in range(n_groups):
            set_group(g, w[:, g * group_size : (g + 1) * group_size])
    w = w[:, perm]
    h = h[perm][:, perm]
    h_inv, damp, retries = _inverse_cholesky(h, damp_percent)

    codes = torch.zeros(out_features, in_features, dtype=torch.int8, device=w.device)
    row_loss = torch.zeros(out_features, dtype=torch.float64, device=w.device)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_inv_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = int(perm[start + i])
            if group_size:
                g = column // group_size
                if not act_order and column % group_size == 0:
                    set_group(g, block[:, i : i + group_size])
                s, z = scale[:, g].float(), zero_point[:, g].float()
            else:
                s = scale.float().reshape(-1).expand(out_features) if scale.numel() == 1 else scale[:, 0].float()
                z = zero_point.float().reshape(-1).expand(out_features) if zero_point.numel() == 1 else zero_point[:, 0].float()
            x = block[:, i]
            q = torch.clamp(torch.round(x / s + z), args.qmin, args.qmax)
            codes[:, column] = q.to(torch.int8)
            x_hat = (q - z) * s
            d = h_inv_block[i, i]
            err = (x - x_hat) / d
            row_loss += ((x - x_hat) ** 2 / d**2 / 2).double()
            block[:, i:] -= err.unsqueeze(1) * h_inv_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return GPTQResult(codes=codes, scale=scale, zero_point=zero_point, damp=damp, retries=retries, row_loss=row_loss.cpu())
