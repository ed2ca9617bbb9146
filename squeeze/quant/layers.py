"""What every quantization method does around its own arithmetic: choose the layers, swap each
Linear for its quantized form while measuring how far the weight moved, and round what no block
calibrated.

``config`` arguments are :class:`squeeze.quant.config.QuantizeConfig`; it is named only in
annotations here, because the config module imports the method registry, which imports this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.calib.targets import check_group_size, select_linears
from squeeze.errors import SqueezeError
from squeeze.quant.gptq import relative_output_error
from squeeze.quant.linear import QuantizedLinear


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
    """The Linear layers ``config`` targets; validates patterns and group size (cheap: the meta
    model is enough). The method's and the format's own checks come on top of it."""
    layers = select_linears(model, config.targets, config.ignore)
    weights = config.scheme.weights
    if weights.strategy == "group":
        assert weights.group_size is not None
        check_group_size(layers, weights.group_size)
    return layers


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def ignored_layers(model: nn.Module, layers: dict[str, nn.Linear]) -> list[str]:
    """The Linear layers of ``model`` not in ``layers``: left in full precision."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]


def replace_layer(
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
    output_error = relative_output_error(diff, weight, hessian) if hessian is not None else None
    set_module(model, name, qlinear)
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
        errors.append(replace_layer(model, name, linear, QuantizedLinear.from_linear(linear, config.scheme)))
    if leftover:
        notes.append(f"round-to-nearest for {len(leftover)} layer(s) not calibrated in a block: {', '.join(leftover)}")
