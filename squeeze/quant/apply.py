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


@dataclass(frozen=True)
class QuantizeConfig:
    """What to quantize and how. ``targets``/``ignore`` are module-name patterns (globs or ``re:``)."""

    scheme: QuantScheme = field(default_factory=QuantScheme)
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    method: str = "rtn"

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales are measured on sample text; RTN weights need none."""
        act = self.scheme.input_activations
        return act is not None and not act.dynamic


@dataclass(frozen=True)
class LayerError:
    """How far one layer's dequantized weight is from the original."""

    name: str
    shape: tuple[int, int]
    relative_error: float  # ‖W − Ŵ‖_F / ‖W‖_F
    max_abs_error: float


@dataclass
class QuantizeResult:
    layers: list[LayerError]
    quantized: list[str]  # module names now QuantizedLinear
    ignored: list[str]  # Linear layers left in full precision


def plan_layers(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Linear]:
    """The layers the pass will quantize; validates patterns and group size (cheap, run it early)."""
    if config.method != "rtn":
        raise SqueezeError(f"quantization method {config.method!r} is not available; this build has: rtn")
    layers = select_linears(model, config.targets, config.ignore)
    weights = config.scheme.weights
    if weights.strategy == "group":
        assert weights.group_size is not None
        check_group_size(layers, weights.group_size)
    return layers


@torch.no_grad()
def observe_input_ranges(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[dict[str, torch.Tensor]],
    on_batch: Callable[[], None] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Min and max of every listed layer's input over calibration batches (static activation scales)."""
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            lo, hi = torch.aminmax(args[0].detach().float())
            if name in ranges:
                old_lo, old_hi = ranges[name]
                lo, hi = torch.minimum(lo, old_lo), torch.maximum(hi, old_hi)
            ranges[name] = (lo, hi)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
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
    all_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    errors: list[LayerError] = []
    for name, linear in layers.items():
        qlinear = QuantizedLinear.from_linear(
            linear, config.scheme, input_ranges.get(name) if input_ranges else None
        )
        weight = linear.weight.detach()
        diff = (qlinear.dequantized_weight(weight.dtype) - weight).float()
        errors.append(
            LayerError(
                name=name,
                shape=(linear.out_features, linear.in_features),
                relative_error=float(diff.norm() / weight.float().norm().clamp_min(1e-30)),
                max_abs_error=float(diff.abs().max()),
            )
        )
        _set_module(model, name, qlinear)
        if on_layer:
            on_layer(name)
    return QuantizeResult(
        layers=errors,
        quantized=list(layers),
        ignored=[n for n in all_linears if n not in layers],
    )
