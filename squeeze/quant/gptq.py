"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss.

The kernel is plain tensors in, plain tensors out: ``W [out, in]`` and ``H = 2/n Σ x xᵀ [in, in]``
(accumulated by :class:`squeeze.calib.observers.HessianAccumulator` from the layer's calibration
inputs) give integer codes, scales and zero points in the layout of :mod:`squeeze.quant.rtn`, so a
GPTQ layer is stored and dequantized exactly like a round-to-nearest one.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass

import torch

from squeeze.quant.rtn import compute_qparams, qparams_from_minmax
from squeeze.quant.scheme import QuantArgs

MAX_DAMP_RETRIES = 6
SUB_BLOCK = 16  # columns whose errors are applied one by one; block_size ones are deferred by a matmul
CLIP_LOWEST = 0.4  # the smallest fraction of a row's range the clip search tries


def relative_output_error(diff: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``‖ΔW X‖ / ‖W X‖ = sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))`` for a layer whose inputs X gave ``hessian``."""
    h = hessian.to(diff.device).float()
    diff, weight = diff.float(), weight.float()
    return float((((diff @ h) * diff).sum() / ((weight @ h) * weight).sum().clamp_min(1e-30)).clamp_min(0).sqrt())


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
            # H⁻¹ = L⁻ᵀ L⁻¹ from a triangular solve: torch.cholesky_inverse is ~50x slower on CPU
            eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
            factor_inv = torch.linalg.solve_triangular(factor, eye, upper=False)
            inverse = factor_inv.t() @ factor_inv
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp, retry
        damp *= 10
    raise ArithmeticError(f"the Hessian is not positive definite even with damping {damp / 10:g}")


def search_clip(
    x: torch.Tensor, importance: torch.Tensor, args: QuantArgs, steps: int, lowest: float = CLIP_LOWEST,
    refit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point for ``x`` [out, n] (``args`` per-channel): the row's min/max
    shrunk by the factor in ``steps`` + 1 even steps from 1 down to ``lowest`` that minimises
    ``Σ_j importance_j (x_j − x̂_j)²``, the rounding error weighted by each column's input energy
    (the Hessian's diagonal). Ties keep the larger range; ``steps`` 0 is plain min/max.

    ``refit``: each shrunk range's scale is first refitted to its own codes by weighted least
    squares (``Σ w x q / Σ w q²``, the zero point kept), as llama.cpp's importance-matrix quantizer
    does; the candidate is then scored by rounding with the refitted scale, so a refit that moves
    codes is judged on the codes it gives."""
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    best_scale, best_zero = qparams_from_minmax(lo, hi, args)
    if steps <= 0:
        return best_scale, best_zero
    weights = importance.reshape(1, -1).float()

    def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        s, z = scale.float(), zero.float()
        q = torch.clamp(torch.round(x / s + z), args.qmin, args.qmax)
        return ((x - (q - z) * s).pow(2) * weights).sum(dim=1, keepdim=True)

    def refitted(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        s, z = scale.float(), zero.float()
        q = torch.clamp(torch.round(x / s + z), args.qmin, args.qmax) - z
        den = (q * q * weights).sum(dim=1, keepdim=True)
        fit = (q * x * weights).sum(dim=1, keepdim=True) / den.clamp_min(1e-30)
        if args.scale_dtype is not None:  # the value that will be stored
            fit = fit.to(getattr(torch, args.scale_dtype)).float()
        return torch.where((den > 0) & (fit != 0), fit, s).to(scale.dtype)

    best = error(best_scale, best_zero)
    for k in range(1, steps + 1):
        factor = 1.0 - (1.0 - lowest) * k / steps
        scale, zero = qparams_from_minmax(lo * factor, hi * factor, args)
        if refit:
            scale = refitted(scale, zero)
        err = error(scale, zero)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _group_aware_order(diagonal: torch.Tensor, group_size: int) -> torch.Tensor:
    """Column order keeping each group's columns together: groups by their largest diagonal entry,
    columns within a group by theirs, both descending (ties in index order)."""
    grouped = diagonal.reshape(-1, group_size)
    within = torch.argsort(grouped, dim=1, descending=True, stable=True)
    groups = torch.argsort(grouped.amax(dim=1), descending=True, stable=True)
    columns = within + torch.arange(grouped.shape[0], device=diagonal.device)[:, None] * group_size
    return columns[groups].reshape(-1)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    block_size: int = 128,
    damp_percent: float = 0.01,
    act_order: bool = False,
    zeros: torch.Tensor | None = None,
    group_aware: bool = False,
    clip_steps: int = 0,
    clip_refit: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` [out, in] with GPTQ against ``hessian`` [in, in].

    ``act_order`` quantizes columns in order of decreasing Hessian diagonal (the inputs with the
    most energy first); group scales are then computed up front from the original weight so the
    groups keep their contiguous layout (compressed-tensors' ``actorder: weight``). Without it,
    a group's scale is computed when its first column is reached, from the error-updated weights.
    ``group_aware`` (with ``act_order`` and per-group scales) orders whole groups instead, by their
    largest Hessian diagonal, and the columns within each group by theirs: a group's columns are
    quantized together, so its scale can wait for the error-updated weights as without
    ``act_order``, while the inputs with the most energy still go first (group-aware reordering,
    Gafni et al., 2025).

    ``zeros`` (bool ``[out, in]``) marks weights that must stay exactly zero, e.g. pruned ones: each
    is stored as the code of zero, and whatever the updates of earlier columns pushed onto it is
    passed on to the later columns as its error (pruning it again, as SparseGPT does).

    ``clip_steps`` > 0 (per-channel and per-group scales) picks each scale from that many shrunk
    ranges by :func:`search_clip`, weighting each column's rounding error by its Hessian diagonal,
    instead of the plain min/max; ``clip_refit`` refits each tried scale by least squares first.
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
    channel_args = dataclasses.replace(args, strategy="channel", group_size=None)  # one group's scales, as a channel's

    energy = torch.diag(h)  # the columns' input energy, in the original order
    if not group_size:
        if args.strategy == "channel":
            scale, zero_point = search_clip(w, energy, channel_args, clip_steps, refit=clip_refit)
        else:
            scale, zero_point = compute_qparams(w, args)

    def set_group(g: int, columns: torch.Tensor, importance: torch.Tensor) -> None:
        s, z = search_clip(columns, importance, channel_args, clip_steps, refit=clip_refit)
        scale[:, g] = s[:, 0]
        zero_point[:, g] = z[:, 0]

    group_aware = bool(group_aware and act_order and group_size)
    if group_aware:
        perm = _group_aware_order(torch.diag(h), group_size)
    elif act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(in_features, device=w.device)
    static_groups = act_order and not group_aware  # scales fixed up front from the original weight
    if static_groups and group_size:
        for g in range(n_groups):
            set_group(g, w[:, g * group_size : (g + 1) * group_size], energy[g * group_size : (g + 1) * group_size])
    w = w[:, perm]
    h = h[perm][:, perm]
    zeros_t = zeros[:, perm].t().contiguous().to(w.device) if zeros is not None and bool(zeros.any()) else None
    h_inv, damp, retries = _inverse_cholesky(h, damp_percent)
    order = perm.tolist()

    # per-column scale and zero point as float32 columns, fetched once per group (or once in all)
    def column_params(g: int) -> tuple[torch.Tensor, torch.Tensor]:
        return scale[:, g].float(), zero_point[:, g].float()

    if not group_size:
        s_all = scale.float().reshape(-1).expand(out_features) if scale.numel() == 1 else scale[:, 0].float()
        z_all = zero_point.float().reshape(-1).expand(out_features) if zero_point.numel() == 1 else zero_point[:, 0].float()
    symmetric = args.symmetric

    codes = torch.zeros(out_features, in_features, dtype=torch.int8, device=w.device)
    row_loss = torch.zeros(out_features, dtype=torch.float64, device=w.device)
    # Work on the transpose, one contiguous row per input column, and defer updates at two levels
    # (exact, as in GPTQ's lazy batch updates): a column's error reaches the rest of its sub-block
    # at once, the rest of its block after the sub-block, and the later blocks after the block.
    wt = w.t().contiguous()
    cached_group, s, z = -1, None, None
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = wt[start:end].clone()  # [width, out]
        errors = torch.empty_like(block)
        quantized = torch.empty_like(block)
        h_inv_block = h_inv[start:end, start:end]
        diagonal = torch.diagonal(h_inv_block).tolist()
        width = end - start
        for sub in range(0, width, SUB_BLOCK):
            sub_end = min(sub + SUB_BLOCK, width)
            for i in range(sub, sub_end):
                column = order[start + i]
                if group_size:
                    g = column // group_size
                    if not static_groups and (start + i) % group_size == 0:  # a group's first column
                        columns = block[i : i + group_size]
                        if zeros_t is not None:  # the range of the weights that will be stored
                            columns = columns.masked_fill(zeros_t[start + i : start + i + group_size], 0)
                        set_group(g, columns.t(), energy[perm[start + i : start + i + group_size]])
                        cached_group = -1
                    if g != cached_group:
                        s, z = column_params(g)
                        cached_group = g
                else:
                    s, z = s_all, z_all
                x = block[i]
                q = torch.div(x, s)
                if not symmetric:
                    q.add_(z)
                q.round_().clamp_(args.qmin, args.qmax)
                if zeros_t is not None:
                    q = torch.where(zeros_t[start + i], z if not symmetric else 0.0, q)
                quantized[i] = q
                x_hat = (q - z).mul_(s) if not symmetric else q.mul_(s)
                err = x.sub(x_hat).div_(diagonal[i])
                errors[i] = err
                if i + 1 < sub_end:
                    block[i + 1 : sub_end].addr_(h_inv_block[i, i + 1 : sub_end], err, alpha=-1)
            if sub_end < width:
                block[sub_end:].sub_(h_inv_block[sub:sub_end, sub_end:].t() @ errors[sub:sub_end])
        codes[:, perm[start:end]] = quantized.t().to(torch.int8)
        # (w − ŵ)² / d² per column is exactly err², so the loss needs no work inside the loop
        row_loss += errors.double().pow(2).sum(dim=0) / 2
        wt[end:] -= h_inv[start:end, end:].t() @ errors
    return GPTQResult(codes=codes, scale=scale, zero_point=zero_point, damp=damp, retries=retries, row_loss=row_loss)
