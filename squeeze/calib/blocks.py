"""Where a model keeps its transformer blocks: one stack of them, or two in an encoder-decoder."""

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


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` has an encoder stack and a decoder stack (T5, BART)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and module of the model's list of transformer blocks (one stack: an encoder-decoder
    has two, see :func:`block_stacks`)."""
    if is_encoder_decoder(model):
        raise ValueError(f"{type(model).__name__} has an encoder and a decoder stack: use block_stacks")
    name = find_blocks(model, getattr(getattr(model, "config", None), "num_hidden_layers", None))
    if name is None:
        raise SqueezeError("cannot find the model's list of transformer blocks for layer-by-layer calibration")
    return name, model.get_submodule(name)


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's stacks of blocks, in the order its forward runs them: the one of a decoder-only
    LM or an encoder; the encoder's then the decoder's in an encoder-decoder."""
    if not is_encoder_decoder(model):
        return [block_list(model)]
    return [_stack(model, side) for side in ("encoder", "decoder")]


def all_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every block of every stack with its full name (``model.layers.3``, ``decoder.block.0``)."""
    return [(f"{prefix}.{i}", block) for prefix, blocks in block_stacks(model) for i, block in enumerate(blocks)]


def _stack(model: nn.Module, side: str) -> tuple[str, nn.ModuleList]:
    """The blocks of an encoder-decoder's ``side``: the shallowest list of modules of one class
    inside its shallowest module called ``side`` (``encoder``, ``model.decoder``)."""
    sides = [name for name, _ in model.named_modules() if name.rpartition(".")[2] == side]
    if not sides:
        raise SqueezeError(f"cannot find the {side} of {type(model).__name__}")
    root = min(sides, key=lambda name: name.count("."))
    lists = [
        (name, module) for name, module in model.named_modules()
        if name.startswith(root + ".") and isinstance(module, nn.ModuleList) and len(module) > 0
        and len({type(m) for m in module}) == 1
    ]
    if not lists:
        raise SqueezeError(f"cannot find the blocks of the {side} of {type(model).__name__}")
    return min(lists, key=lambda item: item[0].count("."))
