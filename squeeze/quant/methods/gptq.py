"""GPTQ, one transformer block at a time: Hessians of the layers' inputs, then the column-by-column
solve of :func:`squeeze.quant.gptq.gptq_quantize`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from squeeze.calib.observers import hessian_bytes, observe_hessians
from squeeze.calib.parallel import gather_rows, solve_by_rows
from squeeze.calib.pipeline import CalibrationClock, calibrate_sequentially
from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.options import MethodOptions, option
from squeeze.quant.gptq import GPTQResult, gptq_quantize
from squeeze.quant.layers import LayerError, QuantizeResult, finish_outside_blocks, ignored_layers, replace_layer
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.methods.base import METHODS, Batches, QuantMethod


class GPTQOptions(MethodOptions):
    damp_percent: float = option(
        0.05, "GPTQ: damping added to the Hessian diagonal, as a fraction of its mean.",
        gt=0, le=1, error="damp percent must be in (0, 1]",
    )
    block_size: int = option(128, "GPTQ: columns updated together.", ge=1, error="GPTQ block size must be positive")
    act_order: bool = option(
        True, "GPTQ: quantize the inputs with the most energy first, group scales fixed up front (default on).",
        flag="--act-order/--no-act-order",
    )
    group_aware: bool = option(
        True, "GPTQ with --act-order and per-group scales: quantize each group's columns together, groups in order "
        "of their largest input energy, so a group's scale comes from the error-updated weights (default on).",
        flag="--group-aware/--no-group-aware",
    )
    clip_search: int = option(
        48, "GPTQ: shrunk ranges tried for each scale when it is set, evenly from the full min/max down to 0.4 of it, "
        "keeping the one with the least rounding error weighted by the inputs' energy (0: plain min/max).",
        ge=0, le=1000, error="GPTQ clip search steps must be in [0, 1000]",
    )
    clip_refit: bool = option(
        False, "GPTQ clip search: refit each tried range's scale to its own codes by least squares, weighted by the "
        "inputs' energy, before scoring it.",
        flag="--clip-refit/--no-clip-refit",
    )
    true_sequential: bool = option(
        True, "GPTQ: calibrate each layer on the outputs of the layers already quantized in its block (default on; "
        "off: one pass per block, faster).",
        flag="--true-sequential/--no-true-sequential",
    )


@METHODS.register
class GPTQ(QuantMethod):
    name: ClassVar[str] = "gptq"
    summary: ClassVar[str] = "gptq"
    Options: ClassVar[type[MethodOptions]] = GPTQOptions

    def calibration_bytes(self, model: nn.Module, tokens: int, dtype_bytes: int) -> int:
        return hessian_bytes(model)

    @torch.no_grad()
    def run(
        self,
        model: nn.Module,
        config: QuantizeConfig,
        batches: Batches | None,
        on_step: Callable[[str], None] | None = None,
    ) -> QuantizeResult:
        """GPTQ, one transformer block at a time, on calibration ``batches``; rewrites ``model`` in place.

        Layers that read the same input (q/k/v, gate/up) share one Hessian and, for per-channel and
        per-group scales, are solved as one stacked matrix. Targeted Linear layers outside the blocks
        (rare; lm_head is ignored by default) fall back to round-to-nearest, noted in the result.
        """
        assert batches is not None
        options: GPTQOptions = config.options  # type: ignore[assignment]
        layers = self.plan(model, config)
        errors: list[LayerError] = []
        notes: list[str] = []
        done: set[str] = set()
        static = config.scheme.input_activations is not None and not config.scheme.input_activations.dynamic
        clock = CalibrationClock()

        def compress_block(block_name: str, block: nn.Module, inputs) -> None:
            pending = {n: m for n, m in layers.items() if n.startswith(block_name + ".")}
            while pending:
                # true-sequential: observe only the next group, cutting each call short after it
                accumulators, ranges, order, complete = observe_hessians(
                    block, inputs, pending, static, clock, first_input_only=options.true_sequential
                )
                # layers sharing a Hessian form one stacked solve (per-tensor scales: one layer each), in call order
                groups: dict[int, list[str]] = {}
                for name in order:
                    key = id(accumulators[name]) if config.scheme.weights.strategy != "tensor" else id(pending[name])
                    groups.setdefault(key, []).append(name)
                stages = list(groups.values())
                # true-sequential: solve only the first group, then re-observe the rest with it quantized
                for names in stages[:1] if options.true_sequential else stages:
                    solve(names, pending, accumulators, ranges)
                unseen = [n for n in pending if n not in accumulators]
                if unseen and not order:
                    raise SqueezeError(f"layers {', '.join(unseen)} never ran during calibration")
                for name in unseen if complete else ():
                    # a targeted layer the block's forward never calls: nothing to calibrate on
                    pending.pop(name)

        def solve(names: list[str], pending: dict[str, nn.Linear], accumulators, ranges) -> None:
            """One GPTQ solve for layers sharing a Hessian (rows stacked); swap them for QuantizedLinear."""
            stacked = torch.cat([pending[n].weight.detach() for n in names], dim=0)
            # rows are solved independently (but for one per-tensor scale): under data-parallel
            # calibration each process solves its share of them
            mine = solve_by_rows(stacked.shape[0]) if config.scheme.weights.strategy != "tensor" else slice(None)
            try:
                solved = gptq_quantize(
                    stacked[mine],
                    accumulators[names[0]].hessian,
                    config.scheme.weights,
                    block_size=options.block_size,
                    damp_percent=options.damp_percent,
                    act_order=options.act_order,
                    group_aware=options.group_aware,
                    clip_steps=options.clip_search,
                    clip_refit=options.clip_refit,
                    zeros=stacked[mine] == 0,  # pruned weights stay pruned
                )
            except ArithmeticError as exc:
                raise OptionError(
                    f"GPTQ failed on {literal(', '.join(names))}: {literal(str(exc))}; "
                    "use more calibration text or a larger {0}",
                    "damp_percent",
                ) from None
            if mine != slice(None):
                solved = _gathered(solved)
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
                errors.append(replace_layer(model, name, linear, qlinear, accumulators[names[0]].hessian, rows_loss))
                done.add(name)
                pending.pop(name)

        calibration_s = calibrate_sequentially(model, batches, compress_block, on_step, clock)
        finish_outside_blocks(model, config, layers, done, errors, notes)
        return QuantizeResult(
            layers=errors, quantized=list(layers), ignored=ignored_layers(model, layers), notes=notes,
            calibration_s=calibration_s,
        )


def _gathered(solved: GPTQResult) -> GPTQResult:
    """Every process's rows of a solve split by rows (squeeze.calib.parallel), in row order."""
    return dataclasses.replace(
        solved, codes=gather_rows(solved.codes), scale=gather_rows(solved.scale), zero_point=gather_rows(solved.zero_point),
        row_loss=gather_rows(solved.row_loss),
    )
