"""AutoRound-style learned rounding: SignRound (Cheng et al., 2023, "Optimize weight rounding via
signed gradient descent for the quantization of LLMs").

Round-to-nearest rounds every weight on its own, but what a model computes is a block's output.
AutoRound learns, for every weight, an offset ``V`` in [-0.5, 0.5] added before rounding (so each
weight may round up or down rather than to nearest) and, per scale group, a factor in
[``min_clip``, 1] on each end of the min-max range (on ``max|w|`` when symmetric on the balanced
grid; on each end again with signed scales, so that clipping the larger end can hand the code
``qmin`` to the other end's sign), by making a
transformer block's output with fake-quantized weights match its original output
(mean squared error). Rounding passes gradients straight through. The steps are signed,
``p ← p − lr · sign(∂L/∂p)`` with ``lr`` decaying linearly to zero: each parameter moves at
most ``lr · T / 2`` in ``T`` steps (0.5, the width of the offset's range, with the paper's
``lr = 1 / T``) whatever the size of its gradient, which differs by orders of magnitude between
layers and blocks.

The scale and zero point come from the clipped range by round-to-nearest's own rules
(:func:`squeeze.quant.rtn.qparams_from_minmax`, the stored scale dtype and the integer zero point
included), and the forward uses them as stored; the clip factors get their gradient through the
same formulas unrounded (straight through). So a zero offset and unit clip factors are
round-to-nearest, code for code, and the final rounding is exactly what the last forward saw.

:func:`learn_rounding` never walks a model: the caller gives it the weights and a loss over
fake-quantized weights and a calibration batch (squeeze.quant.methods.autoround builds it from a
block and its original outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from squeeze.quant.rtn import qparams_from_minmax
from squeeze.quant.scheme import QuantArgs


def _grouped(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``x`` [out, in] as ``[rows, groups, size]``: one slice per stored scale (a view)."""
    if args.strategy == "group":
        assert args.group_size is not None
        if x.shape[-1] % args.group_size:
            raise ValueError(f"input dimension {x.shape[-1]} is not a multiple of group size {args.group_size}")
        return x.unflatten(-1, (x.shape[-1] // args.group_size, args.group_size))
    if args.strategy == "channel":
        return x.unsqueeze(1)
    raise ValueError(f"AutoRound learns per-channel or per-group weight scales, not per-{args.strategy}")


@dataclass
class Rounding:
    """What AutoRound learns for one weight [out, in]: the rounding ``offset`` [out, in] and the
    clip factors [rows, groups] of the range's maximum (of ``max|w|`` when symmetric on the
    balanced grid) and, when asymmetric or with signed scales, of its minimum; all float32. None
    for a factor that is not learned (1)."""

    offset: torch.Tensor
    clip_max: torch.Tensor | None
    clip_min: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.offset, self.clip_max, self.clip_min) if t is not None]

    def copy(self) -> Rounding:
        return Rounding(*(t.detach().clone() if t is not None else None for t in (self.offset, self.clip_max, self.clip_min)))


def round_to_nearest(weight: torch.Tensor, args: QuantArgs, learn_clip: bool = True) -> Rounding:
    """The starting point: zero offsets and unit clip factors (round-to-nearest), ready for gradients."""
    ones = torch.ones(_grouped(weight, args).shape[:2], device=weight.device)
    clip_max = ones.clone().requires_grad_() if learn_clip else None
    # a signed scale comes from whichever end is larger once clipped: each end gets its own factor
    two_ends = not args.symmetric or args.signed_scale
    clip_min = ones.clone().requires_grad_() if learn_clip and two_ends else None
    return Rounding(torch.zeros(weight.shape, device=weight.device).requires_grad_(), clip_max, clip_min)


def _qparams(w: torch.Tensor, rounding: Rounding, args: QuantArgs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [rows, groups] of grouped ``w``'s clipped range: the values
    round-to-nearest stores for that range (range and scale in ``dtype``, the weight's, as RTN
    computes them), the gradient of the unrounded formulas."""
    lo = w.amin(-1).clamp(max=0).float()
    hi = w.amax(-1).clamp(min=0).float()
    if rounding.clip_max is not None:
        hi = hi * rounding.clip_max
        lo = lo * (rounding.clip_max if rounding.clip_min is None else rounding.clip_min)
    with torch.no_grad():
        stored_scale, stored_zero = qparams_from_minmax(lo.to(dtype), hi.to(dtype), args)
    qrange = float(args.qmax - args.qmin)
    if args.symmetric and args.signed_scale:
        scale = torch.where(-lo >= hi, lo, hi) / args.qmin
        zero = torch.zeros_like(scale)
    elif args.symmetric:
        scale = torch.maximum(-lo, hi) / (qrange / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / qrange
        zero = args.qmin - lo / torch.where(scale > 0, scale, torch.ones_like(scale))
    # the stored values forward (exactly: ``x - x.detach()`` is 0), the unrounded formulas' gradient backward
    return stored_scale.float() + (scale - scale.detach()), stored_zero.float() + (zero - zero.detach())


def _offset(w: torch.Tensor, rounding: Rounding, args: QuantArgs) -> torch.Tensor:
    """The grouped offset, zero where the weight is exactly zero: a pruned weight's code is then
    its zero point, which dequantizes to exactly zero."""
    return _grouped(rounding.offset, args) * (w != 0)


def fake_quantize(weight: torch.Tensor, rounding: Rounding, args: QuantArgs) -> torch.Tensor:
    """``s · (clamp(round(w / s + z + V), qmin, qmax) − z)`` in float32 [out, in], differentiable
    in ``rounding`` (rounding passes the gradient straight through)."""
    w = _grouped(weight.detach(), args)
    scale, zero = _qparams(w, rounding, args, weight.dtype)
    x = w.float() / scale[..., None] + zero[..., None] + _offset(w, rounding, args)
    q = (torch.round(x).detach() + (x - x.detach())).clamp(args.qmin, args.qmax)
    return ((q - zero[..., None]) * scale[..., None]).flatten(1)


@torch.no_grad()
def round_weight(weight: torch.Tensor, rounding: Rounding, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int8 codes [out, in] in [qmin, qmax], the scale and the int8 zero point, in the shapes and
    dtypes of :func:`squeeze.quant.rtn.compute_qparams`: round-to-nearest's exactly when the
    offset is zero and the clip factors one (``w / s + z`` is computed in the weight's dtype, as
    :func:`squeeze.quant.rtn.quantize` does, then the offset added)."""
    w = _grouped(weight.detach(), args)
    scale, zero = _qparams(w, rounding, args, weight.dtype)
    scale = scale.to(_stored_dtype(weight, args))
    x = (w / scale[..., None].to(w.dtype) + zero[..., None].to(w.dtype)).float() + _offset(w, rounding, args)
    codes = torch.round(x).clamp_(args.qmin, args.qmax).flatten(1)
    return codes.to(torch.int8), scale, zero.to(torch.int8)


def _stored_dtype(weight: torch.Tensor, args: QuantArgs) -> torch.dtype:
    return getattr(torch, args.scale_dtype) if args.scale_dtype is not None else weight.dtype


@torch.no_grad()
def _signed_step(rounding: Rounding, grads: list[torch.Tensor], lr: float, min_clip: float) -> None:
    """``p ← p − lr · sign(g)``, then back into the parameter's range."""
    for tensor, grad in zip(rounding.tensors(), grads):
        tensor.sub_(torch.sign(grad), alpha=lr)
    rounding.offset.clamp_(-0.5, 0.5)
    for clip in (rounding.clip_max, rounding.clip_min):
        if clip is not None:
            clip.clamp_(min_clip, 1.0)


@dataclass(frozen=True)
class Learned:
    """The parameters kept for each weight, and why: the mean loss over every calibration batch of
    round-to-nearest and of the kept parameters, and the step they come from (0: round-to-nearest,
    ``iterations``: the last update's)."""

    rounding: dict[str, Rounding]
    rtn_loss: float
    loss: float
    step: int


Loss = Callable[[dict[str, torch.Tensor], int], torch.Tensor]


def learn_rounding(
    weights: dict[str, torch.Tensor],
    args: QuantArgs,
    loss: Loss,
    batches: int,
    iterations: int = 200,
    lr: float | None = None,
    batch: int = 1,
    learn_clip: bool = True,
    min_clip: float = 0.5,
    seed: int = 0,
) -> Learned:
    """Learn the rounding of ``weights`` (name → [out, in]) jointly, by signed gradient descent on
    ``loss(fake_weights, index)``: the error, a scalar tensor, of calibration batch ``index`` (of
    ``batches``) with the weights fake-quantized (float32, name → [out, in]).

    Each of ``iterations`` steps draws ``batch`` batches at random (seeded by ``seed``) and moves
    every parameter by ``lr`` (default ``1 / iterations``, decaying linearly to 0) against the sign
    of its gradient. Every step's parameters, and the last update's on one more draw, are scored
    by their draw's loss relative to round-to-nearest's on the same batches: batches differ in
    difficulty by more than neighbouring steps do, so raw minibatch losses would mostly rank the
    draws. The best scored is kept if its mean loss over all ``batches`` is below
    round-to-nearest's, else round-to-nearest: never a higher loss than round-to-nearest's on the
    calibration text, at the price of one pass over it (scoring every candidate on all of it
    would cost one per candidate).
    """
    rounding = {name: round_to_nearest(w, args, learn_clip) for name, w in weights.items()}
    leaves = [t for r in rounding.values() for t in r.tensors()]

    def error(params: dict[str, Rounding], index: int) -> torch.Tensor:
        return loss({name: fake_quantize(w, params[name], args) for name, w in weights.items()}, index)

    with torch.no_grad():
        baseline = [float(error(rounding, i)) for i in range(batches)]
    rtn_loss = sum(baseline) / batches
    start = {name: r.copy() for name, r in rounding.items()}
    best, best_ratio, best_step = start, 1.0, 0
    lr = lr if lr is not None else 1.0 / max(iterations, 1)
    generator = torch.Generator().manual_seed(seed)
    for step in range(iterations + 1 if iterations else 0):
        chosen = torch.randperm(batches, generator=generator)[:batch].tolist()
        learning = step < iterations  # the last draw only scores the last update
        grads = [torch.zeros_like(t) for t in leaves]
        total = 0.0
        for index in chosen:
            # one batch's graph at a time: the gradients of the sum are summed
            with torch.enable_grad() if learning else torch.no_grad():
                value = error(rounding, index) / len(chosen)
                if learning:
                    for grad, part in zip(grads, torch.autograd.grad(value, leaves, allow_unused=True)):
                        if part is not None:
                            grad.add_(part)
            total += float(value.detach())
        ratio = total * len(chosen) / max(sum(baseline[i] for i in chosen), 1e-30)
        if ratio < best_ratio:
            best, best_ratio, best_step = {name: r.copy() for name, r in rounding.items()}, ratio, step
        if learning:
            rate = lr * (1 - step / iterations)
            position = 0
            for r in rounding.values():
                count = len(r.tensors())
                _signed_step(r, grads[position:position + count], rate, min_clip)
                position += count

    if best_step:
        with torch.no_grad():
            loss_kept = sum(float(error(best, i)) for i in range(batches)) / batches
        if loss_kept < rtn_loss:
            return Learned(best, rtn_loss, loss_kept, best_step)
    return Learned(start, rtn_loss, rtn_loss, 0)
