"""Magnitude pruning: remove the weights with the smallest |W|; no data."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from squeeze.prune.layers import Plan, PruneResult, prune_by_magnitude
from squeeze.prune.methods.base import PRUNE_METHODS, Batches, PruneMethod


@PRUNE_METHODS.register
class Magnitude(PruneMethod):
    name: ClassVar[str] = "magnitude"
    summary: ClassVar[str] = "magnitude (smallest |W|, no data)"
    no_data: ClassVar[str] = "none (magnitude pruning needs no data)"

    @torch.no_grad()
    def run(
        self, model: nn.Module, config: PruneConfig, plan: Plan, batches: Batches | None,
        on_step: Callable[[str], None] | None = None,
    ) -> PruneResult:
        """Per layer, or with one threshold across layers for ``scope="global"``; ``on_step`` per layer."""
        return PruneResult(layers=prune_by_magnitude(config, plan, on_step), dense=[])
