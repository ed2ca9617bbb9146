"""Checks that a model's files are whole, in seconds, before any long work reads them.

A safetensors file's header is read and every tensor's byte range checked against the file size;
a GGUF file is opened by the gguf reader and its architecture checked against what transformers
loads. Nothing here reads a tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from squeeze.errors import SqueezeError

# Bytes per element of the safetensors dtypes; used to check that each tensor's byte range fits its shape.
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # bytes; the format's own limit


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def check_safetensors_folder(folder: Path, spec: str) -> None:
    """Raise SqueezeError unless ``folder`` holds whole ``*.safetensors`` weights (every shard an
    index lists present, every header consistent); ``spec`` is how the user named the folder."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {', '.join(pickles[:3])}: pickle files are never loaded, convert them to safetensors)" if pickles else ""
        raise SqueezeError(f"model folder {spec} has no *.safetensors weights{hint}")
    weight_maps = {}
    for index in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            weight_maps[index] = {str(name): str(shard) for name, shard in weight_map.items()}
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise SqueezeError(f"file {index} is not a valid safetensors index: {exc}") from exc
        missing = sorted(s for s in set(weight_maps[index].values()) if not (folder / s).is_file())
        if missing:
            raise SqueezeError(f"model folder {spec} is incomplete: {index.name} lists missing shard {missing[0]}")
    held = {file.name: check_safetensors_file(file) for file in files}
    for index, weight_map in weight_maps.items():
        for name, shard in weight_map.items():
            if name not in held.get(shard, ()):
                raise SqueezeError(f"model folder {spec} is inconsistent: {index.name} puts tensor {name} in {shard}, which does not hold it")


def check_safetensors_file(file: Path) -> set[str]:
    """Check a safetensors file's header and size without reading its tensors; the names of the
    tensors it holds.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the data; every tensor's
    ``data_offsets`` lie inside the data and the file ends exactly at the last one.
    """

    def corrupt(why: str) -> SqueezeError:
        return SqueezeError(f"file {file} is truncated or corrupt: {why}")

    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise corrupt(f"only {size} bytes")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise corrupt(f"header claims {header_len} bytes but the file has {size}")
        try:
            header = json.loads(handle.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise corrupt(f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_size = size - 8 - header_len
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            dtype = info["dtype"]
        except (TypeError, KeyError, ValueError) as exc:
            raise corrupt(f"bad header entry for tensor {name}") from exc
        if not 0 <= begin <= end <= data_size:
            raise corrupt(f"tensor {name} spans bytes {begin}..{end} but the data holds {data_size}")
        width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
        if width is not None and end - begin != numel * width:
            raise corrupt(f"tensor {name} has {end - begin} bytes for {numel} {dtype} values")
        end_max = max(end_max, end)
    if end_max != data_size:
        raise corrupt(f"data holds {data_size} bytes but the tensors need {end_max}")
    return {name for name in header if name != "__metadata__"}


def check_gguf(file: Path) -> None:
    """Raise SqueezeError unless ``file`` is a readable GGUF file of an architecture transformers loads."""
    with file.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise SqueezeError(f"file {file} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(file)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors... on a bad file
        raise SqueezeError(f"file {file} is truncated or corrupt: {first_line(exc)}") from exc
    field = reader.fields.get("general.architecture")
    architecture = str(field.contents()) if field is not None else "unknown"
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise SqueezeError(f"GGUF file {file} has architecture {architecture!r}, which transformers cannot load")
