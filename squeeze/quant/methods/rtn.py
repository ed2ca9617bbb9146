"""Round-to-nearest: every targeted layer on its own, no data, except to measure the input ranges
of static activation scales (one pass of the whole model over the calibration batches)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from squeeze.calib.observers import observe_input_ranges
from squeeze.formats import QUANTIZED_FORMATS
from squeeze.quant.layers import QuantizeResult, ignored_layers, replace_layer
from squeeze.quant.methods.base import METHODS, Batches, QuantMethod


@METHODS.register
class RTN(QuantMethod):
    name: ClassVar[str] = "rtn"
    summary: ClassVar[str] = "rtn (round-to-nearest, no data)"
    blockwise: ClassVar[bool] = False
    no_data: ClassVar[str] = "none (round-to-nearest weights need no data)"

    def needs_calibration(self, config: QuantizeConfig) -> bool:
        """Only static activation scales are measured on sample text."""
        act = config.scheme.input_activations
        return act is not None and not act.dynamic

    def steps(self, model: nn.Module, layers: dict[str, nn.Module]) -> tuple[str, int]:
        return "quantizing layers", len(layers)

    @torch.no_grad()
    def run(
        self,
        model: nn.Module,
        config: QuantizeConfig,
        batches: Batches | None,
        on_step: Callable[[str], None] | None = None,
    ) -> QuantizeResult:
        """Replace the targeted Linear layers, one at a time, by the layer ``config.format`` stores
        (QuantizedLinear; NF4Linear for ``bnb-nf4``, whose levels are no integer grid); static
        activation scales come from the input ranges over ``batches``."""
        layers = self.plan(model, config)
        ranges, calibration_s = None, 0.0
        if self.needs_calibration(config):
            assert batches is not None, "static activation scales need calibration text"
            start = time.perf_counter()
            ranges = observe_input_ranges(model, layers, batches)
            calibration_s = time.perf_counter() - start
        fmt = QUANTIZED_FORMATS.get(config.format)
        errors = []
        for name, linear in layers.items():
            qlinear = fmt.quantized_layer(linear, config.scheme, ranges.get(name) if ranges else None)
            errors.append(replace_layer(model, name, linear, qlinear))
            if on_step:
                on_step(name)
        return QuantizeResult(
            layers=errors, quantized=list(layers), ignored=ignored_layers(model, layers), calibration_s=calibration_s
        )
