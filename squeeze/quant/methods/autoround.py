"""AutoRound, one transformer block at a time: the rounding offsets and clip ranges of every
targeted Linear of a block learned together by :func:`squeeze.quant.autoround.learn_rounding`,
against the block's own output."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from squeeze.calib.blocks import all_blocks
from squeeze.calib.capture import BlockInputs
from squeeze.calib.pipeline import CalibrationClock, calibrate_sequentially, run_block
from squeeze.calib.spill import release_inputs
from squeeze.errors import OptionError
from squeeze.options import MethodOptions, option
from squeeze.quant.autoround import learn_rounding, round_weight
from squeeze.quant.layers import LayerError, QuantizeResult, finish_outside_blocks, ignored_layers, replace_layer
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.methods.base import METHODS, Batches, QuantMethod, SchemeDefaults

# tokens of one optimisation step the memory estimate allows for: twice the default step (one batch of two 512-token windows)
_STEP_TOKENS = 2048


class AutoRoundOptions(MethodOptions):
    autoround_iters: int = option(
        100, "AutoRound: signed-gradient steps per block (0: round-to-nearest; the paper's 200 cost twice the time).", ge=0,
        error="AutoRound iterations must be 0 or more",
    )
    autoround_lr: float | None = option(
        None, "AutoRound: step size, decaying linearly to 0 (default 1 / iterations, as in the paper).", gt=0, le=1,
        error="AutoRound learning rate must be in (0, 1]",
    )
    autoround_batch: int = option(
        1, "AutoRound: calibration batches (of --batch-size windows) in each step's loss.", ge=1,
        error="AutoRound needs at least one batch per step",
    )
    autoround_clip: bool = option(
        True, "AutoRound: also learn each group's clip range, within 0.5-1 of min-max.",
        flag="--autoround-clip/--no-autoround-clip",
    )
    autoround_seed: int = option(0, "AutoRound: seed of the batches each step draws.", ge=0)
    autoround_model_target: bool = option(
        True, "AutoRound: each block learns to reproduce the unquantized model's output at its depth (the block run "
        "on the unquantized model's own inputs), so it also makes up for the blocks before it (default); "
        "--autoround-block-target: the unquantized block's output on the quantized blocks' outputs.",
        flag="--autoround-model-target/--autoround-block-target",
    )


@METHODS.register
class AutoRound(QuantMethod):
    name: ClassVar[str] = "autoround"
    summary: ClassVar[str] = "autoround (weight-only, learned rounding)"
    Options: ClassVar[type[MethodOptions]] = AutoRoundOptions
    defaults: ClassVar[SchemeDefaults] = SchemeDefaults(mode="per-group", bits=4, asym=False)  # AutoRound's W4 group-wise symmetric
    data_parallel: ClassVar[bool] = False  # its signed-gradient steps would need every process's gradients

    def check(self, config: QuantizeConfig) -> None:
        """AutoRound learns how weights round, with a scale per channel or group."""
        if config.scheme.input_activations is not None:
            raise OptionError("AutoRound quantizes weights only (W*A16): drop {0}", "act")
        if config.scheme.weights.strategy == "tensor":
            raise OptionError("AutoRound learns a clip range per channel or group, not per tensor: use {0} per-group", "mode")

    def calibration_bytes(self, model: nn.Module, tokens: int, dtype_bytes: int) -> int:
        """The block's original outputs on every calibration token (twice: the unquantized model's
        stream at that depth is kept for the next block); per weight of the block, the
        offset, its gradient, two saved copies and the fake-quantized weight with its autograd
        intermediates (about 8 float32 values); the autograd activations of a step of
        ``_STEP_TOKENS`` tokens (about 12 hidden-wide and 4 intermediate-wide float32 values a token)."""
        hidden = getattr(model.config, "hidden_size", 0)
        intermediate = getattr(model.config, "intermediate_size", 4 * hidden)
        blocks = all_blocks(model)
        weights = sum(m.weight.numel() for m in blocks[0][1].modules() if isinstance(m, nn.Linear)) if blocks else 0
        step = min(tokens, _STEP_TOKENS) * (12 * hidden + 4 * intermediate) * 4
        streams = 2  # the targets, and the unquantized model's hidden states at the current depth
        return streams * tokens * hidden * dtype_bytes + weights * 8 * 4 + step

    @torch.no_grad()
    def run(
        self,
        model: nn.Module,
        config: QuantizeConfig,
        batches: Batches | None,
        on_step: Callable[[str], None] | None = None,
    ) -> QuantizeResult:
        """AutoRound, one transformer block at a time, on calibration ``batches``; rewrites ``model`` in place.

        The block learns on its inputs (the outputs of the blocks already quantized). Its target
        is the unquantized model's output at its depth (the unquantized block run on the
        unquantized model's hidden states, carried from block to block), so it also makes up for
        the error of the blocks before it; with ``autoround_model_target`` off, the unquantized
        block's output on its own inputs. The block's targeted layers learn their rounding
        together against the target, then are rounded once and swapped for QuantizedLinear. The calibration time counts the passes
        that make the targets and the next block's inputs; the optimisation is the method's own work.
        Targeted layers outside the blocks (rare) get round-to-nearest, noted in the result.
        """
        assert batches is not None
        options: AutoRoundOptions = config.options  # type: ignore[assignment]
        layers = self.plan(model, config)
        args = config.scheme.weights
        errors: list[LayerError] = []
        notes: list[str] = []
        done: set[str] = set()
        ratios: list[float] = []
        clock = CalibrationClock()

        model_stream: dict[str, BlockInputs] = {}  # "hidden": the unquantized model's outputs of the previous block

        def compress_block(block_name: str, block: nn.Module, inputs) -> None:
            prefix = block_name + "."
            targets = {n[len(prefix):]: m for n, m in layers.items() if n.startswith(prefix)}
            if options.autoround_model_target:
                if block_name.rsplit(".", 1)[-1] == "0":  # a stack's first block: both streams start together
                    release_inputs(model_stream.pop("hidden", []))
                previous = model_stream.pop("hidden", None)
                outputs = run_block(block, inputs, clock, hidden_states=previous)  # still unquantized
                model_stream["hidden"] = outputs  # kept: the next block's unquantized inputs
                if previous is not None:
                    release_inputs(previous)
            elif targets:
                outputs = run_block(block, inputs, clock)
            if not targets:
                return

            def loss(fake: dict[str, torch.Tensor], index: int) -> torch.Tensor:
                hidden, kwargs = inputs[index]
                weights = {f"{n}.weight": w.to(targets[n].weight.dtype) for n, w in fake.items()}
                output = functional_call(block, weights, (hidden,), kwargs)
                output = output[0] if isinstance(output, (tuple, list)) else output
                return F.mse_loss(output.float(), outputs[index][0].float())

            # only the offsets and clip factors get gradients; the block's own flags are put back
            frozen = [(p, p.requires_grad) for p in block.parameters()]
            for p, _ in frozen:
                p.requires_grad_(False)
            try:
                learned = learn_rounding(
                    {n: m.weight.detach() for n, m in targets.items()}, args, loss, len(inputs),
                    iterations=options.autoround_iters, lr=options.autoround_lr, batch=options.autoround_batch,
                    learn_clip=options.autoround_clip, seed=options.autoround_seed,
                )
            finally:
                for p, flag in frozen:
                    p.requires_grad_(flag)
                if not options.autoround_model_target:
                    release_inputs(outputs)
            if learned.rtn_loss > 0:
                ratios.append(learned.loss / learned.rtn_loss)
            for name, linear in targets.items():
                codes, scale, zero_point = round_weight(linear.weight, learned.rounding[name], args)
                qlinear = QuantizedLinear.from_codes(linear, config.scheme, codes, scale, zero_point)
                errors.append(replace_layer(model, prefix + name, linear, qlinear))
                done.add(prefix + name)

        try:
            calibration_s = calibrate_sequentially(model, batches, compress_block, on_step, clock)
        finally:
            release_inputs(model_stream.pop("hidden", []))
        finish_outside_blocks(model, config, layers, done, errors, notes)
        if ratios:
            kept = sum(r >= 1 for r in ratios)
            notes.append(
                f"AutoRound: block-output error {sum(ratios) / len(ratios):.0%} of round-to-nearest's on the "
                f"calibration text (mean of {len(ratios)} blocks; round-to-nearest kept in {kept})"
            )
        return QuantizeResult(
            layers=errors, quantized=list(layers), ignored=ignored_layers(model, layers), notes=notes,
            calibration_s=calibration_s,
        )
