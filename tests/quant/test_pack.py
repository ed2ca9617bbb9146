"""Bit packing: round trips for every width and the exact layout compressed-tensors reads."""

import pytest
import torch

from squeeze.quant.pack import pack_int32, packed_columns, unpack_int32


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cols", [1, 7, 32, 33, 100, 576])
def test_round_trip(bits: int, cols: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, cols), generator=g, dtype=torch.int8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, packed_columns(cols, bits))
    assert torch.equal(unpack_int32(packed, bits, cols), codes)
    packed_rows = pack_int32(codes, bits, dim=0)
    assert packed_rows.shape == (packed_columns(5, bits), cols)
    assert torch.equal(unpack_int32(packed_rows, bits, 5, dim=0), codes)


def test_int4_layout_is_low_nibble_first() -> None:
    codes = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7]], dtype=torch.int8)
    word = int(pack_int32(codes, 4)[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [c + 8 for c in codes[0].tolist()]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_same_words_as_compressed_tensors(bits: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 96), dtype=torch.int8)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes, bits))
    assert torch.equal(unpack_from_int32(pack_int32(codes, bits), bits, codes.shape), codes)
    assert torch.equal(pack_int32(codes, bits, dim=0), pack_to_int32(codes, bits, packed_dim=0))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_byte_reader_matches_the_bit_stream_reader(bits: int) -> None:
    # 2, 4 and 8 bits are read a byte at a time; any word, including a negative one, reads the same both ways
    from squeeze.quant.pack import _unpack_bytes, _unpack_stream

    words = torch.randint(-(1 << 31), (1 << 31) - 1, (7, 11), dtype=torch.int64).to(torch.int32)
    length = 11 * 32 // bits - 3
    assert torch.equal(_unpack_bytes(words, bits, length), _unpack_stream(words, bits, length))
    assert torch.equal(_unpack_bytes(words.t(), bits, 5), _unpack_stream(words.t(), bits, 5))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("cols", [1, 15, 64, 100])
def test_byte_packer_matches_the_bit_stream_packer(bits: int, cols: int) -> None:
    from squeeze.quant.pack import _pack_bytes, _pack_stream

    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, cols), dtype=torch.int8)
    assert torch.equal(_pack_bytes(codes, bits), _pack_stream(codes, bits))
