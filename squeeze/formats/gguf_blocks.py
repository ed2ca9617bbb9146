"""GGUF's simple block types, packed from squeeze's own codes, scales and zero points.

Every type holds one float16 scale ``d`` per block of 32 weights of a row:

- ``Q8_0``: ``d``, 32 int8 codes ``q``; ``x = d·q``. squeeze's symmetric 8-bit group-32 codes.
- ``Q4_0``: ``d``, 16 bytes of 4-bit ``q`` in [0, 15] (byte ``j`` holds weight ``j`` in its low
  nibble and weight ``j + 16`` in its high one); ``x = d·(q − 8)``. squeeze's symmetric 4-bit
  codes ``c`` in [−8, 7] are ``q = c + 8``: the same numbers, no second rounding.
- ``Q4_1``: ``d``, ``m`` (float16), then the nibbles as Q4_0; ``x = d·q + m``. squeeze's asymmetric
  4-bit codes ``c`` with zero point ``z`` are ``x = d·(c − z)``, so ``q = c + 8`` and
  ``m = −d·(z + 8)``, which float16 holds to within 2⁻¹¹ of itself (at most 0.8% of a step).

Tensors squeeze leaves in full precision are stored as F32, F16, BF16 or Q8_0; for Q8_0 the
arithmetic is the gguf package's (llama.cpp's reference quantizer: ``d = max|x| / 127``).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from squeeze.quant.linear import QuantizedLinear

BLOCK = 32  # weights per block in every type here


@dataclass(frozen=True)
class BlockType:
    """One GGUF weight type squeeze writes codes into."""

    name: str  # as --gguf-type spells it
    ggml: gguf.GGMLQuantizationType
    bits: int
    asym: bool
    file_type: gguf.LlamaFileType  # general.file_type of a file whose layers are mostly this type

    @property
    def block_bytes(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.ggml][1]

    def describe(self) -> str:
        return f"{self.name.upper()} ({self.bits}-bit {'asymmetric' if self.asym else 'symmetric'}, blocks of {BLOCK})"


BLOCK_TYPES = {
    t.name: t
    for t in (
        BlockType("q4_0", gguf.GGMLQuantizationType.Q4_0, 4, False, gguf.LlamaFileType.MOSTLY_Q4_0),
        BlockType("q4_1", gguf.GGMLQuantizationType.Q4_1, 4, True, gguf.LlamaFileType.MOSTLY_Q4_1),
        BlockType("q8_0", gguf.GGMLQuantizationType.Q8_0, 8, False, gguf.LlamaFileType.MOSTLY_Q8_0),
    )
}

# how tensors left in full precision may be stored (--gguf-embeddings)
DENSE_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Blocks of 32 unsigned 4-bit codes [..., 32] as GGUF's 16 bytes [..., 16]."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def pack_layer(layer: QuantizedLinear, kind: BlockType) -> np.ndarray:
    """``layer``'s codes as ``kind`` blocks: uint8 ``[out, in / 32 · block bytes]``, row by row.

    The layer must hold ``kind``'s scheme (group size 32, its bits and symmetry): the format's
    checks make sure before anything is quantized."""
    out_features, in_features = layer.weight_codes.shape
    blocks = in_features // BLOCK
    codes = layer.weight_codes.cpu().to(torch.int16).reshape(out_features, blocks, BLOCK).numpy()
    scale = layer.weight_scale.cpu().reshape(out_features, blocks).to(torch.float32).numpy()
    d = scale.astype(np.float16).view(np.uint8).reshape(out_features, blocks, 2)
    if kind.bits == 8:
        body = codes.astype(np.int8).view(np.uint8)
        return np.concatenate([d, body], axis=-1).reshape(out_features, -1)
    q = (codes + 8).astype(np.uint8)
    parts = [d]
    if kind.asym:
        zero = layer.weight_zero_point.cpu().reshape(out_features, blocks).to(torch.float32).numpy()
        m = (-(zero + 8) * scale).astype(np.float16).view(np.uint8).reshape(out_features, blocks, 2)
        parts.append(m)
    parts.append(_nibbles(q))
    return np.concatenate(parts, axis=-1).reshape(out_features, -1)


def dense_array(tensor: torch.Tensor, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """A full-precision tensor as the writer takes it: ``(array, raw type)``; the raw type is
    None where the array's own dtype says it (F32, F16)."""
    values = tensor.detach().to(torch.float32).cpu().numpy()
    if kind == "f32":
        return values, None
    if kind == "f16":
        return values.astype(np.float16), None
    return gguf.quants.quantize(values, DENSE_TYPES[kind]), DENSE_TYPES[kind]


def as_stored(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """``tensor`` with the values it has once stored as ``kind`` (F32 unchanged): what llama.cpp
    reads back, so that squeeze evaluates the numbers the file holds."""
    if kind == "f32":
        return tensor
    array, raw = dense_array(tensor, kind)
    values = array.astype(np.float32) if raw is None else gguf.quants.dequantize(array, raw)
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(tensor.shape).to(tensor.dtype)


def packed_bytes(shape: tuple[int, int], kind: gguf.GGMLQuantizationType) -> int:
    """Bytes of a ``[out, in]`` matrix stored as ``kind``."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return shape[0] * shape[1] // block * size
