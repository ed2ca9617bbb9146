"""Every weight matrix as an ``nn.Linear`` layer, and back to the layout its checkpoint stores.

squeeze's methods, targets and formats work on ``nn.Linear`` layers (weight [out, in]). GPT-2 and
its relatives compute with transformers' ``Conv1D`` instead: the same product, with the weight
stored transposed ([in, out]). Rather than teach every method a second layout, a model's
``Conv1D`` layers become :class:`TransposedLinear` layers as soon as it is built (loaded, or on
the meta device for checks): Linear layers that remember the checkpoint's layout. Dense tensors
written back (:func:`stored_tensor`) go out as the checkpoint had them, so the output loads in
transformers as the original did; quantized layers are written in the Linear layout that the
GPTQ and bitsandbytes loaders of transformers use for ``Conv1D`` too.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class TransposedLinear(nn.Linear):
    """A ``Conv1D`` as a Linear layer: weight held [out, in], stored [in, out] in the checkpoint."""

    stored_transposed = True


def _linear_for(conv: Conv1D) -> TransposedLinear:
    in_features, out_features = conv.weight.shape
    with torch.device("meta"):
        linear = TransposedLinear(in_features, out_features, bias=conv.bias is not None)
    weight = conv.weight
    linear.weight = nn.Parameter(weight.detach().T.contiguous() if not weight.is_meta else weight.new_empty(out_features, in_features), requires_grad=False)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


def as_linear_layers(model: nn.Module) -> list[str]:
    """Replace every ``Conv1D`` inside ``model`` by an equivalent :class:`TransposedLinear` (in
    place; on the meta device too); the names of the layers replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, _linear_for(module))
            replaced.append(name)
    return replaced


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module``'s checkpoint stores its weight [in, out] (a ``Conv1D`` held as Linear)."""
    return bool(getattr(module, "stored_transposed", False))


def stored_tensor(module: nn.Module, attr: str, tensor: torch.Tensor) -> torch.Tensor:
    """``module``'s tensor ``attr`` in the layout the checkpoint stores (and back: the transpose is
    its own inverse)."""
    return tensor.T if attr == "weight" and is_transposed(module) and tensor.ndim == 2 else tensor


def to_held_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a checkpoint's tensors, by name) with the weights of ``model``'s
    :class:`TransposedLinear` layers turned into the layout the model holds."""
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if is_transposed(module) and key in state:
            state[key] = state[key].T.contiguous()
    return state
