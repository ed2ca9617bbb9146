"""The quantize pass as a library call: plan the layers, then quantize them with the config's method.

``quantize_model(model, config)`` rewrites any ``nn.Module``'s targeted Linear layers in place;
the method (squeeze.quant.methods) decides how.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.formats import quantized_format
from squeeze.quant.config import QuantizeConfig
from squeeze.quant.layers import QuantizeResult
from squeeze.quant.methods import METHODS
from squeeze.quant.rotate import check_rotatable

__all__ = ["QuantizeConfig", "QuantizeResult", "plan_quantize", "quantize_model"]


def plan_quantize(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Linear]:
    """The layers ``quantize_model`` will quantize, after every check against ``model``: patterns,
    group sizes, what the method needs of the architecture and what the checkpoint format can hold.
    Cheap: run it on the meta model before loading weights (and ``squeeze.formats.check_format``,
    which needs no model, before that)."""
    if config.rotate != "none":
        check_rotatable(model)  # the architecture, before anything else: a rotation changes every layer
    layers = METHODS.get(config.method).plan(model, config)
    quantized_format(config.format, config.format_options).check_model(model, list(layers), config.scheme)
    return layers


def quantize_model(
    model: nn.Module,
    config: QuantizeConfig,
    batches: list[dict[str, torch.Tensor]] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize the targeted Linear layers of ``model`` in place with ``config.method``.

    ``batches`` are the calibration inputs (``model(**batch)``), required when
    ``config.needs_calibration``. ``on_step`` is called with a layer or block name as the method
    progresses (``METHODS.get(config.method).steps`` says how often).
    """
    method = METHODS.get(config.method)
    if batches is None and method.needs_calibration(config):
        raise SqueezeError(
            f"{config.method} with {config.scheme.name} measures the layers' inputs: it needs calibration text (batches)"
        )
    return method.run(model, config, batches, on_step)
