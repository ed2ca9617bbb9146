"""HQQ: half-quadratic quantization (Badri & Shaji, 2023), calibration-free, weight-only.

Per group of weights, HQQ fits the quantization parameters to the weight itself, against a
sparsity-promoting error ``Σ |W − Ŵ|^p`` with ``p < 1``: a few large errors cost less than many
small ones, so the grid follows the bulk of the group rather than its outliers. Half-quadratic
splitting makes that tractable by carrying the error as an extra variable E and alternating

1. codes ``q = clamp(round(W / s + z), qmin, qmax)``;
2. the error ``E = shrink_p(W − s(q − z))``, the generalised soft-threshold
   ``sign(x) · relu(|x| − |x|^(p−1) / β)``;
3. the group's parameters by least squares on the part of the weight the error does not explain,
   ``W − E ≈ s(q − z)``; then ``β ← κβ``.

Where squeeze departs from the paper, and why:

- squeeze's formats store integer zero points, so step 3 fits scale and zero point jointly,
  rounds the zero point and refits the scale for it (the paper fixes the scale and keeps a real
  zero point);
- the shrinkage works in units of the group's scale, ``(W − Ŵ) / s``, so that ``β`` means the
  same thing in every layer whatever the magnitude of its weights (in the paper's units, typical
  LLM weight errors sit far below the threshold and E is zero);
- each group keeps its best iterate by squared error ``Σ (W − Ŵ)²``, the error a layer's output
  sees when its inputs are uncorrelated, rather than the paper's mean ``|W − Ŵ|``: on SmolLM2
  (W4 and W3, groups of 64) choosing by mean ``|W − Ŵ|`` gave a larger output error
  ``Σ ‖ΔW X‖² / ‖W X‖²`` on sample text than round-to-nearest on q_proj and k_proj. The search
  starts from round-to-nearest's parameters, so no group ends with a larger squared error;
- that squared error, the least-squares fit of step 3 and the choice of a starting grid weigh
  each weight by its magnitude relative to its group's mean, ``(|w| / mean |w|)^a``
  (``magnitude_power`` a): with no data to say which inputs matter, a large weight is the
  likelier one to carry a large share of the output. Unweighted (a = 0), SmolLM2's KL divergence
  at W4 group-64 asym was above round-to-nearest's on BBC news (0.385 against 0.337, 2,048
  tokens); HQQ on the down_proj layers alone, or on the last block alone, with round-to-nearest
  everywhere else, gave all of that excess. Measured on 2,048 tokens of each text
  (benchmarks/README.md#quantize_hqq has the full runs), every a from 1 to 3 put W4 asym below
  round-to-nearest on both texts, and a from 0.5 to 2 lowered W4 sym's KL by 6-9% on Wikipedia and
  3-4% on BBC; at W3 only a ≤ 0.75 helped (a = 0.5: 6% lower KL on Wikipedia, 2% on BBC), and
  a ≥ 1.5 was back at round-to-nearest's. The default is a = 1.5 from 4 bits up and 0.5 below,
  where eight or fewer levels must cover the bulk of the group first;
- it stops at the first step that gains less than 0.1% of the layer's squared error.

Starting instead from the best of a few clipped min-max ranges (``clip_grid``) lowers the squared
error further, but on SmolLM2 it gave a higher KL divergence than starting from round-to-nearest
at W4 symmetric and at W3 (groups of 64; benchmarks/README.md#quantize_hqq): a lower weight
error is not always a lower output error, and clipping a group's extremes costs more than it
shows. It stays an option, off by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from squeeze.calib.parallel import calibration_processes, from_owner, solve_owners
from squeeze.errors import OptionError
from squeeze.options import MethodOptions, option
from squeeze.quant.layers import QuantizeResult, ignored_layers, replace_layer
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.methods.base import METHODS, Batches, QuantMethod, SchemeDefaults
from squeeze.quant.rtn import compute_qparams
from squeeze.quant.scheme import QuantArgs


def _grouped(weight: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """The weight as float32 ``[rows, groups, group_size]``: one slice per stored scale."""
    weight = weight.detach().float()
    if args.strategy == "group":
        assert args.group_size is not None
        if weight.shape[-1] % args.group_size:
            raise ValueError(f"input dimension {weight.shape[-1]} is not a multiple of group size {args.group_size}")
        return weight.unflatten(-1, (weight.shape[-1] // args.group_size, args.group_size)).contiguous()
    if args.strategy == "channel":
        return weight.unsqueeze(1).contiguous()
    if args.strategy == "tensor":
        return weight.reshape(1, 1, -1)
    raise ValueError(f"HQQ quantizes weights, not per-{args.strategy} activations")


def shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """The generalised soft-threshold ``sign(x) · relu(|x| − |x|^(p−1) / β)``, written as
    ``x · relu(1 − |x|^(p−2) / β)``: entries below ``β^(−1/(2−p))`` in magnitude go to zero."""
    return _kept(x.clone(), torch.full(x.shape[:-1], -math.log(beta), device=x.device), lp_norm).mul_(x)


def _kept(x: torch.Tensor, log_factor: torch.Tensor, lp_norm: float) -> torch.Tensor:
    """The fraction ``relu(1 − f · |x|^(p−2))`` of each entry the shrinkage keeps, in place of
    ``x``, ``log f`` given per group; computed as ``exp(log f + (p − 2) log |x|)`` in seven passes over ``x`` (``pow`` costs
    more than ``log`` and ``exp`` together on CPU). ``x = 0`` gives ``exp(+∞)``, so nothing is kept."""
    keep = x.abs_().log_().mul_(lp_norm - 2).add_(log_factor[..., None]).exp_()
    return keep.neg_().add_(1.0).clamp_min_(0.0)


# the search stops at the first step that lowers the layer's total squared error by less than this
# fraction: on SmolLM2 the last steps before no gain at all (about a third of them) move it by 0.1-0.5%
_MIN_GAIN = 1e-3

# elements per tensor while trying many candidate grids at once: rows are taken in chunks of at
# most this many weights times candidates (64 MiB of float32), so memory stays bounded on large layers
_CANDIDATE_CHUNK = 1 << 24


def _square_norm(x: torch.Tensor) -> torch.Tensor:
    """``Σ x²`` over the last dimension, in one pass (``vecdot(x, x)`` makes a product first)."""
    return torch.linalg.vector_norm(x, dim=-1).square_()


class _Groups:
    """The grouped weight ``w`` [rows, groups, size], the arithmetic of a candidate grid, and the
    current iterate of the search: its codes ``q`` and residual ``W − Ŵ``, kept in buffers of
    ``w``'s shape that every step reuses (a fresh tensor of a layer's size per operation costs
    more in page faults than the arithmetic does)."""

    def __init__(self, w: torch.Tensor, args: QuantArgs, dtype: torch.dtype, magnitude_power: float = 0.0) -> None:
        self.w, self.args, self.dtype = w, args, dtype
        self.q, self.residual, self.work = torch.empty_like(w), torch.empty_like(w), torch.empty_like(w)
        # each weight's share of its group's error, (|w| / mean |w|)^a; None: all alike (a = 0)
        self.importance: torch.Tensor | None = None
        if magnitude_power > 0:
            magnitude = w.abs()
            mean = magnitude.mean(-1, keepdim=True)
            # an all-zero group sits exactly on any grid: its weights count alike, never 0 / 0
            relative = torch.where(mean > 0, magnitude.div_(mean.clamp_min(torch.finfo(w.dtype).tiny)), 1.0)
            self.importance = relative.pow_(magnitude_power)
            self.total_importance = self.importance.sum(-1)
            self.weighted = torch.empty_like(w)

    def error(self, residual: torch.Tensor, importance: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ c · r²`` over the last dimension, ``c`` the weights' importance (1 when None);
        ``out``: a buffer of ``residual``'s shape for the product."""
        if importance is None:
            return _square_norm(residual)
        return torch.linalg.vecdot(torch.mul(residual, importance, out=out), residual)

    def stored(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` as the checkpoint stores it (in ``dtype``), back in float32, never zero."""
        return scale.clamp_min(torch.finfo(self.dtype).tiny).to(self.dtype).float()

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``clamp(round(w / s + z))``, ``scale`` and ``zero`` broadcast over the last dimension of ``w``."""
        # divide as squeeze.quant.rtn.quantize does, so that RTN's parameters give RTN's codes
        q = (w / scale[..., None]).add_(zero[..., None])
        return q.round_().clamp_(self.args.qmin, self.args.qmax)

    def assess(self, scale: torch.Tensor, zero: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """Make (``scale``, ``zero``) the current iterate: its codes and residual into ``q`` and
        ``residual``; returns its squared error per group. Unless ``exact``, the codes multiply by
        ``1 / s`` (several times cheaper than dividing; only an exact tie can round differently)."""
        if exact:
            self.q.copy_(self.codes(self.w, scale, zero))
        else:
            torch.mul(self.w, scale.reciprocal()[..., None], out=self.q).add_(zero[..., None])
            self.q.round_().clamp_(self.args.qmin, self.args.qmax)
        shifted = torch.sub(self.q, zero[..., None], out=self.work)
        torch.addcmul(self.w, shifted, scale[..., None], value=-1.0, out=self.residual)
        return self.error(self.residual, self.importance, out=self.work)

    def shrunk_target(self, scale: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
        """``W − E`` for the current residual r, with ``E = s · shrink_p(r / s)``: the shrinkage in
        units of the scale, applied in the weight's units as ``r · relu(1 − |r|^(p−2) · s^(2−p) / β)``;
        written into ``work``."""
        log_factor = scale.log().mul_(2 - lp_norm).sub_(math.log(beta))
        keep = _kept(torch.abs(self.residual, out=self.work), log_factor, lp_norm)
        return keep.mul_(self.residual).neg_().add_(self.w)

    def best_of(self, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, the (scale, zero point) of least squared error among candidates [rows, groups, k]."""
        rows = max(1, _CANDIDATE_CHUNK // (self.w[0].numel() * scales.shape[-1]))
        best_scale, best_zero = [], []
        for start in range(0, self.w.shape[0], rows):
            part = slice(start, start + rows)
            w, s, z = self.w[part, :, None, :], scales[part], zeros[part]
            residual = torch.addcmul(w, self.codes(w, s, z).sub_(z[..., None]), s[..., None], value=-1.0)
            importance = None if self.importance is None else self.importance[part, :, None, :]
            pick = self.error(residual, importance).argmin(-1, keepdim=True)
            best_scale.append(s.gather(-1, pick).squeeze(-1))
            best_zero.append(z.gather(-1, pick).squeeze(-1))
        return torch.cat(best_scale), torch.cat(best_zero)

    def fit(self, target: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares scale and integer zero point with ``target ≈ s(q − z)`` per group, each
        weight counted by its importance; a group whose codes leave the scale undetermined (all
        equal, or a negative fit) keeps ``scale``."""
        args = self.args
        if self.importance is None:
            n: torch.Tensor | int = target.shape[-1]
            sum_q, sum_t = q.sum(-1), target.sum(-1)
            sum_qq, sum_qt = _square_norm(q), torch.linalg.vecdot(q, target)
        else:
            n, weighted = self.total_importance, torch.mul(q, self.importance, out=self.weighted)
            sum_q, sum_t = weighted.sum(-1), torch.linalg.vecdot(self.importance, target)
            sum_qq, sum_qt = torch.linalg.vecdot(weighted, q), torch.linalg.vecdot(weighted, target)
        if args.symmetric:
            zero = torch.zeros_like(scale)
        else:
            # target ≈ s·q − s·z: the regression slope of target on the codes, then z from the means
            variance = sum_qq - sum_q * sum_q / n
            slope = (sum_qt - sum_q * sum_t / n) / variance.clamp_min(1e-12)
            slope = torch.where((variance > 1e-6) & (slope > 0), slope, scale)
            zero = torch.round((sum_q - sum_t / slope) / n).clamp_(args.qmin, args.qmax)
        # the best scale for that integer zero point: Σ (q − z) t / Σ (q − z)²
        norm = sum_qq - 2 * zero * sum_q + n * zero * zero
        refit = (sum_qt - zero * sum_t) / norm.clamp_min(1e-12)
        return self.stored(torch.where((norm > 1e-6) & (refit > 0), refit, scale)), zero


def default_magnitude_power(bits: int) -> float:
    """The default weighting exponent a: 1.5 from 4 bits up, 0.5 below (see the module's notes)."""
    return 1.5 if bits >= 4 else 0.5


@torch.no_grad()
def hqq_quantize(
    weight: torch.Tensor,
    args: QuantArgs,
    iterations: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    clip_grid: int = 0,
    min_clip: float = 0.5,
    magnitude_power: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ codes, scale and zero point for ``weight`` [out, in] under ``args``.

    Returns what :func:`squeeze.quant.rtn.compute_qparams` and :func:`~squeeze.quant.rtn.quantize`
    give for the same ``args``: int8 codes [out, in] in ``[qmin, qmax]``, the scale in RTN's shape
    and dtype, an int8 zero point (all zero when symmetric). With ``clip_grid`` > 0 the search
    first tries that many min-max ranges shrunk by factors from ``min_clip`` to 1 (with the zero
    point one step either side of round-to-nearest's when asymmetric) and starts from each group's
    best; otherwise from round-to-nearest's range (with its zero point or, when asymmetric, one
    step either side, whichever has the least squared error). It then runs at most ``iterations`` half-quadratic steps,
    stopping at the first that lowers the layer's total squared error by less than ``_MIN_GAIN`` of
    it; ``lp_norm`` is ``p`` of the error, ``beta`` the initial weight of the splitting penalty and
    ``kappa`` its growth per step. Every sum of squares weighs each weight by ``(|w| / mean |w|)^a``
    over its group, a = ``magnitude_power`` (None: :func:`default_magnitude_power` of the bits).
    Per group, that weighted ``Σ c (W − Ŵ)²`` is never above round-to-nearest's.
    """
    if magnitude_power is None:
        magnitude_power = default_magnitude_power(args.num_bits)
    rtn_scale, rtn_zero = compute_qparams(weight, args)
    groups = _Groups(_grouped(weight, args), args, rtn_scale.dtype, magnitude_power)
    scale = rtn_scale.float().reshape(groups.w.shape[:2])
    zero = rtn_zero.float().reshape(groups.w.shape[:2])

    # shrinking a min-max range about zero moves its scale only; the zero point it would have is
    # RTN's, whose rounding may be a step off the best, so its neighbours are tried too. RTN's own
    # grid (ratio 1, no shift) is one of the candidates.
    device = weight.device
    ratios = torch.linspace(min_clip, 1.0, clip_grid + 1, device=device) if clip_grid > 0 else torch.ones(1, device=device)
    shifts = torch.zeros(1, device=device) if args.symmetric else torch.tensor([0.0, -1.0, 1.0], device=device)
    scales = groups.stored(scale[..., None] * ratios.repeat_interleave(len(shifts)))
    zeros = (zero[..., None] + shifts.repeat(len(ratios))).clamp_(args.qmin, args.qmax)
    scale, zero = groups.best_of(scales, zeros)

    best_scale, best_zero = scale, zero
    best_error = groups.assess(scale, zero)
    total = float(best_error.sum())
    for _ in range(iterations):
        target = groups.shrunk_target(scale, beta, lp_norm)
        scale, zero = groups.fit(target, groups.q, scale)
        beta *= kappa
        error = groups.assess(scale, zero, exact=False)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        current = float(error.sum())
        if current >= total * (1 - _MIN_GAIN):
            break
        total = current
    codes = groups.codes(groups.w, best_scale, best_zero).flatten(1).reshape(weight.shape)
    shape = rtn_scale.shape
    return codes.to(torch.int8), best_scale.reshape(shape).to(rtn_scale.dtype), best_zero.reshape(shape).to(torch.int8)


class HqqOptions(MethodOptions):
    hqq_iterations: int = option(
        20, "HQQ: most half-quadratic steps per layer (it stops earlier once a step gains under 0.1%).", ge=0,
    )
    hqq_lp_norm: float = option(0.7, "HQQ: p of the error's lp norm; below 1 it tolerates a few large errors.", gt=0, le=1)
    hqq_beta: float = option(
        10.0, "HQQ: initial weight of the splitting penalty; larger sets more of each group's error aside.", gt=0,
    )
    hqq_kappa: float = option(1.01, "HQQ: growth of that weight per step.", ge=1)
    hqq_clip_grid: int = option(
        0, "HQQ: clipped min-max ranges tried before the steps (0: start from round-to-nearest).", ge=0,
    )
    hqq_min_clip: float = option(0.5, "HQQ: the narrowest of those ranges, as a fraction of min-max.", gt=0, le=1)
    hqq_magnitude_power: float | None = option(
        None,
        "HQQ: each weight counts in its group's error as (|w| / mean |w|) to this power; 0 counts all alike "
        "(default: 1.5 from 4 bits up, 0.5 below).",
        ge=0,
    )


@METHODS.register
class Hqq(QuantMethod):
    name: ClassVar[str] = "hqq"
    summary: ClassVar[str] = "hqq (half-quadratic, no data)"
    Options: ClassVar[type[MethodOptions]] = HqqOptions
    defaults: ClassVar[SchemeDefaults] = SchemeDefaults(mode="per-group", bits=4, asym=True)
    blockwise: ClassVar[bool] = False

    def needs_calibration(self, config: QuantizeConfig) -> bool:
        return False

    def check(self, config: QuantizeConfig) -> None:
        """HQQ fits each weight group on its own: weight-only, with a scale per channel or group."""
        if config.scheme.input_activations is not None:
            raise OptionError("HQQ is weight-only and reads no calibration text: drop {0}", "act")
        if config.scheme.weights.strategy == "tensor":
            raise OptionError("HQQ fits a scale per channel or per group, not one per tensor: use {0} per-group", "mode")

    def steps(self, model: nn.Module, layers: dict[str, nn.Module]) -> tuple[str, int]:
        return "hqq, layer by layer", len(layers)

    @torch.no_grad()
    def run(
        self,
        model: nn.Module,
        config: QuantizeConfig,
        batches: Batches | None,
        on_step: Callable[[str], None] | None = None,
    ) -> QuantizeResult:
        """Replace every targeted Linear layer of ``model``, one at a time, by the QuantizedLinear of
        :func:`hqq_quantize`'s codes; reads no data."""
        options: HqqOptions = config.options  # type: ignore[assignment]
        layers = self.plan(model, config)
        errors = []
        # under torchrun each process solves its share of the layers, by size; then every process
        # receives every layer's codes from the one that solved it (squeeze.calib.parallel)
        owners = dict(zip(layers, solve_owners([m.weight.numel() for m in layers.values()])))
        rank = calibration_processes().rank
        solved = {
            name: hqq_quantize(
                linear.weight, config.scheme.weights, iterations=options.hqq_iterations, lp_norm=options.hqq_lp_norm,
                beta=options.hqq_beta, kappa=options.hqq_kappa, clip_grid=options.hqq_clip_grid,
                min_clip=options.hqq_min_clip, magnitude_power=options.hqq_magnitude_power,
            )
            for name, linear in layers.items() if owners[name] == rank
        }
        for name, linear in layers.items():
            if name not in solved:  # to receive in: RTN's tensors have the shapes and dtypes of HQQ's
                scale, zero_point = compute_qparams(linear.weight, config.scheme.weights)
                solved[name] = (torch.empty(linear.weight.shape, dtype=torch.int8, device=linear.weight.device), scale, zero_point.to(torch.int8))
            codes, scale, zero_point = from_owner(owners[name], solved.pop(name))
            qlinear = QuantizedLinear.from_codes(linear, config.scheme, codes, scale, zero_point)
            errors.append(replace_layer(model, name, linear, qlinear))
            if on_step:
                on_step(name)
        return QuantizeResult(layers=errors, quantized=list(layers), ignored=ignored_layers(model, layers))
