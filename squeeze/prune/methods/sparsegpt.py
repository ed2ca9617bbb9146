"""SparseGPT, one transformer block at a time: Hessians of the layers' inputs, then the
column-by-column prune and update of :func:`squeeze.prune.sparsegpt.sparsegpt_prune`."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from squeeze.calib.observers import hessian_bytes, observe_hessians
from squeeze.calib.pipeline import BlockInputs, CalibrationClock
from squeeze.errors import OptionError, literal
from squeeze.options import MethodOptions, option
from squeeze.prune.layers import LayerSparsity, Plan
from squeeze.prune.methods.base import PRUNE_METHODS, BlockwisePruneMethod
from squeeze.prune.sparsegpt import sparsegpt_prune
from squeeze.quant.gptq import relative_output_error


class SparseGPTOptions(MethodOptions):
    block_size: int = option(
        128, "SparseGPT: columns whose mask is chosen together.", ge=1, error="SparseGPT block size must be positive"
    )
    damp_percent: float = option(
        0.01, "SparseGPT: damping added to the Hessian diagonal, as a fraction of its mean.",
        gt=0, le=1, error="damp percent must be in (0, 1]",
    )


@PRUNE_METHODS.register
class SparseGPT(BlockwisePruneMethod):
    name: ClassVar[str] = "sparsegpt"
    summary: ClassVar[str] = "sparsegpt (Hessian-weighted, updates the surviving weights)"
    Options: ClassVar[type[MethodOptions]] = SparseGPTOptions

    def check(self, config: PruneConfig) -> None:
        if config.scope == "global":
            raise OptionError(
                "SparseGPT chooses its mask block by block inside each layer; {0} global is for magnitude pruning", "scope"
            )

    def calibration_bytes(self, model: nn.Module, tokens: int, dtype_bytes: int) -> int:
        return hessian_bytes(model)

    def prune_block(
        self, block: nn.Module, inputs: BlockInputs, targets: dict[str, nn.Linear], plan: Plan, config: PruneConfig,
        clock: CalibrationClock,
    ) -> tuple[list[LayerSparsity], list[str]]:
        options: SparseGPTOptions = config.options  # type: ignore[assignment]
        done: list[LayerSparsity] = []
        notes: list[str] = []
        # one pass over the block as it is: layers reading the same input share one Hessian
        accumulators = observe_hessians(block, inputs, targets, clock=clock).accumulators
        for name, linear in targets.items():
            if name not in accumulators:
                continue
            hessian = accumulators[name].hessian
            try:
                solved = sparsegpt_prune(
                    linear.weight, hessian, plan[name][1], config.n_m, options.block_size, options.damp_percent
                )
            except ArithmeticError as exc:
                raise OptionError(
                    f"SparseGPT failed on {literal(name)}: {literal(str(exc))}; use more calibration text or a larger {{0}}",
                    "damp_percent",
                ) from None
            if solved.retries:
                notes.append(f"SparseGPT raised the damping of {name} to {solved.damp:g} after {solved.retries} failed factorisation(s)")
            original = linear.weight.detach().float()
            diff = solved.weight.to(original.device) - original
            output_error = relative_output_error(diff, original, hessian)
            linear.weight.data.copy_(solved.weight)
            done.append(
                LayerSparsity(
                    name=name,
                    shape=(linear.out_features, linear.in_features),
                    target=plan[name][1],
                    zeros=int((linear.weight == 0).sum()),
                    relative_error=float(diff.norm() / original.norm().clamp_min(1e-30)),
                    max_abs_error=float(diff.abs().max()),
                    output_error=output_error,
                )
            )
        return done, notes
