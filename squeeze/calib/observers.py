"""What calibration measures on the inputs of Linear layers: min/max ranges (static activation
scales) and Hessians ``H = 2/n Σ x xᵀ`` (GPTQ, SparseGPT)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn

from squeeze.calib.blocks import block_stacks
from squeeze.calib.parallel import reduce_extreme, reduce_mean, share
from squeeze.calib.pipeline import BlockInputs, CalibrationClock, StopBlock, run_block_observed

Ranges = dict[str, tuple[torch.Tensor, torch.Tensor]]


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` over every input row a Linear layer sees (float32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        total = self.rows + x.shape[0]
        self.hessian.mul_(self.rows / total)
        self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.rows = total


def hessian_bytes(model: nn.Module) -> int:
    """Bytes of one float32 ``in × in`` Hessian per Linear layer of a block (the first of each
    stack; the larger, in an encoder-decoder)."""
    return max(
        sum(m.in_features**2 * 4 for m in blocks[0].modules() if hasattr(m, "in_features")) if len(blocks) else 0
        for _, blocks in block_stacks(model)
    )


def merge_range(ranges: Ranges, name: str, x: torch.Tensor) -> None:
    """Widen ``ranges[name]`` (min, max) to cover ``x``."""
    lo, hi = torch.aminmax(x.detach().float())
    if name in ranges:
        lo, hi = torch.minimum(lo, ranges[name][0]), torch.maximum(hi, ranges[name][1])
    ranges[name] = (lo, hi)


def reduce_ranges(ranges: Ranges) -> None:
    """Under data-parallel calibration, every process's ranges widened to cover all processes'
    (every process must hold the same names)."""
    for name in sorted(ranges):
        lo, hi = ranges[name]
        ranges[name] = (reduce_extreme(lo.clone(), "min"), reduce_extreme(hi.clone(), "max"))


@torch.no_grad()
def observe_input_ranges(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[dict[str, torch.Tensor]],
    on_batch: Callable[[], None] | None = None,
) -> Ranges:
    """Min and max of every listed layer's input over calibration batches (static activation scales)."""
    ranges: Ranges = {}

    handles = [
        m.register_forward_pre_hook(lambda _module, args, name=n: merge_range(ranges, name, args[0]))
        for n, m in layers.items()
    ]
    try:
        for batch in share(list(batches)):
            model(**batch)
            if on_batch:
                on_batch()
    finally:
        for h in handles:
            h.remove()
    reduce_ranges(ranges)
    return ranges


class Hessians(NamedTuple):
    accumulators: dict[str, "HessianAccumulator"]  # per layer; layers that read one tensor share one
    ranges: Ranges  # input min/max per layer, when static activation scales are wanted
    order: list[str]  # the observed layers, in call order
    complete: bool  # every listed layer that the block calls was observed (no call was cut short)


@torch.no_grad()
def observe_hessians(
    block: nn.Module,
    inputs: BlockInputs,
    modules: dict[str, nn.Linear],
    static: bool = False,
    clock: CalibrationClock | None = None,
    first_input_only: bool = False,
) -> Hessians:
    """Run ``block`` on its calibration ``inputs`` and accumulate the Hessian of every listed
    layer's inputs (and their ranges when ``static``).

    Layers reading the very same tensor in one call (q/k/v, gate/up) share one accumulator.
    ``first_input_only`` observes only the layers that read the first listed layer's input (or
    that were observed already) and ends each call as soon as another listed layer is reached: a
    true-sequential solve needs just that group, and the rest of the forward would be wasted.
    """
    accumulators: dict[str, HessianAccumulator] = {}
    ranges: Ranges = {}
    order: list[str] = []
    # holding each tensor until the call ends keeps its memory from being reused by a later input
    # of the same call, whose address would then match (the MLP would inherit attention's Hessian)
    same_call: dict[tuple, tuple[HessianAccumulator, torch.Tensor]] = {}

    def observe_input(name: str, module: nn.Linear, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape))
        if key in same_call:
            acc = same_call[key][0]
        else:
            if first_input_only and accumulators and name not in accumulators:
                raise StopBlock
            acc = accumulators.get(name) or HessianAccumulator(module.in_features, x.device)
            acc.add(x)
            same_call[key] = (acc, x)
        accumulators[name] = acc
        if name not in order:
            order.append(name)
        if static:
            merge_range(ranges, name, x)

    try:
        complete = run_block_observed(block, inputs, modules, observe_input, before_call=same_call.clear, clock=clock)
    finally:
        same_call.clear()
    # data-parallel calibration: each shared accumulator once, in call order (the same in every process)
    for acc in {id(accumulators[name]): accumulators[name] for name in order}.values():
        acc.rows = reduce_mean(acc.hessian, acc.rows)
    reduce_ranges(ranges)
    return Hessians(accumulators, ranges, order, complete)
