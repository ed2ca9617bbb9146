"""AWQ then round-to-nearest, one transformer block at a time: the scale and clip searches of
:mod:`squeeze.quant.awq` applied fold by fold."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from squeeze.calib.parallel import gather_rows, solve_by_rows
from squeeze.calib.pipeline import CalibrationClock, calibrate_sequentially
from squeeze.errors import OptionError
from squeeze.options import MethodOptions, option
from squeeze.calib.folds import FoldTally, fold_scales
from squeeze.quant.awq import UNCLIPPED, apply_clip, awq_clip_search, awq_scale_search, capture_inputs
from squeeze.quant.layers import LayerError, QuantizeResult, finish_outside_blocks, ignored_layers, replace_layer
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.methods.base import METHODS, Batches, QuantMethod, SchemeDefaults
from squeeze.quant.rtn import compute_qparams, quantize


class AWQOptions(MethodOptions):
    awq_grid: int = option(
        20, "AWQ: scale ratios tried per fold (0, 1/n, ..., (n-1)/n).", ge=2, error="AWQ grid needs at least 2 ratios"
    )
    awq_clip: bool = option(
        True, "AWQ: search a smaller clip range per weight group (never q/k).", flag="--awq-clip/--no-awq-clip"
    )


@METHODS.register
class AWQ(QuantMethod):
    name: ClassVar[str] = "awq"
    summary: ClassVar[str] = "awq (weight-only, activation-aware scales)"
    Options: ClassVar[type[MethodOptions]] = AWQOptions
    defaults: ClassVar[SchemeDefaults] = SchemeDefaults(mode="per-group", bits=4, asym=True)  # W4A16 group-wise, as AWQ checkpoints are

    def check(self, config: QuantizeConfig) -> None:
        """AWQ rounds weights only; a scheme with quantized activations is a user error."""
        if config.scheme.input_activations is not None:
            raise OptionError("AWQ is weight-only (W4A16); for W8A8 use {0} smoothquant", "method")

    def calibration_bytes(self, model: nn.Module, tokens: int, dtype_bytes: int) -> int:
        """The captured inputs of the widest layer (down_proj reads the MLP's intermediate width)."""
        hidden = getattr(model.config, "hidden_size", 0)
        return tokens * getattr(model.config, "intermediate_size", 4 * hidden) * dtype_bytes

    @torch.no_grad()
    def run(
        self,
        model: nn.Module,
        config: QuantizeConfig,
        batches: Batches | None,
        on_step: Callable[[str], None] | None = None,
    ) -> QuantizeResult:
        """AWQ then round-to-nearest, one transformer block at a time, on calibration ``batches``.

        In each block: capture the inputs of the targeted Linear layers once; for each fold proven in
        the block (squeeze.calib.folds: a norm → the layers reading it, v_proj → o_proj, up_proj →
        down_proj in gated MLPs, whatever their names) search the scales on ``awq_grid``
        ratios and fold them (dividing the captured inputs of the fold's targets by them, as the fold
        does to the real ones); with ``awq_clip``, search a clip range per weight group (not for q/k);
        then quantize every targeted layer. Blocks with nothing to fold into (post-norm encoders) get
        clipping and round-to-nearest only; layers outside the blocks get round-to-nearest. Rewrites
        ``model`` in place.
        """
        assert batches is not None
        n_grid, clip = config.options.awq_grid, config.options.awq_clip  # type: ignore[attr-defined]
        layers = self.plan(model, config)
        args = config.scheme.weights
        notes: list[str] = []
        if clip and args.strategy not in ("group", "channel"):
            notes.append(f"no clipping search for per-{args.strategy} weight scales")
            clip = False
        errors: list[LayerError] = []
        done: set[str] = set()
        scaled: list[str] = []
        clipped: list[str] = []
        tally = FoldTally()
        clock = CalibrationClock()

        def compress_block(block_name: str, block: nn.Module, inputs) -> None:
            prefix = block_name + "."
            targets = {n[len(prefix):]: m for n, m in layers.items() if n.startswith(prefix)}
            if not targets:
                return
            with clock.timing():
                groups = tally.usable(block, *inputs[0], quantized=lambda name: name in targets)
            captured = capture_inputs(block, inputs, targets, clock=clock)
            for group in groups:
                linears = [targets[n] for n in group.linears]
                scales, _, ratio = awq_scale_search(captured[group.linears[0]], [m.weight for m in linears], args, n_grid)
                if ratio == 0:
                    continue  # s = 1: round-to-nearest is already best here
                tally.fold(group)
                fold_scales(block.get_submodule(group.prev), linears, scales, group.kind)
                for x in {id(captured[n]): captured[n] for n in group.linears}.values():
                    x.div_(scales.to(x.device))
                scaled.extend(prefix + n for n in group.linears)
            for name, linear in targets.items():
                weight = linear.weight.detach()
                if clip and name.rpartition(".")[2] not in UNCLIPPED and name in captured:
                    # rows are clipped independently: under data-parallel calibration each process searches its share
                    mine = solve_by_rows(weight.shape[0])
                    clip_values = awq_clip_search(captured[name], weight[mine], args, n_grid)
                    clip_values = clip_values if mine == slice(None) else gather_rows(clip_values)
                    weight = apply_clip(weight, clip_values, args.group_size)
                    clipped.append(prefix + name)
                # codes from the clipped weight, but replace_layer measures the error against the unclipped one
                scale, zero_point = compute_qparams(weight, args)
                codes = quantize(weight, scale, zero_point, args)
                qlinear = QuantizedLinear.from_codes(linear, config.scheme, codes, scale, zero_point)
                errors.append(replace_layer(model, prefix + name, linear, qlinear))
                done.add(prefix + name)

        calibration_s = calibrate_sequentially(model, batches, compress_block, on_step, clock)
        finish_outside_blocks(model, config, layers, done, errors, notes)
        if scaled:
            notes.append(f"AWQ scaled {len(scaled)} of {len(layers)} layers (grid of {n_grid} ratios)")
        if not tally.made and not tally.skipped:
            notes.append("AWQ found no exact fold in any block: clipping and round-to-nearest only")
        notes.extend(tally.notes("AWQ"))
        if clipped:
            notes.append(f"clipped the weight range of {len(clipped)} layers (q/k projections are never clipped)")
        return QuantizeResult(
            layers=errors, quantized=list(layers), ignored=ignored_layers(model, layers), notes=notes,
            calibration_s=calibration_s,
        )
