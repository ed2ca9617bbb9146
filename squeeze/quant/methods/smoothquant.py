"""SmoothQuant then round-to-nearest W8A8, one transformer block at a time: the smoothing factors
of :mod:`squeeze.quant.smoothquant` folded into every exact producer → consumer pair."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from squeeze.calib.blocks import all_blocks
from squeeze.calib.folds import FoldTally, fold_scales
from squeeze.calib.observers import Ranges, merge_range, reduce_ranges
from squeeze.calib.parallel import reduce_extreme
from squeeze.calib.pipeline import CalibrationClock, calibrate_sequentially, run_block_observed
from squeeze.errors import OptionError, literal
from squeeze.options import MethodOptions, option
from squeeze.quant.layers import LayerError, QuantizeResult, finish_outside_blocks, ignored_layers, replace_layer
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.methods.base import METHODS, Batches, QuantMethod
from squeeze.quant.awq import capture_inputs
from squeeze.quant.smoothquant import alpha_search, smoothing_factors

ALPHAS = tuple(round(0.05 * step, 2) for step in range(1, 20))  # the alpha search's candidates


class SmoothQuantOptions(MethodOptions):
    alpha: float = option(
        0.5, "SmoothQuant: share of the activation range moved into the weights, 0..1.",
        ge=0, le=1, error="SmoothQuant alpha must be in [0, 1]",
    )
    alpha_search: bool = option(
        False, "SmoothQuant: choose alpha per fold, from 0.05 to 0.95 in steps of 0.05 or no smoothing, by the fold's "
        "W8A8 output error on the calibration rows (--alpha is then not used).",
        flag="--alpha-search/--no-alpha-search",
    )
    smooth_fallback: bool = option(
        False, "SmoothQuant: quantize without smoothing where no norm can be folded.",
        flag="--smooth-fallback", in_report=False,
    )


@METHODS.register
class SmoothQuant(QuantMethod):
    name: ClassVar[str] = "smoothquant"
    summary: ClassVar[str] = "smoothquant (W8A8)"
    Options: ClassVar[type[MethodOptions]] = SmoothQuantOptions

    def check(self, config: QuantizeConfig) -> None:
        if config.scheme.input_activations is None:
            raise OptionError("SmoothQuant is for W8A8: add {0} per-token (or per-tensor) to quantize activations", "act")

    def check_model(self, model: nn.Module, config: QuantizeConfig) -> None:
        if config.options.smooth_fallback:  # type: ignore[attr-defined]
            return
        name, block = all_blocks(model)[0]
        if not any(isinstance(m, nn.Linear) for m in block.modules()):
            raise _no_fold(name, block, "it has no Linear layer")

    @torch.no_grad()
    def run(
        self,
        model: nn.Module,
        config: QuantizeConfig,
        batches: Batches | None,
        on_step: Callable[[str], None] | None = None,
    ) -> QuantizeResult:
        """SmoothQuant then round-to-nearest W8A8, one block at a time, on calibration ``batches``.

        In each block: measure the per-channel input maxima of the Linear layers whose input can be
        rescaled exactly (the folds squeeze.calib.folds finds and proves: fed by a norm; o_proj
        through v_proj without grouped-query attention; down_proj through up_proj in gated MLPs),
        fold the smoothing factors into the producer and those layers (the block computes the same
        function), measure static activation ranges if the scheme has them (after smoothing), then
        quantize. Layers with no such producer are quantized unsmoothed. Without ``smooth_fallback``,
        a first block with no fold into its quantized layers is an OptionError (nothing compressed yet).
        """
        assert batches is not None
        alpha = config.options.alpha  # type: ignore[attr-defined]
        search = config.options.alpha_search  # type: ignore[attr-defined]
        chosen: list[float | None] = []
        layers = self.plan(model, config)
        first = all_blocks(model)[0][0]
        fallback = config.options.smooth_fallback  # type: ignore[attr-defined]
        notes: list[str] = []
        errors: list[LayerError] = []
        done: set[str] = set()
        static = not config.scheme.input_activations.dynamic  # type: ignore[union-attr]
        smoothed: list[str] = []
        tally = FoldTally()
        clock = CalibrationClock()

        def compress_block(block_name: str, block: nn.Module, inputs) -> None:
            # every proven fold divides only its own readers' inputs, so one pass measures all
            with clock.timing():
                groups = tally.usable(block, *inputs[0], quantized=lambda name: f"{block_name}.{name}" in layers)
            if not groups and block_name == first:
                if not fallback:
                    raise _no_fold(first, block, "no norm or Linear layer there feeds only quantized Linear layers exactly")
                notes.append(f"no fold into the quantized layers of {block_name}: W8A8 without smoothing there")
            channel_max: dict[str, torch.Tensor] = {}

            def observe_max(name: str, _module: nn.Module, x: torch.Tensor) -> None:
                current = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
                channel_max[name] = torch.maximum(channel_max[name], current) if name in channel_max else current

            firsts = {g.linears[0]: block.get_submodule(g.linears[0]) for g in groups}
            run_block_observed(block, inputs, firsts, observe_max, clock=clock)
            for name in sorted(channel_max):  # data-parallel calibration: the maxima of every process
                reduce_extreme(channel_max[name], "max")
            captured = capture_inputs(block, inputs, firsts, clock=clock) if search and groups else {}
            for group in groups:
                linears = [block.get_submodule(n) for n in group.linears]
                first_max = channel_max[group.linears[0]]
                if search:
                    factors, picked, _ = alpha_search(
                        captured[group.linears[0]], first_max, [m.weight for m in linears], config.scheme.weights,
                        config.scheme.input_activations, ALPHAS,  # type: ignore[arg-type]
                    )
                    chosen.append(picked)
                    if picked is None:
                        continue  # no smoothing was best here
                else:
                    factors = smoothing_factors(first_max, [m.weight for m in linears], alpha)
                fold_scales(block.get_submodule(group.prev), linears, factors, group.kind)
                tally.fold(group)
                smoothed.extend(f"{block_name}.{n}" for n in group.linears)

            targets = {n: m for n, m in layers.items() if n.startswith(block_name + ".")}
            ranges: Ranges = {}
            if static:
                run_block_observed(
                    block, inputs, targets, lambda name, _module, x: merge_range(ranges, name, x), clock=clock
                )
                reduce_ranges(ranges)
            for name, linear in targets.items():
                qlinear = QuantizedLinear.from_linear(linear, config.scheme, ranges.get(name))
                errors.append(replace_layer(model, name, linear, qlinear))
                done.add(name)

        calibration_s = calibrate_sequentially(model, batches, compress_block, on_step, clock)
        finish_outside_blocks(model, config, layers, done, errors, notes)
        if smoothed:
            notes.append(f"smoothed {len(smoothed)} of {len(layers)} layers ({_alphas(chosen) if search else f'alpha {alpha}'})")
        elif chosen:
            notes.append(f"{_alphas(chosen)}: no smoothing was best everywhere")
        notes.extend(tally.notes("SmoothQuant"))
        return QuantizeResult(
            layers=errors, quantized=list(layers), ignored=ignored_layers(model, layers), notes=notes,
            calibration_s=calibration_s,
        )


def _alphas(chosen: list[float | None]) -> str:
    """The alpha search's choices in a few words: their range and median, and the folds left alone."""
    picked = sorted(a for a in chosen if a is not None)
    words = f"alpha searched per fold: {picked[0]:g} to {picked[-1]:g}, median {picked[len(picked) // 2]:g}" if picked else "alpha searched per fold"
    unsmoothed = len(chosen) - len(picked)
    return words + (f"; {unsmoothed} of {len(chosen)} folds best left unsmoothed" if unsmoothed else "")


def _no_fold(name: str, block: nn.Module, why: str) -> OptionError:
    return OptionError(
        f"SmoothQuant cannot fold into {literal(name)} ({type(block).__name__}): {why} "
        "(in post-norm encoders the norm's output is also the residual); pass {0} to quantize W8A8 without smoothing",
        "smooth_fallback",
    )
