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
from typing import ClassVar

import torch
from torch import nn

from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.formats.base import QUANTIZED_FORMATS, FixedScheme, InputRange, QuantizedFormat, Sparsity, Written
from squeeze.formats.files import dense_tensors, save_safetensors, write_config_files
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.nf4 import NF4_BLOCKSIZE, NF4Linear, nf4_levels, pack_nibbles
from squeeze.quant.scheme import QuantScheme

NF4_SCHEME_HINT = "bnb-nf4 is NF4 with absolute-maximum blocks of 64 (4-bit, symmetric, per-group 64)"


def check_bnb_int8_scheme(scheme: QuantScheme) -> None:
    """Raise SqueezeError unless ``scheme`` is int8 symmetric per-channel weights only."""
    args = scheme.weights
    if scheme.input_activations is not None:
        raise SqueezeError("--format bnb-int8 stores int8 weights; bitsandbytes quantizes activations itself: drop --act")
    if args.num_bits != 8 or not args.symmetric or args.signed_scale or args.strategy != "channel":
        raise SqueezeError(f"--format bnb-int8 is int8 symmetric per-channel; got {args.describe()}")


def check_bnb_nf4(scheme: QuantScheme, method: str) -> None:
    """Raise SqueezeError unless ``method`` is RTN and ``scheme`` is NF4's own (4-bit symmetric blocks of 64)."""
    w = scheme.weights
    if method != "rtn":
        raise SqueezeError(f"--format bnb-nf4 rounds to the NF4 levels itself; {method} codes are integers: use --method rtn")
    if scheme.input_activations is not None or w.num_bits != 4 or not w.symmetric or w.group_size != NF4_BLOCKSIZE:
        raise SqueezeError(f"{NF4_SCHEME_HINT}; got {scheme.describe()}: drop --bits/--mode/--group-size/--asym/--act")


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


def quantization_config(four_bit: bool, ignored: list[str], compute_dtype: torch.dtype) -> dict:
    """The ``quantization_config`` transformers reads with BitsAndBytesConfig: 8-bit, or 4-bit NF4."""
    dtype = str(compute_dtype).removeprefix("torch.")
    config = {
        "quant_method": "bitsandbytes",
        "load_in_8bit": not four_bit,
        "load_in_4bit": four_bit,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": sorted(ignored),
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": "uint8",
    }
    return config


class _Bitsandbytes(QuantizedFormat):
    """What bnb-int8 and bnb-nf4 share: the layers' tensors beside the dense rest, and the config."""

    four_bit: ClassVar[bool]

    def check_model(self, model: nn.Module, layers: list[str], scheme: QuantScheme) -> None:
        """bitsandbytes swaps a layer's weight for its own int8/4-bit tensor and leaves the layer's
        forward in place: a Linear subclass with a forward of its own (Falcon's) then multiplies by
        the raw codes, so such layers are refused."""
        super().check_model(model, layers, scheme)
        own = [n for n in layers if type(model.get_submodule(n)).forward is not nn.Linear.forward]
        if own:
            layer = model.get_submodule(own[0])
            raise OptionError(
                f"transformers runs {literal(own[0])} ({literal(type(layer).__name__)}) with its own forward, which "
                f"multiplies by the weight itself: {literal(self.name)} weights would be used as raw codes; quantize W8A8 "
                "({0} per-token) in compressed-tensors instead, or leave those layers out with {1}", "act", "ignore",
            )

    def _write(
        self, model: nn.Module, scheme: QuantScheme, ignored: list[str], out_dir: Path, tokenizer, dtype: torch.dtype | None,
        method: dict, sparsity: Sparsity | None, max_shard_bytes: int,
    ) -> Written:
        state: dict[str, torch.Tensor] = {}
        compute_dtype = dtype or torch.float32
        for name, layer in model.named_modules():
            if isinstance(layer, self.layer_type):
                state.update(self.layer_tensors(name, layer))
                compute_dtype = dtype or layer.compute_dtype
        state.update(dense_tensors(model, dtype, skip=self.layer_type))
        out_dir.mkdir(parents=True, exist_ok=True)
        write_config_files(model, out_dir, quantization_config(self.four_bit, ignored, compute_dtype), tokenizer, dtype)
        files = save_safetensors({k: v.detach().contiguous().cpu() for k, v in state.items()}, out_dir, max_shard_bytes)
        return Written(files, [])


@QUANTIZED_FORMATS.register
class BnbInt8(_Bitsandbytes):
    """bitsandbytes LLM.int8() storage: int8 weights with SCB row scales."""

    name = "bnb-int8"
    summary = "bnb-int8 (transformers + bitsandbytes)"
    suffix = "-bnb-int8"
    four_bit = False
    notes = (
        "bitsandbytes runs LLM.int8() on these weights: it also quantizes activations per row at run time "
        "(outlier columns above 6.0 stay 16-bit), so its outputs differ slightly from this weight-only evaluation",
    )

    def check(self, scheme: QuantScheme, method: str) -> None:
        check_bnb_int8_scheme(scheme)

    def describe(self, scheme: QuantScheme) -> str:
        return "bitsandbytes LLM.int8 (int8 weights, SCB row scales)"

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        return int8_tensors(name, layer)  # type: ignore[arg-type]


@QUANTIZED_FORMATS.register
class BnbNf4(_Bitsandbytes):
    """bitsandbytes 4-bit NormalFloat: it fixes the scheme (4-bit symmetric blocks of 64) and its
    own rounding, so only RTN writes it."""

    name = "bnb-nf4"
    summary = "bnb-nf4 (transformers + bitsandbytes)"
    suffix = "-bnb-nf4"
    four_bit = True
    layer_type = NF4Linear
    fixed_scheme = FixedScheme(
        mode="per-group", bits=4, group_size=NF4_BLOCKSIZE, label="nf4", description="NF4 (bitsandbytes), absmax blocks of 64",
    )

    def check(self, scheme: QuantScheme, method: str) -> None:
        check_bnb_nf4(scheme, method)

    def describe(self, scheme: QuantScheme) -> str:
        return "bitsandbytes NF4 (4-bit NormalFloat, absmax blocks of 64)"

    def quantized_layer(self, linear: nn.Linear, scheme: QuantScheme, input_range: InputRange | None = None) -> nn.Module:
        return NF4Linear.from_linear(linear, scheme.weights.group_size or NF4_BLOCKSIZE)

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        return nf4_tensors(name, layer)  # type: ignore[arg-type]
