"""NF4: bitsandbytes' 4-bit NormalFloat weights, computed by squeeze.

The weight is flattened (row-major) and cut into blocks of ``blocksize`` values; each block keeps
its absolute maximum (float32) and every value becomes the index of the nearest of 16 fixed
levels in [-1, 1] after division by that maximum. The levels are the NormalFloat quantiles of the
QLoRA paper (Dettmers et al., 2023): spaced so that each holds an equal share of a normal
distribution, with an exact zero. Dequantized: ``level[code] · absmax[block]``.

:class:`NF4Linear` holds the codes and block maxima and dequantizes in ``forward``, so what squeeze
evaluates is what bitsandbytes computes from the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.weightcache import dequantized

# The 16 NormalFloat-4 levels (published constants; bitsandbytes stores the same as quant_map).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NF4_BLOCKSIZE = 64  # bitsandbytes' default block for 4-bit weights


def nf4_levels(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@torch.no_grad()
def nf4_quantize(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [numel] in 0..15, absmax float32 [ceil(numel / blocksize)]) of ``weight``."""
    flat = weight.detach().float().reshape(-1)
    blocks = -(-flat.numel() // blocksize)
    padded = F.pad(flat, (0, blocks * blocksize - flat.numel())).reshape(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    normalized = padded / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    levels = nf4_levels(weight.device)
    # nearest level: compare against the midpoints between consecutive levels
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(normalized.reshape(-1), midpoints)
    return codes[: flat.numel()].to(torch.uint8), absmax


def nf4_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], blocksize: int = NF4_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight ``codes`` and ``absmax`` stand for, shaped ``shape``."""
    values = nf4_levels(codes.device)[codes.long()]
    scale = absmax.float().repeat_interleave(blocksize)[: values.numel()]
    return (values * scale).reshape(shape).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' layout): uint8 [ceil(n/2), 1]."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``count`` codes."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:count]


class NF4Linear(nn.Module):
    """A Linear layer whose weight is NF4 codes and per-block absolute maxima."""

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None,
                 blocksize: int = NF4_BLOCKSIZE, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.blocksize = blocksize
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_codes", codes.to(torch.uint8))
        self.register_buffer("weight_absmax", absmax.float())
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = NF4_BLOCKSIZE) -> "NF4Linear":
        codes, absmax = nf4_quantize(linear.weight, blocksize)
        return cls(codes, absmax, (linear.out_features, linear.in_features), linear.bias, blocksize, linear.weight.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf4_dequantize(
            self.weight_codes, self.weight_absmax, (self.out_features, self.in_features), self.blocksize,
            dtype or self.compute_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantized(self, (self.weight_codes, self.weight_absmax), x.dtype, lambda: self.dequantized_weight(x.dtype))
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocks of {self.blocksize}"
