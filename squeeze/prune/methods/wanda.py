"""Wanda, one transformer block at a time: the input-feature norms of each layer, then the
per-row ranking of :func:`squeeze.prune.wanda.wanda_scores`."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from squeeze.calib.parallel import reduce_sum
from squeeze.calib.pipeline import BlockInputs, CalibrationClock, run_block_observed
from squeeze.errors import OptionError
from squeeze.prune.layers import LayerSparsity, Plan, apply_mask, layer_mask
from squeeze.prune.methods.base import PRUNE_METHODS, BlockwisePruneMethod
from squeeze.prune.wanda import InputNormAccumulator, wanda_scores


@PRUNE_METHODS.register
class Wanda(BlockwisePruneMethod):
    name: ClassVar[str] = "wanda"
    summary: ClassVar[str] = "wanda (|W| times input-feature norm)"

    def check(self, config: PruneConfig) -> None:
        if config.scope == "global":
            raise OptionError("Wanda compares weights within each output row; {0} global is for magnitude pruning", "scope")

    def prune_block(
        self, block: nn.Module, inputs: BlockInputs, targets: dict[str, nn.Linear], plan: Plan, config: PruneConfig,
        clock: CalibrationClock,
    ) -> tuple[list[LayerSparsity], list[str]]:
        norms: dict[str, InputNormAccumulator] = {}

        def observe(name: str, module: nn.Module, x: torch.Tensor) -> None:
            if name not in norms:
                norms[name] = InputNormAccumulator(module.in_features, x.device)
            norms[name].add(x)

        run_block_observed(block, inputs, targets, observe, clock=clock)
        for name in sorted(norms):  # data-parallel calibration: every process's Σ x²
            reduce_sum(norms[name].squared)
        done = []
        for name, linear in targets.items():
            if name in norms:
                keep = layer_mask(wanda_scores(linear.weight, norms[name].norms), plan[name][1], config, per_row=True)
                done.append(apply_mask(name, linear, keep, plan[name][1]))
        return done, []
