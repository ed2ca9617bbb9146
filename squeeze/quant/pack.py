"""Dense bit packing of small signed integers into int32 words (compressed-tensors layout).

Codes are shifted to unsigned (``+ 2^(bits-1)``) and laid end to end, least significant bits
first: element ``i`` of a row occupies bits ``[i·bits, (i+1)·bits)`` of the row's bit stream,
which is cut into int32 words. With 4 bits that is eight codes per word, element 0 in the low
nibble, exactly the layout vLLM and transformers read for ``pack-quantized`` checkpoints.
"""

from __future__ import annotations

import math
import sys

import torch


def packed_columns(columns: int, num_bits: int) -> int:
    """Number of int32 words that hold ``columns`` codes of ``num_bits`` bits."""
    return math.ceil(columns * num_bits / 32)


def pack_int32(codes: torch.Tensor, num_bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 codes in [-2^(bits-1), 2^(bits-1)) of a 2-D tensor along ``dim`` into int32 words."""
    if codes.dim() != 2:
        raise ValueError("pack_int32 takes a 2-D tensor")
    rows_first = codes.t() if dim == 0 else codes
    packed = _pack_bytes(rows_first, num_bits) if _bytewise(num_bits) else _pack_stream(rows_first, num_bits)
    return packed.t().contiguous() if dim == 0 else packed.contiguous()


def _bytewise(num_bits: int) -> bool:
    """Whether codes of ``num_bits`` can be packed and read a byte at a time: no field straddles a
    byte, and the machine stores a word's least significant byte first, as the bit stream runs."""
    return 8 % num_bits == 0 and sys.byteorder == "little"


def _pack_bytes(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Codes of 2, 4 or 8 bits never straddle a byte: fill each byte with its fields, and read the
    bytes as int32 words (least significant byte first on a little-endian machine, as the stream is laid out)."""
    rows, cols = codes.shape
    per_word = 32 // num_bits
    words = packed_columns(cols, num_bits)
    values = torch.zeros(rows, words * per_word, dtype=torch.uint8, device=codes.device)
    values[:, :cols] = (codes.to(torch.int16) + (1 << (num_bits - 1))).to(torch.uint8)
    fields = values.reshape(rows, words * 4, 8 // num_bits)
    data = fields[..., 0].clone()
    for k in range(1, 8 // num_bits):
        data |= fields[..., k] << (k * num_bits)
    return data.view(torch.int32)


def _pack_stream(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Any width (3 bits straddle words): each field OR-ed into 64-bit words at its bit position."""
    values = codes.to(torch.int64) + (1 << (num_bits - 1))
    rows, cols = values.shape
    words = packed_columns(cols, num_bits)
    start = torch.arange(cols, device=values.device) * num_bits
    word = start // 32
    shift = start % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=values.device)
    out.scatter_add_(1, word.expand(rows, -1), values << shift)
    # bits that spill past 32 belong to the next word (scatter_add is an OR: fields never overlap)
    spill = out[:, :-1] >> 32
    out = out[:, :-1] & 0xFFFFFFFF
    out[:, 1:] += spill[:, :-1]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_int32(packed: torch.Tensor, num_bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``length`` signed int8 codes per row (or column with ``dim=0``)."""
    words = packed.t() if dim == 0 else packed
    codes = _unpack_bytes(words, num_bits, length) if _bytewise(num_bits) else _unpack_stream(words, num_bits, length)
    return codes.t().contiguous() if dim == 0 else codes


def _unpack_bytes(words: torch.Tensor, num_bits: int, length: int) -> torch.Tensor:
    """Codes of 2, 4 or 8 bits never straddle a byte: read the words' bytes (least significant
    first on a little-endian machine, as the stream is laid out) and split each into its fields."""
    data = words.contiguous().view(torch.uint8)
    shifts = torch.arange(0, 8, num_bits, dtype=torch.uint8, device=words.device)
    fields = (data.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    values = fields.reshape(words.shape[0], -1)[:, :length]
    return values.to(torch.int8) - (1 << (num_bits - 1)) if num_bits < 8 else (values.to(torch.int16) - 128).to(torch.int8)


def _unpack_stream(words: torch.Tensor, num_bits: int, length: int) -> torch.Tensor:
    """Any width (3 bits straddle words): each field read from the 64 bits starting at its word."""
    words = words.to(torch.int64) & 0xFFFFFFFF
    rows = words.shape[0]
    start = torch.arange(length, device=words.device) * num_bits
    word = start // 32
    shift = start % 32
    padded = torch.cat([words, torch.zeros(rows, 1, dtype=torch.int64, device=words.device)], dim=1)
    window = padded[:, word] | (padded[:, word + 1] << 32)
    values = (window >> shift) & ((1 << num_bits) - 1)
    return (values - (1 << (num_bits - 1))).to(torch.int8)
