"""Checks that a model's files are whole, in seconds, before any long work reads them.

A safetensors file's header is read and every entry checked as strictly as the safetensors
library checks it (and only dtypes torch reads are let through); a config.json's sizes are
checked to lie in ranges a model can be built with; a GGUF file is opened by the gguf reader and
its architecture checked against what transformers loads. Nothing here reads a tensor.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from squeeze.errors import SqueezeError
from squeeze.formats.files import read_config

# Bytes per element of the safetensors dtypes torch reads. The format also defines F4, F6_E2M3
# and F6_E3M2, packed below a byte: torch reads F4 only in pairs (another shape than the header
# says) and F6 not at all, so they are refused with the unknown ones.
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_PACKED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # bytes; the format's own limit
_MAX_COUNT = 2**63  # a dimension or element count torch can hold; the format's readers overflow past 2**64
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it."""

    dtype: str  # the safetensors name: F32, BF16, I8...
    shape: tuple[int, ...]
    file: str  # the name of the file that holds it
    nbytes: int  # its length in the file


# The sizes config.json gives that a model's modules are built from, with the range each may take.
# Generous: the model is built on the meta device (no memory) and its shapes then compared with the
# checkpoint's; the bounds keep that build to seconds and stop numbers no checkpoint can have.
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers")
_WIDTH_FIELDS = (
    "hidden_size", "n_embd", "d_model", "embedding_size", "intermediate_size", "n_inner", "d_ff", "ffn_dim",
    "encoder_ffn_dim", "decoder_ffn_dim", "moe_intermediate_size", "shared_expert_intermediate_size", "head_dim", "d_kv",
)  # fmt: skip
_HEAD_FIELDS = (
    "num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "num_kv_heads",
    "encoder_attention_heads", "decoder_attention_heads",
)  # fmt: skip
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok")
CONFIG_RANGES: dict[str, tuple[int, int]] = {
    **{field: (1, 1024) for field in LAYER_FIELDS},
    **{field: (1, 2**20) for field in _WIDTH_FIELDS},
    **{field: (1, 2**16) for field in _HEAD_FIELDS},
    **{field: (0, 2**14) for field in _EXPERT_FIELDS},
    "vocab_size": (1, 2**24),
    "max_position_embeddings": (1, 2**24),
    "n_positions": (1, 2**24),
    "n_ctx": (1, 2**24),
}


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (its lines joined), cut to ``limit`` characters:
    for messages whose first line only introduces the rest."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: Any, limit: int = 60) -> str:
    """``value`` as one short line for a message: plain when it is a tidy name or number, else
    its repr, cut to ``limit`` characters."""
    text = value if isinstance(value, str) and value.isprintable() and " " not in value else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_safetensors_folder(folder: Path, spec: str) -> dict[str, StoredTensor]:
    """Raise SqueezeError unless ``folder`` holds whole ``*.safetensors`` weights (every shard an
    index lists present, every header consistent) and its config.json's sizes are in range
    (:func:`check_config_sizes`); ``spec`` is how the user named the folder.

    Returns the tensors transformers loads from the folder by name: those the index lists, or
    those of ``model.safetensors`` when there is no index and it exists, or those of every file.
    """
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
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SqueezeError(f"file {index} is not a valid safetensors index: {first_line(exc)}") from exc
        missing = sorted(s for s in set(weight_maps[index].values()) if not (folder / s).is_file())
        if missing:
            raise SqueezeError(f"model folder {spec} is incomplete: {index.name} lists missing shard {shown(missing[0])}")
    held = {file.name: read_safetensors_header(file) for file in files}
    for index, weight_map in weight_maps.items():
        for name, shard in weight_map.items():
            if name not in held.get(shard, ()):
                raise SqueezeError(
                    f"model folder {spec} is inconsistent: {index.name} puts tensor {shown(name)} in {shown(shard)}, which does not hold it"
                )
    if (folder / "config.json").is_file():
        check_config_sizes(read_config(folder), spec)
    if weight_maps:
        return {name: held[shard][name] for weight_map in weight_maps.values() for name, shard in weight_map.items()}
    loaded = [held["model.safetensors"]] if "model.safetensors" in held else held.values()
    return {name: tensor for tensors in loaded for name, tensor in tensors.items()}


def check_safetensors_file(file: Path) -> set[str]:
    """Check a safetensors file's header and size without reading its tensors; the names of the
    tensors it holds (see :func:`read_safetensors_header`)."""
    return set(read_safetensors_header(file))


def read_safetensors_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds, by name, from its header alone; SqueezeError with one
    line unless the header is one the safetensors library reads and torch can load.

    Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON (an object: each tensor's
    ``dtype``, ``shape`` and ``data_offsets``, and an optional ``__metadata__`` map of strings),
    then the data. The tensors' byte ranges, in order, tile the data exactly: no gap, no overlap,
    nothing after the last; each range is as long as its shape and dtype say.
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
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise corrupt(f"header is not valid JSON ({first_line(exc)})") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    if not raw.startswith(b"{"):  # the safetensors library's own rule: no space before it
        raise corrupt("header must start with {")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) and _is_utf8(k) and _is_utf8(v) for k, v in metadata.items())
    ):
        raise corrupt("its __metadata__ is not a map of strings to strings")
    data_size = size - 8 - header_len
    tensors = {name: _header_entry(name, info, data_size, file.name, corrupt) for name, info in header.items()}
    end = 0
    for name, (begin, stop) in sorted(((n, tuple(header[n]["data_offsets"])) for n in header), key=lambda item: item[1]):
        if begin != end:
            why = "overlaps another" if begin < end else f"leaves bytes {end}..{begin} unused before it"
            raise corrupt(f"tensor {shown(name)} at bytes {begin}..{stop} {why}")
        end = stop
    if end != data_size:
        raise corrupt(f"data holds {data_size} bytes but the tensors need {end}")
    return tensors


def _header_entry(name: str, info: Any, data_size: int, file_name: str, corrupt) -> StoredTensor:
    """One header entry checked: known keys, a dtype torch reads, a shape of counts, a byte range
    inside the data as long as the shape needs."""
    label = f"tensor {shown(name)}"
    if not _is_utf8(name):
        raise corrupt(f"{label} has a name that is not UTF-8")
    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
        raise corrupt(f"bad header entry for {label} (it needs exactly dtype, shape and data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype in _PACKED_DTYPES:
        raise corrupt(f"{label} has dtype {dtype}, which torch cannot read as stored")
    width = _SAFETENSORS_DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None
    if width is None:
        raise corrupt(f"{label} has dtype {shown(dtype)}, which is not a safetensors dtype torch reads")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise corrupt(f"{label} has shape {shown(shape)}; a shape is a list of whole numbers, none negative")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)):
        raise corrupt(f"{label} has data_offsets {shown(offsets)}; they are two whole numbers, begin and end")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise corrupt(f"{label} spans bytes {begin}..{end} but the data holds {data_size}")
    numel = 1
    for dim in shape:
        numel *= dim
        if numel >= _MAX_COUNT:
            raise corrupt(f"{label} has shape {shown(shape)}, more elements than any file holds")
    if end - begin != numel * width:
        raise corrupt(f"{label} has {end - begin} bytes for {numel} {dtype} values")
    return StoredTensor(dtype, tuple(shape), file_name, end - begin)


def check_config_sizes(config: dict[str, Any], spec: str) -> None:
    """Raise SqueezeError unless every size config.json gives (``CONFIG_RANGES``: widths, vocabulary,
    layer, head and expert counts, positions), at the top or in a nested config, is a whole number
    in its range; a missing or null size is left to transformers' default."""
    if not isinstance(config, dict):
        raise SqueezeError(f"model {spec}: config.json is not a JSON object")
    for path, value in _sizes(config):
        low, high = CONFIG_RANGES[path.rpartition(".")[2]]
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values):
            given = shown(repr(value) if isinstance(value, str) else value)  # quoted: "64" is not 64
            raise SqueezeError(f"model {spec}: config.json gives {path} = {given}; it must be a whole number from {low} to {high:,}")


def _sizes(config: dict[str, Any], prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every size field in ``config`` and the configs nested in it (a
    model's configs nest two or three deep; deeper objects are not configs)."""
    for key, value in config.items():
        if isinstance(value, dict) and depth < 3:
            yield from _sizes(value, f"{prefix}{key}.", depth + 1)
        elif key in CONFIG_RANGES and value is not None:
            yield f"{prefix}{key}", value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {shown(next(k for k in keys if keys.count(k) > 1))} appears twice")
    return dict(pairs)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_COUNT


def _is_utf8(text: Any) -> bool:
    """Whether ``text`` is a string UTF-8 can encode (JSON escapes can spell lone surrogates)."""
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
