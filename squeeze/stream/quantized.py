"""A compressed-tensors quantized checkpoint (a squeeze quantize output) read one part at a time.

Its quantized Linear layers are built on the meta device as QuantizedLinear layers. Their
codes, scales and zero points are read and unpacked when their block's turn comes, by the same
decoders the resident reader uses (squeeze.formats.compressed_tensors.layer_decoders). A
streamed evaluation therefore computes what the whole model loaded by squeeze computes.
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.formats.compressed_tensors import layer_decoders, quantization_scheme
from squeeze.quant.linear import QuantizedLinear
from squeeze.stream.lazy import CheckpointTensors


def quantized_layers(model: nn.Module, tensors: CheckpointTensors, compute_dtype: torch.dtype) -> int:
    """If ``tensors`` is a compressed-tensors quantized checkpoint, give ``model`` (on the meta
    device) a QuantizedLinear, on the meta device too, wherever the checkpoint holds a weight
    scale, and teach ``tensors`` to decode those layers' tensors when they are read. Returns the
    number of layers replaced (0 for any other checkpoint)."""
    scheme = quantization_scheme(tensors.folder)
    if scheme is None:
        return 0
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.weight_scale" not in tensors.files:
            continue
        decoders = layer_decoders(name, tensors.files, scheme, module.out_features, module.in_features)
        for attr, decoder in decoders.items():
            tensors.encoded[f"{name}.{attr}"] = decoder
        scale = tensors.empty(f"{name}.weight_scale")
        input_scale = tensors.empty(f"{name}.input_scale") if "input_scale" in decoders else None
        layer = QuantizedLinear(
            scheme,
            torch.empty(module.out_features, module.in_features, dtype=torch.int8, device="meta"),
            scale,
            torch.empty(scale.shape, dtype=torch.int8, device="meta"),
            module.bias,
            input_scale,
            torch.empty(input_scale.shape, dtype=torch.int8, device="meta") if input_scale is not None else None,
            compute_dtype=compute_dtype,
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        replaced += 1
    return replaced
