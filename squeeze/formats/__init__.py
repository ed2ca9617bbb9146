"""Checkpoint formats a quantize pass can write, and the one place that picks between them.

- ``compressed-tensors`` (default): pack-quantized / int-quantized, read by transformers and vLLM;
- ``gptq``: qweight / qzeros / scales / g_idx, read by GPTQModel and transformers + optimum;
- ``bnb-int8`` and ``bnb-nf4``: bitsandbytes' serialisation, read by transformers with bitsandbytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.quant.scheme import QuantScheme

FORMATS = ("compressed-tensors", "gptq", "bnb-int8", "bnb-nf4")
NF4_SCHEME_HINT = "bnb-nf4 is NF4 with absolute-maximum blocks of 64 (4-bit, symmetric, per-group 64)"


def check_format(fmt: str, scheme: QuantScheme, method: str) -> None:
    """Raise SqueezeError when ``scheme`` or ``method`` cannot be stored as ``fmt`` (cheap; run first)."""
    if fmt not in FORMATS:
        raise SqueezeError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "gptq":
        from squeeze.formats.gptq import check_gptq_scheme

        check_gptq_scheme(scheme)
    elif fmt == "bnb-int8":
        from squeeze.formats.bnb import check_bnb_int8_scheme

        check_bnb_int8_scheme(scheme)
    elif fmt == "bnb-nf4":
        w = scheme.weights
        if method != "rtn":
            raise SqueezeError(f"--format bnb-nf4 rounds to the NF4 levels itself; {method} codes are integers: use --method rtn")
        if scheme.input_activations is not None or w.num_bits != 4 or not w.symmetric or w.group_size != 64:
            raise SqueezeError(f"{NF4_SCHEME_HINT}; got {scheme.describe()}: drop --bits/--mode/--group-size/--asym/--act")


def describe_format(fmt: str, scheme: QuantScheme) -> str:
    if fmt == "compressed-tensors":
        return f"compressed-tensors ({scheme.checkpoint_format})"
    if fmt == "bnb-nf4":
        return "bitsandbytes NF4 (4-bit NormalFloat, absmax blocks of 64)"
    if fmt == "bnb-int8":
        return "bitsandbytes LLM.int8 (int8 weights, SCB row scales)"
    return "GPTQ (qweight/qzeros/scales/g_idx)"


def layer_tensors(fmt: str, name: str, layer: nn.Module, gptq_version: str = "gptq") -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized layer in ``fmt``."""
    if fmt == "gptq":
        from squeeze.formats.gptq import gptq_tensors

        return gptq_tensors(name, layer, gptq_version)  # type: ignore[arg-type]
    if fmt.startswith("bnb-"):
        from squeeze.formats.bnb import bnb_layer_tensors

        return bnb_layer_tensors(name, layer)
    from squeeze.formats.compressed_tensors import quantized_tensors

    return quantized_tensors(name, layer)  # type: ignore[arg-type]


def weight_bytes(fmt: str, layer: nn.Module) -> int:
    """Checkpoint bytes of one layer's compressed weight (codes, scales, zero points; bias excluded)."""
    tensors = layer_tensors(fmt, "layer", layer, "gptq_v2")
    # metadata of constant size (shape, bitsandbytes' state and level table) is not weight data
    not_weight = ("bias", "input_scale", "input_zero_point", "weight_shape", "quant_map", "bitsandbytes__nf4")
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rpartition(".")[2] not in not_weight)


@dataclass
class Written:
    files: list[Path]
    notes: list[str]


def write(
    fmt: str,
    model: nn.Module,
    scheme: QuantScheme,
    ignored: list[str],
    out_dir: Path,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    method: dict | None = None,
    sparsity: tuple[str, float, list[str]] | None = None,
) -> Written:
    """Write ``model`` to ``out_dir`` in ``fmt``; notes say what a consumer should know.

    ``sparsity`` (structure, overall sparsity, sparse layer names) describes a pruned model:
    compressed-tensors records it as a ``sparsity_config`` beside the quantization config (the
    codes, zeros included, are stored dense); the other formats have no field for it.
    """
    sparse_notes = []
    if sparsity is not None and fmt != "compressed-tensors":
        sparse_notes.append(
            f"{fmt} has no field for sparsity: the zeros are stored as zero codes and a loader sees a dense layer"
        )
    if fmt == "gptq":
        from squeeze.formats.gptq import write_gptq_checkpoint

        files, version = write_gptq_checkpoint(model, scheme, out_dir, tokenizer, dtype, method)
        notes = []
        if version == "gptq_v2":
            notes.append(
                "written as gptq_v2: some group's zero point is 0, which GPTQ v1 cannot store; "
                "GPTQModel and transformers + optimum read it, AutoGPTQ does not"
            )
        return Written(files, notes + sparse_notes)
    if fmt.startswith("bnb-"):
        from squeeze.formats.bnb import write_bnb_checkpoint

        notes = []
        if fmt == "bnb-int8":
            notes.append(
                "bitsandbytes runs LLM.int8() on these weights: it also quantizes activations per row at run time "
                "(outlier columns above 6.0 stay 16-bit), so its outputs differ slightly from this weight-only evaluation"
            )
        return Written(write_bnb_checkpoint(model, fmt, ignored, out_dir, tokenizer, dtype), notes + sparse_notes)
    from squeeze.formats.compressed_tensors import write_checkpoint

    sparsity_config = None
    if sparsity is not None:
        from squeeze.formats.sparse import sparsity_config as make_sparsity_config

        sparsity_config = make_sparsity_config("dense", *sparsity)
    return Written(write_checkpoint(model, scheme, ignored, out_dir, tokenizer, dtype, sparsity_config), [])
