"""Checkpoint formats: one class per format (writer, reader where squeeze reads it back, layouts,
output-name suffix), and the registries that name them.

Quantized models (``squeeze quantize --format``):

- ``compressed-tensors`` (default): pack-quantized / int-quantized, read by transformers and vLLM;
- ``gptq``: qweight / qzeros / scales / g_idx, read by GPTQModel and transformers + optimum;
- ``bnb-int8`` and ``bnb-nf4``: bitsandbytes' serialisation, read by transformers with bitsandbytes;
- ``gguf``: one GGUF file (Q4_0 / Q4_1 / Q8_0 blocks from squeeze's codes), run by llama.cpp.

Pruned models (``squeeze prune --format``): ``sparse-bitmask`` (default; compressed-tensors'
layout, smaller on disk) and ``dense`` (the zeros stored, loads with ``from_pretrained``).

Adding a format is one file (a :class:`~squeeze.formats.base.QuantizedFormat` or
:class:`~squeeze.formats.base.PrunedFormat` registered with ``@QUANTIZED_FORMATS.register`` or
``@PRUNED_FORMATS.register``) and its module's name in the import below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from squeeze.formats import compressed_tensors, gptq, bnb, gguf, sparse  # noqa: F401  (one module per format family)
from squeeze.errors import OptionError, literal
from squeeze.formats.base import (
    PRUNED_FORMATS, QUANTIZED_FORMATS, FixedScheme, Format, PrunedFormat, QuantizedFormat, Sparsity, Written,
)
from squeeze.quant.scheme import QuantScheme

FORMATS = QUANTIZED_FORMATS.names()  # the quantized formats' names, default first


def recognise(folder: Path) -> Format | None:
    """The format whose reader takes the checkpoint in ``folder``; None for a plain model folder
    (or a format squeeze does not read back). Reads config.json only. Pruned formats are asked
    first: their config may also carry a compressed-tensors quantization_config."""
    for fmt in (*PRUNED_FORMATS, *QUANTIZED_FORMATS):
        if fmt.recognises(folder):
            return fmt
    return None


# --- by name, for callers that hold a format's name (thin lookups in the registries) ---------


def fixed_scheme(fmt: str) -> FixedScheme | None:
    """The one scheme format ``fmt`` stores (bnb-nf4), if it fixes one; None for unknown formats
    too (the config reports those)."""
    return QUANTIZED_FORMATS.get(fmt).fixed_scheme if fmt in QUANTIZED_FORMATS else None


def format_options_of(stage: BaseModel, fmt: str) -> dict[str, Any]:
    """The options of format ``fmt`` that ``stage`` (a recipe stage, or the CLI's options) holds;
    OptionError for another format's option set away from its default (``gguf_type`` with ``format: gptq``)."""
    own = QUANTIZED_FORMATS.get(fmt).Options.model_fields
    for name, declared in QUANTIZED_FORMATS.options().items():
        if name not in own and getattr(stage, name) != declared.default:
            raise OptionError(f"{{0}} is an option of another format than {literal(fmt)}: drop it or choose its {{1}}", name, "format")
    return {name: getattr(stage, name) for name in own}


def quantized_format(fmt: str, options=None) -> QuantizedFormat:
    """The quantized format ``fmt`` with its own ``options`` (a mapping or its Options model; None: defaults)."""
    return QUANTIZED_FORMATS.get(fmt).with_options(options)


def check_format(fmt: str, scheme: QuantScheme, method: str, options=None) -> None:
    """Raise SqueezeError when ``scheme`` or ``method`` cannot be stored as ``fmt`` with its
    ``options`` (cheap; run first)."""
    quantized_format(fmt, options).check(scheme, method)


def describe_format(fmt: str, scheme: QuantScheme) -> str:
    """The quantized format ``fmt`` in a report's words."""
    return QUANTIZED_FORMATS.get(fmt).describe(scheme)


def layer_tensors(fmt: str, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized layer in ``fmt``."""
    return QUANTIZED_FORMATS.get(fmt).layer_tensors(name, layer)


def weight_bytes(fmt: str, layer: nn.Module) -> int:
    """Checkpoint bytes of one layer's compressed weight (codes, scales, zero points; bias excluded)."""
    return QUANTIZED_FORMATS.get(fmt).weight_bytes(layer)


def write(
    fmt: str,
    model: nn.Module,
    scheme: QuantScheme,
    ignored: list[str],
    out_dir: Path,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    method: dict | None = None,
    sparsity: Sparsity | None = None,
) -> Written:
    """Write quantized ``model`` to ``out_dir`` in ``fmt`` (see :meth:`QuantizedFormat.write`)."""
    return QUANTIZED_FORMATS.get(fmt).write(model, scheme, ignored, out_dir, tokenizer, dtype, method, sparsity)


def write_pruned_checkpoint(
    model: nn.Module,
    fmt: str,
    structure: str,
    global_sparsity: float,
    sparse_layers: list[str],
    out_dir: Path,
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write pruned ``model`` in ``fmt`` (see :meth:`PrunedFormat.write`); the safetensors files written."""
    return PRUNED_FORMATS.get(fmt).write(model, structure, global_sparsity, sparse_layers, out_dir, tokenizer, dtype).files


__all__ = [
    "FORMATS",
    "PRUNED_FORMATS",
    "QUANTIZED_FORMATS",
    "Format",
    "PrunedFormat",
    "QuantizedFormat",
    "Written",
    "check_format",
    "describe_format",
    "layer_tensors",
    "quantized_format",
    "recognise",
    "weight_bytes",
    "write",
    "write_pruned_checkpoint",
]
