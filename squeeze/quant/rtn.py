"""Round-to-nearest: scales and zero points from min/max, quantize, dequantize.

The arithmetic matches compressed-tensors exactly, so a checkpoint written by squeeze and
dequantized by transformers/vLLM gives the same numbers squeeze evaluated:

- the range always contains 0 (min ≤ 0 ≤ max), so zero is exactly representable;
- symmetric: ``scale = max|x| / ((qmax - qmin) / 2)``, zero point 0; with ``signed_scale``
  (llama.cpp's Q4_0 / Q8_0 grid) ``scale = m / qmin`` for the largest-magnitude value ``m`` with
  its sign, so ``m`` is exactly the code qmin and the scale is negative when ``m`` is positive;
- asymmetric: ``scale = (max - min) / (qmax - qmin)``, ``zero_point = round(qmin - min / scale)``;
- ``q = clamp(round(x / scale + zero_point), qmin, qmax)``; ``x̂ = (q - zero_point) · scale``.

When scales are stored in a narrower dtype (``scale_dtype``, float16 by default for weights), the
scale is rounded *down* to a representable value and the zero point and codes are computed from
the stored scale. Rounding down keeps what the exact symmetric scale does at the extremes: -max|x|
lands on -7.5 (int4) and rounds to the code -8, represented almost exactly, as it is with a float32
scale (rounding up would push it to -7, a full half-step off, on the weights that matter most).
The price is a sliver of clamping at the other end: every element's error is at most
``stored/2 + (qmax - qmin) · (exact - stored)``, and ``exact - stored`` is below 2⁻¹¹ of the
scale for float16.
"""

from __future__ import annotations

import torch

from squeeze.quant.scheme import QuantArgs


def _reduce_minmax(x: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the slices that share one scale, shaped like the stored scale."""
    if args.strategy == "tensor":
        lo, hi = torch.aminmax(x)
        return lo.reshape(1), hi.reshape(1)
    if args.strategy == "channel":
        # weight [out, in]: one value per output row
        return x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    if args.strategy == "group":
        grouped = _grouped(x, args.group_size)
        return grouped.amin(dim=-1), grouped.amax(dim=-1)
    # token: one value per token of an activation [..., hidden]
    return x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    assert group_size is not None
    if x.shape[-1] % group_size:
        raise ValueError(f"input dimension {x.shape[-1]} is not a multiple of group size {group_size}")
    return x.unflatten(-1, (x.shape[-1] // group_size, group_size))


def qparams_from_minmax(
    lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float, dtype of ``lo``) and zero point (int8) from observed minima and maxima."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    qrange = float(args.qmax - args.qmin)
    if args.symmetric and args.signed_scale:
        # the largest-magnitude value, with its sign, lands on qmin exactly
        scale = torch.where(lo.abs() >= hi, lo, hi) / args.qmin
        zero_point = torch.zeros_like(scale)
    elif args.symmetric:
        scale = torch.maximum(lo.abs(), hi) / (qrange / 2)
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / qrange
        zero_point = torch.clamp(args.qmin - lo / scale, args.qmin, args.qmax)
    # an all-zero slice would divide by zero; any positive scale represents it exactly
    eps = torch.finfo(scale.dtype).eps
    scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
    if args.scale_dtype is not None:
        narrow = _round_down_to(scale.abs(), getattr(torch, args.scale_dtype))  # toward zero: a signed scale keeps its sign
        scale = torch.where(scale < 0, -narrow, narrow)
        if not args.symmetric:
            zero_point = torch.clamp(args.qmin - lo / scale.to(lo.dtype), args.qmin, args.qmax)
    zero_point = torch.nan_to_num(zero_point, nan=0.0)
    return scale, torch.round(zero_point).to(torch.int8)


def _round_down_to(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` in ``dtype``, never larger than the exact value (unless that underflows to zero)."""
    narrow = scale.to(dtype)
    too_large = narrow.to(scale.dtype) > scale
    narrow = torch.where(too_large, torch.nextafter(narrow, torch.zeros_like(narrow)), narrow)
    return torch.clamp(narrow, min=torch.finfo(dtype).tiny)


def compute_qparams(x: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale and zero point for ``x`` (a weight [out, in] or activations [..., in]).

    Shapes follow compressed-tensors: tensor ``(1,)``, channel ``(out, 1)``, group
    ``(out, in // group_size)``, token ``(..., 1)``.
    """
    lo, hi = _reduce_minmax(x.detach(), args)
    return qparams_from_minmax(lo, hi, args)


def _broadcast(param: torch.Tensor, x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Expand a per-group parameter [out, groups] to the weight's shape [out, in]."""
    if args.strategy == "group":
        return param.repeat_interleave(args.group_size, dim=-1)
    return param


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Integer codes of ``x`` as int8, in [qmin, qmax]."""
    s = _broadcast(scale, x, args).to(x.dtype)
    z = _broadcast(zero_point, x, args).to(x.dtype)
    return torch.clamp(torch.round(x / s + z), args.qmin, args.qmax).to(torch.int8)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Real values ``(q - zero_point) · scale`` in ``dtype`` (default: the scale's dtype)."""
    dtype = dtype or scale.dtype
    if args.strategy == "group" and q.dim() == 2 and q.shape[1] == scale.shape[-1] * args.group_size:
        # per group, without expanding scale and zero point to the weight's shape: the same products
        rows = q.shape[0]
        grouped = q.reshape(rows, -1, args.group_size).to(dtype)
        return ((grouped - zero_point.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)).reshape(q.shape)
    s = _broadcast(scale, q, args).to(dtype)
    z = _broadcast(zero_point, q, args).to(dtype)
    return (q.to(dtype) - z) * s


def fake_quantize(x: torch.Tensor, args: QuantArgs, scale: torch.Tensor | None = None,
                  zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``x``; scales are computed from ``x`` itself unless given (static)."""
    if scale is None or zero_point is None:
        scale, zero_point = compute_qparams(x, args)
    s = _broadcast(scale, x, args).to(x.dtype)
    z = _broadcast(zero_point, x, args).to(x.dtype)
    q = torch.clamp(torch.round(x / s + z), args.qmin, args.qmax)
    return (q - z) * s
