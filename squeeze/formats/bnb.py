"""Write bitsandbytes checkpoints (``bnb-int8``, ``bnb-nf4``) that transformers reloads with
``BitsAndBytesConfig``: serialised the way bitsandbytes' own ``save_pretrained`` does.

- ``bnb-int8`` (LLM.int8 storage): per quantized Linear ``name.weight`` int8 ``[out, in]`` and
  ``name.SCB`` float32 ``[out]``, the weight being ``weight · SCB / 127``. It is squeeze's int8
  symmetric per-channel scheme with ``SCB = 127 · scale``, so RTN and GPTQ codes both fit. At
  inference bitsandbytes runs LLM.int8(): it also quantizes the activations per row, keeping
  columns above its outlier threshold (6.0) in 16 bits, so outputs differ slightly from squeeze's
  weight-only evaluation (the report says so).
- ``bnb-nf4``: ``name.weight`` uint8 ``[ceil(n / 2), 1]`` (two NF4 codes per byte),
  ``name.weight.absmax`` float32, ``name.weight.quant_map`` float32 ``[16]`` (the levels) and
  ``name.weight.quant_state.bitsandbytes__nf4``: a uint8 tensor holding the JSON
  ``{"quant_type", "blocksize", "dtype", "shape"}`` bitsandbytes needs to rebuild its state.

``config.json`` carries ``quant_method: bitsandbytes`` with ``load_in_8bit`` / ``load_in_4bit``
and ``llm_int8_skip_modules`` listing the Linear layers kept in full precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.formats.compressed_tensors import dense_tensors, save_safetensors, write_config_files
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.nf4 import NF4Linear, nf4_levels, pack_nibbles
from squeeze.quant.scheme import QuantScheme


def check_bnb_int8_scheme(scheme: QuantScheme) -> None:
    args = scheme.weights
    if scheme.input_activations is not None:
        raise SqueezeError("--format bnb-int8 stores int8 weights; bitsandbytes quantizes activations itself: drop --act")
    if args.num_bits != 8 or not args.symmetric or args.strategy != "channel":
        raise SqueezeError(f"--format bnb-int8 is int8 symmetric per-channel; got {args.describe()}")


def int8_tensors(name: str, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    out = {
        f"{name}.weight": layer.weight_codes.to(torch.int8),
        f"{name}.SCB": (layer.weight_scale.float().reshape(-1) * 127).contiguous(),
    }
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach()
    return out


def nf4_tensors(name: str, layer: NF4Linear) -> dict[str, torch.Tensor]:
    state = {
        "quant_type": "nf4",
        "blocksize": layer.blocksize,
        "dtype": str(layer.compute_dtype).removeprefix("torch."),
        "shape": [layer.out_features, layer.in_features],
    }
    out = {
        f"{name}.weight": pack_nibbles(layer.weight_codes),
        f"{name}.weight.absmax": layer.weight_absmax.float(),
        f"{name}.weight.quant_map": nf4_levels(),
        f"{name}.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8),
    }
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach()
    return out


def bnb_layer_tensors(name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(layer, NF4Linear):
        return nf4_tensors(name, layer)
    assert isinstance(layer, QuantizedLinear)
    return int8_tensors(name, layer)


def quantization_config(kind: str, ignored: list[str], compute_dtype: torch.dtype) -> dict:
    dtype = str(compute_dtype).removeprefix("torch.")
    config = {
        "quant_method": "bitsandbytes",
        "load_in_8bit": kind == "bnb-int8",
        "load_in_4bit": kind == "bnb-nf4",
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": sorted(ignored),
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": "uint8",
    }
    return config


def write_bnb_checkpoint(
    model: nn.Module,
    kind: str,
    ignored: list[str],
    out_dir: Path,
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Save ``model`` (QuantizedLinear int8 layers for bnb-int8, NF4Linear for bnb-nf4) for bitsandbytes."""
    layer_type = NF4Linear if kind == "bnb-nf4" else QuantizedLinear
    state: dict[str, torch.Tensor] = {}
    compute_dtype = dtype or torch.float32
    for name, layer in model.named_modules():
        if isinstance(layer, layer_type):
            state.update(bnb_layer_tensors(name, layer))
            compute_dtype = dtype or layer.compute_dtype
    state.update(dense_tensors(model, dtype, skip=layer_type))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config_files(model, out_dir, quantization_config(kind, ignored, compute_dtype), tokenizer, dtype)
    return save_safetensors({k: v.detach().contiguous().cpu() for k, v in state.items()}, out_dir)
