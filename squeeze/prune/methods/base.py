"""What a pruning method is: the contract each file in squeeze/prune/methods fulfils.

A method is a class with a name, an options model (squeeze.options.MethodOptions: the single
source of its option names, defaults, bounds and help text), whether it reads calibration text,
its cheap checks, its memory estimate and its run. The registry in
squeeze/prune/methods/__init__.py maps names to instances. Methods that calibrate one block at a
time (Wanda, SparseGPT) subclass :class:`BlockwisePruneMethod` and only prune one block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from squeeze.calib.blocks import all_blocks
from squeeze.calib.pipeline import BlockInputs, CalibrationClock, calibrate_sequentially
from squeeze.options import MethodOptions, MethodRegistry
from squeeze.prune.layers import LayerSparsity, Plan, PruneResult, prune_by_magnitude

# ``config`` arguments are squeeze.prune.config.PruneConfig, named only in annotations: the config
# module imports the registry of these methods to look them up by name.

Batches = list[dict[str, torch.Tensor]]


class PruneMethod:
    """Base of every pruning method; subclasses set the class attributes and override ``run``."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one phrase for the --method help, e.g. "magnitude (smallest |W|, no data)"
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_calibration: ClassVar[bool] = False  # reads calibration text (``batches`` is then not None)
    no_data: ClassVar[str] = "none (the method reads no text)"  # the report's calibration line when it reads none

    def check(self, config: PruneConfig) -> None:
        """Cheap checks of ``config`` before anything is read; raise OptionError naming the options at fault."""

    def calibration_bytes(self, model: nn.Module, tokens: int, dtype_bytes: int) -> int:
        """Memory, in bytes, the method holds beyond the block inputs and outputs while calibrating
        one block of ``model`` (the meta model is enough) on ``tokens`` calibration tokens."""
        return 0

    def steps(self, model: nn.Module, plan: Plan) -> tuple[str, int]:
        """What the progress bar shows: a label and the number of ``on_step`` calls ``run`` makes."""
        return "pruning layers", len(plan)

    def run(
        self, model: nn.Module, config: PruneConfig, plan: Plan, batches: Batches | None,
        on_step: Callable[[str], None] | None = None,
    ) -> PruneResult:
        """Prune the ``plan``'s layers (each to its sparsity, all above 0) of ``model`` in place;
        ``batches`` are the calibration windows (None when ``needs_calibration`` is false)."""
        raise NotImplementedError


class BlockwisePruneMethod(PruneMethod):
    """A method that prunes one transformer block at a time on calibration text; each block's
    pruned outputs feed the next. Subclasses implement ``prune_block``."""

    needs_calibration: ClassVar[bool] = True

    def steps(self, model: nn.Module, plan: Plan) -> tuple[str, int]:
        return f"{self.name}, block by block", len(all_blocks(model))

    def prune_block(
        self, block: nn.Module, inputs: BlockInputs, targets: dict[str, nn.Linear], plan: Plan, config: PruneConfig,
        clock: CalibrationClock,
    ) -> tuple[list[LayerSparsity], list[str]]:
        """Prune the ``targets`` of ``block`` (named as in the model) from its calibration ``inputs``;
        return what was pruned and notes. Time running the block goes on ``clock``."""
        raise NotImplementedError

    @torch.no_grad()
    def run(
        self, model: nn.Module, config: PruneConfig, plan: Plan, batches: Batches | None,
        on_step: Callable[[str], None] | None = None,
    ) -> PruneResult:
        assert batches is not None
        done: list[LayerSparsity] = []
        notes: list[str] = []
        clock = CalibrationClock()

        def prune_block(block_name: str, block: nn.Module, inputs: BlockInputs) -> None:
            targets = {name: plan[name][0] for name in plan if name.startswith(block_name + ".")}
            pruned, found = self.prune_block(block, inputs, targets, plan, config, clock)
            done.extend(pruned)
            notes.extend(found)

        calibration_s = calibrate_sequentially(model, batches, prune_block, on_step, clock)
        # a targeted layer no block's forward called (or one outside the blocks) has no statistics
        leftover = {name: entry for name, entry in plan.items() if name not in {layer.name for layer in done}}
        if leftover:
            done.extend(prune_by_magnitude(config, leftover, None))
            notes.append(f"magnitude pruning for {len(leftover)} layer(s) no block ran on calibration text: {', '.join(leftover)}")
        return PruneResult(layers=done, dense=[], notes=notes, calibration_s=calibration_s)


# The pruning methods by name. Each method's module registers its class with
# ``@PRUNE_METHODS.register``; squeeze/prune/methods/__init__.py imports the modules, in the order
# they are listed (the order of ``--method`` choices).
PRUNE_METHODS: MethodRegistry[PruneMethod] = MethodRegistry("pruning method", "method")
