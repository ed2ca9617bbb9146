"""The quantize pass: a frozen config and a function that rewrites a model's Linear layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.scheme import QuantScheme
from squeeze.quant.targets import DEFAULT_IGNORE, check_group_size, select_linears


METHODS = ("rtn", "gptq", "smoothquant", "awq")


@dataclass(frozen=True)
class QuantizeConfig:
    """What to quantize and how. ``targets``/``ignore`` are module-name patterns (globs or ``re:``)."""

    scheme: QuantScheme = field(default_factory=QuantScheme)
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    method: str = "rtn"  # one of METHODS
    damp_percent: float = 0.01  # GPTQ: added to H's diagonal, as a fraction of its mean
    block_size: int = 128  # GPTQ: columns updated together
    act_order: bool = True  # GPTQ: quantize the columns with the largest Hessian diagonal first (static groups)
    true_sequential: bool = False  # GPTQ: calibrate each layer on the outputs of the already-quantized ones
    awq_grid: int = 20  # AWQ: scale ratios tried per fold (0, 1/n, ..., (n-1)/n)
    awq_clip: bool = True  # AWQ: search a smaller clip range per weight group
    alpha: float = 0.5  # SmoothQuant: how much of the activation range moves into the weights
    smooth_fallback: bool = False  # SmoothQuant: quantize unsmoothed where no norm can be folded
    format: str = "compressed-tensors"  # checkpoint format, one of squeeze.formats.FORMATS

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SqueezeError(f"unknown quantization method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if not 0 < self.damp_percent <= 1:
            raise SqueezeError(f"damp percent must be in (0, 1], got {self.damp_percent}")
        if self.block_size < 1:
            raise SqueezeError(f"GPTQ block size must be positive, got {self.block_size}")
        if not 0 <= self.alpha <= 1:
            raise SqueezeError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")
        if self.awq_grid < 2:
            raise SqueezeError(f"AWQ grid needs at least 2 ratios, got {self.awq_grid}")
        if self.method == "awq":
            from squeeze.quant.awq import check_awq_config

            check_awq_config(self)
        if self.method == "smoothquant" and self.scheme.input_activations is None:
            raise SqueezeError("SmoothQuant is for W8A8: add --act per-token (or per-tensor) to quantize activations")
        from squeeze.formats import check_format

        check_format(self.format, self.scheme, self.method)

    @property
    def needs_calibration(self) -> bool:
        """GPTQ, SmoothQuant and static activation scales are measured on sample text; RTN needs none."""
        act = self.scheme.input_activations
        return self.method != "rtn" or (act is not None and not act.dynamic)


@dataclass(frozen=True)
class LayerError:
    """How far one layer's dequantized weight is from the original."""

    name: str
    shape: tuple[int, int]
    relative_error: float  # ‖W − Ŵ‖_F / ‖W‖_F
    max_abs_error: float
    output_error: float | None = None  # ‖(W − Ŵ)X‖_F / ‖WX‖_F on the calibration inputs X (calibrated methods)
    method_loss: float | None = None  # the method's own objective, e.g. GPTQ's Σ (w − ŵ)² / [H⁻¹]_jj / 2
    zeros: int = 0  # weights that dequantize to exactly zero
    zeros_lost: int = 0  # weights zero before (pruned) that are no longer zero: always 0 by design


@dataclass
class QuantizeResult:
    layers: list[LayerError]
    quantized: list[str]  # module names now QuantizedLinear
    ignored: list[str]  # Linear layers left in full precision
    notes: list[str] = field(default_factory=list)  # what the method had to adapt, e.g. raised damping
    calibration_s: float = 0.0  # of the quantize time, seconds spent running calibration text


def plan_layers(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Linear]:
    """The layers the pass will quantize; validates patterns and group size (cheap, run it early)."""
    layers = select_linears(model, config.targets, config.ignore)
    weights = config.scheme.weights
    if weights.strategy == "group":
        assert weights.group_size is not None
        check_group_size(layers, weights.group_size)
    if config.method == "smoothquant" and not config.smooth_fallback:
        _check_foldable(model)
    if config.format == "gptq":
        from squeeze.formats.gptq import check_gptq_layers

        check_gptq_layers(model, list(layers), config.scheme.weights.num_bits)
    return layers


def _check_foldable(model: nn.Module) -> None:
    from squeeze.quant.sequential import block_list
    from squeeze.quant.smoothquant import smoothing_groups

    prefix, blocks = block_list(model)
    if not smoothing_groups(blocks[0]):
        raise SqueezeError(
            f"SmoothQuant cannot fold into {prefix}.0 ({type(blocks[0]).__name__}): no norm there feeds only "
            "Linear layers (in post-norm encoders the norm's output is also the residual); "
            "pass --smooth-fallback to quantize W8A8 without smoothing"
        )


def merge_range(ranges: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str, x: torch.Tensor) -> None:
    """Widen ``ranges[name]`` (min, max) to cover ``x``."""
    lo, hi = torch.aminmax(x.detach().float())
    if name in ranges:
        lo, hi = torch.minimum(lo, ranges[name][0]), torch.maximum(hi, ranges[name][1])
    ranges[name] = (lo, hi)


@torch.no_grad()
def observe_input_ranges(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[dict[str, torch.Tensor]],
    on_batch: Callable[[], None] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Min and max of every listed layer's input over calibration batches (static activation scales)."""
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    handles = [
        m.register_forward_pre_hook(lambda _module, args, name=n: merge_range(ranges, name, args[0]))
        for n, m in layers.items()
    ]
    try:
        for batch in batches:
            model(**batch)
            if on_batch:
                on_batch()
    finally:
        for h in handles:
            h.remove()
    return ranges


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: QuantizeConfig,
    input_ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    on_layer: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Replace the targeted Linear layers of ``model`` in place by round-to-nearest QuantizedLinear.

    ``input_ranges`` (from :func:`observe_input_ranges`) is required for static activation scales.
    """
    layers = plan_layers(model, config)
    if config.needs_calibration and input_ranges is None:
        raise SqueezeError("static per-tensor activation scales need calibration text")
    if config.method != "rtn":
        raise ValueError("quantize_model does round-to-nearest; use quantize_model_gptq for GPTQ")
    errors: list[LayerError] = []
    for name, linear in layers.items():
        if config.format == "bnb-nf4":
            from squeeze.quant.nf4 import NF4Linear

            qlinear: nn.Module = NF4Linear.from_linear(linear, config.scheme.weights.group_size or 64)
        else:
            qlinear = QuantizedLinear.from_linear(linear, config.scheme, input_ranges.get(name) if input_ranges else None)
        errors.append(_replace(model, name, linear, qlinear))
        if on_layer:
            on_layer(name)
    return QuantizeResult(layers=errors, quantized=list(layers), ignored=_ignored(model, layers))


def _ignored(model: nn.Module, layers: dict[str, nn.Linear]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]


def _replace(
    model: nn.Module,
    name: str,
    linear: nn.Linear,
    qlinear: nn.Module,
    hessian: torch.Tensor | None = None,
    method_loss: float | None = None,
) -> LayerError:
    """Swap ``linear`` for ``qlinear`` in ``model`` and measure how far the weight moved.

    With the layer's ``hessian`` (``2/n Σ x xᵀ`` of its calibration inputs) the output error
    ``‖ΔW X‖ / ‖W X‖ = sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))`` is measured too.
    """
    weight = linear.weight.detach()
    dequantized = qlinear.dequantized_weight(weight.dtype)
    diff = (dequantized - weight).float()
    output_error = None
    if hessian is not None:
        from squeeze.quant.gptq import relative_output_error

        output_error = relative_output_error(diff, weight, hessian)
    _set_module(model, name, qlinear)
    return LayerError(
        name=name,
        shape=(linear.out_features, linear.in_features),
        relative_error=float(diff.norm() / weight.float().norm().clamp_min(1e-30)),
        max_abs_error=float(diff.abs().max()),
        output_error=output_error,
        method_loss=method_loss,
        zeros=int((dequantized == 0).sum()),
        zeros_lost=int(((weight == 0) & (dequantized != 0)).sum()),
    )


def finish_outside_blocks(
    model: nn.Module,
    config: QuantizeConfig,
    layers: dict[str, nn.Linear],
    done: set[str],
    errors: list[LayerError],
    notes: list[str],
) -> None:
    """Round-to-nearest for targeted layers no block calibrated (rare: lm_head is ignored by default)."""
    act = config.scheme.input_activations
    leftover = {n: m for n, m in layers.items() if n not in done}
    for name, linear in leftover.items():
        if act is not None and not act.dynamic:
            raise SqueezeError(f"layer {name} is outside the transformer blocks; static activation scales need it inside")
        errors.append(_replace(model, name, linear, QuantizedLinear.from_linear(linear, config.scheme)))
    if leftover:
        notes.append(f"round-to-nearest for {len(leftover)} layer(s) not calibrated in a block: {', '.join(leftover)}")


@torch.no_grad()
def observe_hessians(block: nn.Module, inputs, modules: dict[str, nn.Linear], static: bool = False):
    """Run ``block`` on its calibration ``inputs``; return (Hessian accumulator per layer, input
    ranges per layer when ``static``, layer names in call order).

    Layers reading the very same tensor in one call (q/k/v, gate/up) share one accumulator.
    """
    from squeeze.quant.gptq import HessianAccumulator
    from squeeze.quant.sequential import run_block_observed

    accumulators: dict[str, HessianAccumulator] = {}
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    order: list[str] = []
    # holding each tensor until the call ends keeps its memory from being reused by a later input
    # of the same call, whose address would then match (the MLP would inherit attention's Hessian)
    same_call: dict[tuple, tuple[HessianAccumulator, torch.Tensor]] = {}

    def observe_input(name: str, module: nn.Linear, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape))
        if key in same_call:
            acc = same_call[key][0]
        else:
            acc = accumulators.get(name) or HessianAccumulator(module.in_features, x.device)
            acc.add(x)
            same_call[key] = (acc, x)
        accumulators[name] = acc
        if name not in order:
            order.append(name)
        if static:
            merge_range(ranges, name, x)

    try:
        run_block_observed(block, inputs, modules, observe_input, before_call=same_call.clear)
    finally:
        same_call.clear()
    return accumulators, ranges, order


@torch.no_grad()
def quantize_model_gptq(
    model: nn.Module,
    config: QuantizeConfig,
    batches: list[dict[str, torch.Tensor]],
    on_block: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """GPTQ, one transformer block at a time, on calibration ``batches``; rewrites ``model`` in place.

    Layers that read the same input (q/k/v, gate/up) share one Hessian and, for per-channel and
    per-group scales, are solved as one stacked matrix. Targeted Linear layers outside the blocks
    (rare; lm_head is ignored by default) fall back to round-to-nearest, noted in the result.
    """
    from squeeze.quant.gptq import gptq_quantize
    from squeeze.quant.sequential import calibrate_sequentially

    layers = plan_layers(model, config)
    errors: list[LayerError] = []
    notes: list[str] = []
    done: set[str] = set()
    static = config.scheme.input_activations is not None and not config.scheme.input_activations.dynamic

    def compress_block(block_name: str, block: nn.Module, inputs) -> None:
        pending = {n: m for n, m in layers.items() if n.startswith(block_name + ".")}
        while pending:
            accumulators, ranges, order = observe_hessians(block, inputs, pending, static)
            # layers sharing a Hessian form one stacked solve (per-tensor scales: one layer each), in call order
            groups: dict[int, list[str]] = {}
            for name in order:
                key = id(accumulators[name]) if config.scheme.weights.strategy != "tensor" else id(pending[name])
                groups.setdefault(key, []).append(name)
            stages = list(groups.values())
            # true-sequential: solve only the first group, then re-observe the rest with it quantized
            solve_group_list = stages[:1] if config.true_sequential else stages
            for names in solve_group_list:
                solve(names, pending, accumulators, ranges)
            unseen = [n for n in pending if n not in accumulators]
            if unseen and not order:
                raise SqueezeError(f"layers {', '.join(unseen)} never ran during calibration")
            for name in unseen:
                # a targeted layer the block's forward never calls: nothing to calibrate on
                pending.pop(name)

    def solve(names: list[str], pending: dict[str, nn.Linear], accumulators, ranges) -> None:
        """One GPTQ solve for layers sharing a Hessian (rows stacked); swap them for QuantizedLinear."""
        stacked = torch.cat([pending[n].weight.detach() for n in names], dim=0)
        try:
            solved = gptq_quantize(
                stacked,
                accumulators[names[0]].hessian,
                config.scheme.weights,
                block_size=config.block_size,
                damp_percent=config.damp_percent,
                act_order=config.act_order,
                zeros=stacked == 0,  # pruned weights stay pruned
            )
        except ArithmeticError as exc:
            raise SqueezeError(
                f"GPTQ failed on {', '.join(names)}: {exc}; use more calibration text or a larger --damp-percent"
            ) from None
        if solved.retries:
            notes.append(
                f"GPTQ raised the damping of {', '.join(names)} to {solved.damp:g} "
                f"after {solved.retries} failed Cholesky factorisation(s)"
            )
        row = 0
        for name in names:
            linear = pending[name]
            rows = slice(row, row + linear.out_features)
            row += linear.out_features
            scale = solved.scale if solved.scale.numel() == 1 else solved.scale[rows]
            zero_point = solved.zero_point if solved.zero_point.numel() == 1 else solved.zero_point[rows]
            qlinear = QuantizedLinear.from_codes(
                linear, config.scheme, solved.codes[rows].to(linear.weight.device),
                scale.to(linear.weight.device), zero_point.to(linear.weight.device), ranges.get(name),
            )
            rows_loss = float(solved.row_loss[rows].sum())
            errors.append(_replace(model, name, linear, qlinear, accumulators[names[0]].hessian, rows_loss))
            done.add(name)
            pending.pop(name)

    calibration_s = calibrate_sequentially(model, batches, compress_block, on_block)
    finish_outside_blocks(model, config, layers, done, errors, notes)
    return QuantizeResult(
        layers=errors, quantized=list(layers), ignored=_ignored(model, layers), notes=notes, calibration_s=calibration_s
    )


@torch.no_grad()
def quantize_model_smoothquant(
    model: nn.Module,
    config: QuantizeConfig,
    batches: list[dict[str, torch.Tensor]],
    on_block: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """SmoothQuant then round-to-nearest W8A8, one block at a time, on calibration ``batches``.

    In each block: measure the per-channel input maxima of the Linear layers whose input can be
    rescaled exactly (fed by a norm; o_proj through v_proj without grouped-query attention;
    down_proj through up_proj in gated MLPs), fold the smoothing factors into the producer and
    those layers (the block computes the same function), measure static activation ranges if the
    scheme has them (after smoothing), then quantize. Layers with no such producer are quantized
    unsmoothed.
    """
    from squeeze.quant.awq import fold_groups, fold_scales
    from squeeze.quant.sequential import block_list, calibrate_sequentially, run_block_observed
    from squeeze.quant.smoothquant import smoothing_factors, smoothing_groups

    layers = plan_layers(model, config)
    _, blocks = block_list(model)
    notes: list[str] = []
    if not smoothing_groups(blocks[0]):
        notes.append(f"no norm -> Linear pair to fold into in {type(blocks[0]).__name__}: W8A8 without smoothing")
    errors: list[LayerError] = []
    done: set[str] = set()
    static = not config.scheme.input_activations.dynamic  # type: ignore[union-attr]
    smoothed: list[str] = []
    skipped: dict[str, int] = {}

    def compress_block(block_name: str, block: nn.Module, inputs) -> None:
        # every exact fold: norm -> q/k/v, v -> o (without grouped-query attention), norm -> gate/up,
        # up -> down (gated MLPs); each divides only its own consumers' inputs, so one pass measures all
        groups, reasons = fold_groups(block)
        for reason in reasons:
            skipped[reason] = skipped.get(reason, 0) + 1
        groups = [g for g in groups if all(f"{block_name}.{n}" in layers for n in g.linears)]
        channel_max: dict[str, torch.Tensor] = {}

        def observe_max(name: str, _module: nn.Module, x: torch.Tensor) -> None:
            current = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            channel_max[name] = torch.maximum(channel_max[name], current) if name in channel_max else current

        firsts = {g.linears[0]: block.get_submodule(g.linears[0]) for g in groups}
        run_block_observed(block, inputs, firsts, observe_max)
        for group in groups:
            linears = [block.get_submodule(n) for n in group.linears]
            factors = smoothing_factors(channel_max[group.linears[0]], [m.weight for m in linears], config.alpha)
            fold_scales(block.get_submodule(group.prev), linears, factors)
            smoothed.extend(f"{block_name}.{n}" for n in group.linears)

        targets = {n: m for n, m in layers.items() if n.startswith(block_name + ".")}
        ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if static:
            run_block_observed(block, inputs, targets, lambda name, _module, x: merge_range(ranges, name, x))
        for name, linear in targets.items():
            qlinear = QuantizedLinear.from_linear(linear, config.scheme, ranges.get(name))
            errors.append(_replace(model, name, linear, qlinear))
            done.add(name)

    calibration_s = calibrate_sequentially(model, batches, compress_block, on_block)
    finish_outside_blocks(model, config, layers, done, errors, notes)
    if smoothed:
        notes.append(f"smoothed {len(smoothed)} of {len(layers)} layers (alpha {config.alpha})")
    notes.extend(f"SmoothQuant skipped the fold {reason}, in {count} block(s)" for reason, count in skipped.items())
    return QuantizeResult(
        layers=errors, quantized=list(layers), ignored=_ignored(model, layers), notes=notes, calibration_s=calibration_s
    )
