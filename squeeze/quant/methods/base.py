"""What a quantization method is: the contract each file in squeeze/quant/methods fulfils.

A method is a class with a name, an options model (squeeze.options.MethodOptions: the single
source of its option names, defaults, bounds and help text), the scheme it defaults to, its
cheap checks, its memory estimate and its run. The registry in squeeze/quant/methods/__init__.py
maps names to instances. Adding a method is one file here and one line there: the CLI's options,
recipe keys, report settings and --help text all come from the class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from squeeze.calib.blocks import all_blocks
from squeeze.options import MethodOptions, MethodRegistry
from squeeze.quant.layers import QuantizeResult, plan_layers

# ``config`` arguments are squeeze.quant.config.QuantizeConfig, named only in annotations: the
# config module imports the registry of these methods to look them up by name.

Batches = list[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class SchemeDefaults:
    """The weight scheme a method uses where the user leaves it open."""

    mode: str = "per-channel"
    bits: int = 8
    asym: bool = False


class QuantMethod:
    """Base of every quantization method; subclasses set the class attributes and override ``run``."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one phrase for the --method help, e.g. "gptq (Hessian-aware rounding)"
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    defaults: ClassVar[SchemeDefaults] = SchemeDefaults()
    blockwise: ClassVar[bool] = True  # calibrates one transformer block at a time
    data_parallel: ClassVar[bool] = True  # shares its calibration among torchrun's processes (squeeze.calib.parallel)
    no_data: ClassVar[str] = "none (the method reads no text)"  # the report's calibration line when it reads none

    def needs_calibration(self, config: QuantizeConfig) -> bool:
        """Whether the run reads calibration text (``batches`` is then not None)."""
        return True

    def check(self, config: QuantizeConfig) -> None:
        """Cheap checks of ``config.scheme`` and ``config.options`` before anything is read; raise
        OptionError naming the options at fault."""

    def check_model(self, model: nn.Module, config: QuantizeConfig) -> None:
        """Checks against the model (the meta model is enough: only structure and shapes)."""

    def plan(self, model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Linear]:
        """The layers ``run`` quantizes, after every check against ``model`` (cheap: the meta
        model is enough, so run it before loading weights)."""
        layers = plan_layers(model, config)
        self.check_model(model, config)
        return layers

    def calibration_bytes(self, model: nn.Module, tokens: int, dtype_bytes: int) -> int:
        """Memory, in bytes, the method holds beyond the block inputs and outputs while calibrating
        one block of ``model`` (the meta model is enough) on ``tokens`` calibration tokens of
        ``dtype_bytes`` each (e.g. one Hessian per Linear for GPTQ)."""
        return 0

    def steps(self, model: nn.Module, layers: dict[str, nn.Module]) -> tuple[str, int]:
        """What the progress bar shows: a label and the number of ``on_step`` calls ``run`` makes."""
        return f"{self.name}, block by block", len(all_blocks(model))

    def run(
        self,
        model: nn.Module,
        config: QuantizeConfig,
        batches: Batches | None,
        on_step: Callable[[str], None] | None = None,
    ) -> QuantizeResult:
        """Quantize the targeted layers of ``model`` in place; ``batches`` are the calibration
        windows (None when ``needs_calibration`` is false). ``result.calibration_s`` is the time
        spent running calibration text, within the run's time."""
        raise NotImplementedError


# The quantization methods by name. Each method's module registers its class with
# ``@METHODS.register``; squeeze/quant/methods/__init__.py imports the modules, in the order
# they are listed (the order of ``--method`` choices).
METHODS: MethodRegistry[QuantMethod] = MethodRegistry("quantization method", "method")
