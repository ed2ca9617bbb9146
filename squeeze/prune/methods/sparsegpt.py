"""SparseGPT, one transformer block at a time: Hessians of the layers' inputs, then the
column-by-column prune and update of :func:`squeeze.prune.sparsegpt.sparsegpt_prune`."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from squeeze.calib.observers import hessian_bytes, observe_hessians
from squeeze.calib.parallel import gather_rows, solve_by_rows
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
    mask_per_row: bool = option(
        True, "SparseGPT, unstructured: choose each block's mask within every output row, so each row loses the same "
        "share of each block of columns (default); --mask-per-block: across the block's rows together, as the paper.",
        flag="--mask-per-row/--mask-per-block",
    )
    true_sequential: bool = option(
        True, "SparseGPT: calibrate each layer on the outputs of the layers already pruned in its block (o_proj on "
        "the pruned q/k/v's, down_proj on the pruned gate/up's; default); off: all from the unpruned block in one pass.",
        flag="--true-sequential/--no-true-sequential",
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
        pending = dict(targets)
        while pending:
            # layers reading the same input share one Hessian; true-sequential observes (and prunes)
            # one such group per pass, the layers before it already pruned
            observed = observe_hessians(block, inputs, pending, clock=clock, first_input_only=options.true_sequential)
            if options.true_sequential:
                first = observed.accumulators[observed.order[0]] if observed.order else None
                group = [n for n in observed.order if observed.accumulators[n] is first]
            else:
                group = [n for n in pending if n in observed.accumulators]
            for name in group:
                done.append(self._prune_layer(name, pending.pop(name), observed.accumulators[name].hessian, plan, config, notes))
            if observed.complete or not group:
                break  # what is still pending never ran in the block's forward: nothing to calibrate on
        return done, notes

    def _prune_layer(
        self, name: str, linear: nn.Linear, hessian: torch.Tensor, plan: Plan, config: PruneConfig, notes: list[str]
    ) -> LayerSparsity:
        options: SparseGPTOptions = config.options  # type: ignore[assignment]
        # rows are pruned independently unless the paper's mask spans a block's rows: under
        # data-parallel calibration each process then prunes its share of them
        rowwise = options.mask_per_row or config.n_m is not None
        mine = solve_by_rows(linear.out_features) if rowwise else slice(None)
        try:
            solved = sparsegpt_prune(
                linear.weight[mine], hessian, plan[name][1], config.n_m, options.block_size, options.damp_percent,
                per_row=options.mask_per_row,
            )
        except ArithmeticError as exc:
            raise OptionError(
                f"SparseGPT failed on {literal(name)}: {literal(str(exc))}; use more calibration text or a larger {{0}}",
                "damp_percent",
            ) from None
        if solved.retries:
            notes.append(f"SparseGPT raised the damping of {name} to {solved.damp:g} after {solved.retries} failed factorisation(s)")
        pruned = solved.weight if mine == slice(None) else gather_rows(solved.weight)
        original = linear.weight.detach().float()
        diff = pruned.to(original.device) - original
        output_error = relative_output_error(diff, original, hessian)
        linear.weight.data.copy_(pruned)
        return LayerSparsity(
            name=name,
            shape=(linear.out_features, linear.in_features),
            target=plan[name][1],
            zeros=int((linear.weight == 0).sum()),
            relative_error=float(diff.norm() / original.norm().clamp_min(1e-30)),
            max_abs_error=float(diff.abs().max()),
            output_error=output_error,
        )
