"""Run quantized layers on integer kernels.

``squeeze quantize`` evaluates :class:`~squeeze.quant.linear.QuantizedLinear`, which dequantizes
its weight on every call: exact, but no faster than the dense model. Here the same codes and
scales run on kernels PyTorch ships for CPU (and CUDA):

- **W8A8** (int8 weights per channel, int8 activations per token, symmetric): each call
  quantizes its input rows with the scheme's own rounding, multiplies int8 × int8 into int32
  (``torch._int_mm``) and rescales by the row and channel scales. This is the checkpoint's
  arithmetic, not an approximation of it: only the order of float roundings differs. PyTorch's
  CPU ``_int_mm`` is fast only with AVX-512 (measured on an AVX2 EPYC: 40× slower than a float32
  matmul), so on other CPUs the same integer codes are multiplied in float32, which holds every
  product exactly and each sum exactly while it stays below 2²⁴.
- **W4A16** (int4 weights per group of 32/64/128/256): the weight is packed once for
  ``_weight_int4pack_mm`` and activations run in bfloat16 ("A16").
- **W8A16** (int8 weights per channel): ``_weight_int8pack_mm`` for short inputs, the same
  dequantize-then-matmul for long ones.

Other schemes (asymmetric activations, static activation scales, per-tensor weights, ...) keep the
reference forward. :func:`accelerate` says which layers moved to which kernel.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.rtn import compute_qparams

SHORT_INPUT_ROWS = 16  # at most this many rows per call (decoding) use the weight-only kernels
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm takes


def _cuda_int4_tiles(in_features: int, out_features: int) -> int | None:
    """The inner K tiles CUDA's int4 pack takes for a layer (8, 4 or 2: the input width must be a
    multiple of 16 of them, the output width of 8), None when none fits (e.g. width 576 takes 4)."""
    if out_features % 8:
        return None
    return next((tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0), None)


def int_mm_is_fast(device: torch.device) -> bool:
    """Whether ``torch._int_mm`` is used here: on CUDA, and on CPUs PyTorch runs with AVX-512 (on
    an AVX2 EPYC it measured 40× slower than a float32 matmul of the same shape)."""
    return device.type == "cuda" or torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class Int8DynamicLinear(nn.Module):
    """W8A8: int8 × int8 → int32 (``torch._int_mm``), inputs quantized per token at run time."""

    kernel = "int8 x int8 (_int_mm), per-token int8 activations"
    float_kernel = "int8 x int8 in float32 (no fast _int_mm on this CPU), per-token int8 activations"

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.act = layer.scheme.input_activations
        device = layer.weight_codes.device
        # CUDA's _int_mm wants both widths in multiples of 8; other layers take the float kernel there
        self.integer_mm = int_mm_is_fast(device) and (device.type != "cuda" or (self.in_features % 8 == 0 and self.out_features % 8 == 0))
        self.kernel = self.kernel if self.integer_mm else self.float_kernel
        self.register_buffer("weight_t", layer.weight_codes.t().contiguous())  # [in, out] int8
        self.register_buffer("weight_scale", layer.weight_scale.float().reshape(1, -1))
        self.bias = layer.bias

    @staticmethod
    def supports(layer: QuantizedLinear) -> bool:
        w, a = layer.scheme.weights, layer.scheme.input_activations
        return (
            a is not None and a.dynamic and a.strategy == "token" and a.symmetric and a.num_bits == 8
            and w.num_bits == 8 and w.symmetric and w.strategy == "channel"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x).float()
        act = self.act
        if act.scale_dtype is None:
            # what compute_qparams gives for symmetric per-token scales, in fewer passes over x
            scale = rows.abs().amax(dim=-1, keepdim=True) / ((act.qmax - act.qmin) / 2)
            scale = scale.masked_fill_(scale == 0, torch.finfo(scale.dtype).eps)
        else:
            scale, _ = compute_qparams(rows, act)
        codes = (rows / scale).round_().clamp_(act.qmin, act.qmax)  # integer-valued floats
        n = codes.shape[0]
        if not self.integer_mm:
            out = (codes @ self.weight_t.float()).mul_(scale).mul_(self.weight_scale)
        else:
            codes = codes.to(torch.int8)
            if codes.is_cuda and n <= 16:  # CUDA's _int_mm takes more than 16 rows: pad with zero rows
                codes = F.pad(codes, (0, 0, 0, 17 - n))
            out = torch._int_mm(codes, self.weight_t)[:n].float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out = out.add_(self.bias.float())
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int4PackedLinear(nn.Module):
    """W4A16: int4 codes packed once for ``_weight_int4pack_mm``, bfloat16 activations. Only the
    packed codes are kept (half a byte per weight), so long inputs use the kernel too."""

    kernel = "int4 weight pack (_weight_int4pack_mm), bfloat16 activations"

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.group_size = layer.scheme.weights.group_size
        self.bias = layer.bias
        codes = layer.weight_codes.to(torch.int32) + 8  # the kernel's unsigned 0..15
        scale = layer.weight_scale.float()
        zero = layer.weight_zero_point.float()
        # the kernel computes (q - 8) · scale + offset; ours is (c - z) · scale with c = q - 8
        scales_and_zeros = torch.stack([scale.t(), (-zero * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [groups, out, 2]
        if codes.is_cuda:
            tiles = _cuda_int4_tiles(self.in_features, self.out_features)
            packed = torch.ops.aten._convert_weight_to_int4pack(((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.register_buffer("packed", packed)

    @staticmethod
    def supports(layer: QuantizedLinear) -> bool:
        w = layer.scheme.weights
        return (
            layer.scheme.input_activations is None and w.num_bits == 4 and w.strategy == "group"
            and w.group_size in INT4_GROUP_SIZES and layer.in_features % w.group_size == 0
            and (layer.weight_codes.device.type != "cuda" or _cuda_int4_tiles(layer.in_features, layer.out_features) is not None)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x).to(torch.bfloat16)
        if rows.is_cuda:
            out = torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group_size, self.scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8WeightLinear(nn.Module):
    """W8A16: int8 codes with per-channel scales, bfloat16 activations: ``_weight_int8pack_mm``
    for short inputs (decoding); long ones (prefill) dequantize the weight per call, which is
    faster there."""

    kernel = "int8 weight (_weight_int8pack_mm), bfloat16 activations"

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bias = layer.bias
        self.register_buffer("codes", layer.weight_codes.contiguous())
        self.register_buffer("row_scale", layer.weight_scale.reshape(-1).to(torch.bfloat16))

    @staticmethod
    def supports(layer: QuantizedLinear) -> bool:
        w = layer.scheme.weights
        return layer.scheme.input_activations is None and w.num_bits == 8 and w.symmetric and w.strategy == "channel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x).to(torch.bfloat16)
        if rows.shape[0] <= SHORT_INPUT_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.row_scale)
        else:
            out = F.linear(rows, self.codes.to(torch.bfloat16) * self.row_scale[:, None])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


KERNELS: tuple[type, ...] = (Int8DynamicLinear, Int4PackedLinear, Int8WeightLinear)


@dataclass(frozen=True)
class Accelerated:
    """What :func:`accelerate` did: layers per kernel, and the dtype the rest of the model runs in."""

    kernels: dict[str, int]
    reference_layers: int  # quantized layers left on the dequantize-per-call forward
    compute_dtype: torch.dtype

    def describe(self) -> str:
        parts = [f"{n} layers on {k}" for k, n in self.kernels.items()]
        if self.reference_layers:
            parts.append(f"{self.reference_layers} on the reference (dequantize) forward")
        return "; ".join(parts) or "no quantized layers"


def accelerate(model: nn.Module) -> Accelerated:
    """Swap each QuantizedLinear for the kernel its scheme allows, in place. Weight-only (A16)
    models then run in bfloat16 as a whole, the activations their kernels take."""
    used: Counter[str] = Counter()
    reference = 0
    weight_only = False
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLinear):
            continue
        kernel = next((k for k in KERNELS if k.supports(module)), None)
        if kernel is None:
            reference += 1
            continue
        parent, _, child = name.rpartition(".")
        fast = kernel(module)
        setattr(model.get_submodule(parent) if parent else model, child, fast)
        used[fast.kernel] += 1
        weight_only |= kernel is not Int8DynamicLinear
    compute_dtype = next(model.parameters()).dtype
    if weight_only and not reference:
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
        compute_dtype = torch.bfloat16
    if isinstance(model, transformers.PreTrainedModel):
        model.config.dtype = compute_dtype
    return Accelerated(dict(used), reference, compute_dtype)
