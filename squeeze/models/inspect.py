"""Describe a model from its config alone: sizes, parameter counts and memory estimates."""

from __future__ import annotations

from collections import Counter
from typing import Any

import gguf
import torch

from squeeze.calib.blocks import block_stacks
from squeeze.models.load import meta_model
from squeeze.models.sources import ModelSource, resolve_model


def inspect_model(source: ModelSource | str) -> dict[str, Any]:
    """Describe a model from its config alone (built on the meta device; no weights are read, but
    the config is first held against the weights' headers, see :func:`meta_model`).

    Parameter counts are of unique tensors (tied embeddings count once). ``params_quantizable``
    is the weights of the nn.Linear layers inside the repeated blocks, the ones quantization
    passes touch; ``params_embedding`` is the nn.Embedding weights. Memory, in bytes, for the
    weights only: fp32 = 4 B and bf16 = 2 B per parameter; int8 / int4 = the quantizable weights
    at 1 B / 0.5 B each plus everything else (embeddings, norms, biases, heads) at bf16.
    Quantization scales and zero points are ignored (about 1 % at group size 128). A GGUF file
    also lists its tensor types (``gguf_types``: type -> tensors of it) and ``file_bytes``.
    """
    if isinstance(source, str):
        source = resolve_model(source)
    model = meta_model(source)
    config = model.config
    params_total = sum(p.numel() for p in model.parameters())
    params_quantizable = sum(
        module.weight.numel()
        for _, blocks in block_stacks(model)
        for module in blocks.modules()
        if isinstance(module, torch.nn.Linear)
    )
    params_embedding = sum({id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}.values())
    params_other = params_total - params_quantizable
    return {
        "name": source.name,
        "kind": source.kind,
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "params_total": params_total,
        "params_quantizable": params_quantizable,
        "params_embedding": params_embedding,
        "bytes_fp32": 4 * params_total,
        "bytes_bf16": 2 * params_total,
        "bytes_int8": params_quantizable + 2 * params_other,
        "bytes_int4": (params_quantizable + 1) // 2 + 2 * params_other,
        **(_gguf_types(source) if source.is_gguf else {}),
    }


def _gguf_types(source: ModelSource) -> dict[str, Any]:
    """The GGUF file's tensor types (type name -> how many tensors) and its size in bytes."""
    reader = gguf.GGUFReader(source.path)
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return {"gguf_types": dict(sorted(types.items())), "file_bytes": source.path.stat().st_size}
