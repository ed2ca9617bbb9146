"""Where a model keeps its transformer blocks."""

from __future__ import annotations

from torch import nn

from squeeze.errors import SqueezeError


def find_blocks(model: nn.Module, num_layers: int | None) -> str | None:
    """Name of the ModuleList holding the transformer blocks (e.g. "model.layers", "encoder.layer")."""
    candidates = [
        (name, len(module))
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    if num_layers is not None:
        exact = [name for name, length in candidates if length == num_layers]
        if exact:
            return exact[0]
    return max(candidates, key=lambda c: c[1])[0] if candidates else None


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and module of the model's list of transformer blocks."""
    name = find_blocks(model, getattr(getattr(model, "config", None), "num_hidden_layers", None))
    if name is None:
        raise SqueezeError("cannot find the model's list of transformer blocks for layer-by-layer calibration")
    return name, model.get_submodule(name)
