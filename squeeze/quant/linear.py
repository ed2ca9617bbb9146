"""QuantizedLinear: a Linear layer that holds integer weight codes, scales and zero points.

It stores what the checkpoint stores (int8 codes, one per byte in memory; scales; zero points;
a static input scale when calibrated) and dequantizes in ``forward``, so what squeeze evaluates
is exactly what a consumer of the checkpoint computes; within squeeze.weightcache's
``reuse_dequantized`` scope, once for many calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.quant.rtn import compute_qparams, dequantize, fake_quantize, qparams_from_minmax, quantize
from squeeze.quant.scheme import QuantScheme
from squeeze.weightcache import dequantized


class QuantizedLinear(nn.Module):
    """Integer-weight replacement for ``nn.Linear`` (weights ``[out, in]``)."""

    def __init__(
        self,
        scheme: QuantScheme,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bias: torch.Tensor | None,
        input_scale: torch.Tensor | None = None,
        input_zero_point: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.out_features, self.in_features = codes.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_codes", codes.to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point.to(torch.int8))
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        if input_scale is not None:
            self.register_buffer("input_scale", input_scale)
            self.register_buffer("input_zero_point", input_zero_point)
        else:
            self.input_scale = None
            self.input_zero_point = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scheme: QuantScheme,
        input_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> "QuantizedLinear":
        """Round-to-nearest quantization of ``linear``'s weight.

        ``input_range`` is the calibrated (min, max) of the layer's inputs, needed for static
        per-tensor activation scales.
        """
        weight = linear.weight.detach()
        scale, zero_point = compute_qparams(weight, scheme.weights)
        codes = quantize(weight, scale, zero_point, scheme.weights)
        return cls.from_codes(linear, scheme, codes, scale, zero_point, input_range)

    @classmethod
    def from_codes(
        cls,
        linear: nn.Linear,
        scheme: QuantScheme,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        input_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> "QuantizedLinear":
        """Wrap codes computed by any method (RTN, GPTQ, ...) for ``linear``."""
        input_scale = input_zero_point = None
        act = scheme.input_activations
        if act is not None and not act.dynamic:
            if input_range is None:
                raise ValueError("static activation quantization needs a calibrated input range")
            lo, hi = input_range
            input_scale, input_zero_point = qparams_from_minmax(
                lo.reshape(1).float(), hi.reshape(1).float(), act
            )
        return cls(
            scheme,
            codes,
            scale,
            zero_point,
            linear.bias,
            input_scale,
            input_zero_point,
            compute_dtype=linear.weight.dtype,
        )

    @property
    def weight(self) -> torch.Tensor:
        """The shape and dtype of the weight this layer computes with, on the meta device: no
        values (those are :meth:`dequantized_weight`). Some models read a layer's weight dtype in
        their forward (T5's feed-forward casts its input to it)."""
        return torch.empty(self.out_features, self.in_features, dtype=self.compute_dtype, device="meta")

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The real-valued weight the codes stand for, ``[out, in]``."""
        return dequantize(
            self.weight_codes, self.weight_scale, self.weight_zero_point, self.scheme.weights,
            dtype=dtype or self.compute_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.scheme.input_activations
        if act is not None:
            x = fake_quantize(x, act, self.input_scale, self.input_zero_point)
        sources = (self.weight_codes, self.weight_scale, self.weight_zero_point)
        weight = dequantized(self, sources, x.dtype, lambda: self.dequantized_weight(x.dtype))
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}"
