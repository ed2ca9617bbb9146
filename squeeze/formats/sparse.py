"""Pruned checkpoints: sparse-bitmask (smaller on disk) or dense with zeros.

``sparse-bitmask`` is compressed-tensors' layout for unstructured and N:M sparsity. Each pruned
Linear ``name`` stores, instead of ``name.weight``:

- ``name.compressed``: the nonzero values in row-major order (1-D, the weight's dtype);
- ``name.bitmask``: uint8 ``[out, ceil(in / 8)]``, bit ``j % 8`` of byte ``j // 8`` (little-endian
  bit order, numpy's ``packbits(..., bitorder="little")``) set where ``weight[row, j] != 0``;
- ``name.row_offsets``: int64 ``[out]``, index in ``compressed`` where each row starts;
- ``name.shape``: int64 ``[2]``, the dense shape.

At 50% sparsity a float32 layer takes 0.5 · 4 + 1/8 bytes per weight (53% of dense), a bfloat16
one 0.5 · 2 + 1/8 (56%). config.json carries ``quantization_config.sparsity_config`` with
``format``, ``sparsity_structure`` (``unstructured`` or ``N:M``), ``global_sparsity`` and the
sparse layers as ``targets``. compressed-tensors up to 0.14 decompresses it; later versions, and so
transformers 5 (which needs compressed-tensors ≥ 0.15), dropped sparse decompression, so
:data:`LOADING_SNIPPET` is the way to load it without squeeze, and ``dense`` (plain ``weight``
tensors with the zeros, the same ``sparsity_config`` with ``format: dense``) loads with a plain
``from_pretrained``.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.formats.base import PRUNED_FORMATS, PrunedFormat, Written
from squeeze.linears import has_experts
from squeeze.formats.files import (
    MAX_SHARD_BYTES,
    auto_class,
    dense_tensors,
    read_config,
    read_safetensors_folder,
    save_safetensors,
    write_config_files,
)

BITMASK_SUFFIXES = ("compressed", "bitmask", "row_offsets", "shape")

LOADING_SNIPPET = '''\
import glob, numpy as np, torch, transformers
from safetensors.torch import load_file

folder = "{folder}"
state = {{}}
for file in sorted(glob.glob(f"{{folder}}/*.safetensors")):
    state.update(load_file(file))
for key in [k for k in state if k.endswith(".bitmask")]:
    name = key.removesuffix(".bitmask")
    shape = state.pop(f"{{name}}.shape").tolist()
    keep = np.unpackbits(state.pop(key).numpy(), axis=-1, count=shape[-1], bitorder="little").astype(bool)
    weight = torch.zeros(shape, dtype=state[f"{{name}}.compressed"].dtype)
    weight[torch.from_numpy(keep)] = state.pop(f"{{name}}.compressed")
    del state[f"{{name}}.row_offsets"]
    state[f"{{name}}.weight"] = weight
config = transformers.AutoConfig.from_pretrained(folder)
model = transformers.{auto_class}.from_config(config, dtype=state[next(iter(state))].dtype)
missing, unexpected = model.load_state_dict(state, strict=False)
model.tie_weights()
'''


BITMASK_PARTS = ("compressed", "bitmask", "row_offsets", "shape")  # the tensors standing for one sparse weight


def bitmask_tensors(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sparse-bitmask tensors of one weight ``[out, in]`` (see the module docstring)."""
    weight = weight.detach().cpu()
    keep = weight != 0
    row_counts = keep.sum(dim=1)
    return {
        f"{name}.compressed": weight[keep].contiguous(),
        f"{name}.bitmask": torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little")),
        f"{name}.row_offsets": (torch.cumsum(row_counts, 0) - row_counts).to(torch.int64),
        f"{name}.shape": torch.tensor(list(weight.shape), dtype=torch.int64),
    }


def bitmask_bytes(weight: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Checkpoint bytes of one weight in sparse-bitmask layout, values stored in ``dtype``."""
    rows, cols = weight.shape
    values = int((weight != 0).sum()) * (dtype or weight.dtype).itemsize
    return values + rows * ((cols + 7) // 8) + rows * 8 + 2 * 8


def decode_bitmask_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every sparse-bitmask group of tensors in ``state`` by its dense ``weight``."""
    dense = dict(state)
    for key in [k for k in state if k.endswith(".bitmask")]:
        name = key[: -len(".bitmask")]
        shape = dense.pop(f"{name}.shape").tolist()
        keep = np.unpackbits(dense.pop(key).numpy(), axis=-1, count=shape[-1], bitorder="little").astype(bool)
        values = dense.pop(f"{name}.compressed")
        dense.pop(f"{name}.row_offsets")
        weight = torch.zeros(shape, dtype=values.dtype)
        weight[torch.from_numpy(keep)] = values
        dense[f"{name}.weight"] = weight
    return dense


def sparsity_config(fmt: str, structure: str, global_sparsity: float, sparse_layers: list[str]) -> dict:
    """The ``sparsity_config`` entry of compressed-tensors' quantization_config."""
    return {
        "format": fmt,
        "global_sparsity": global_sparsity,
        "sparsity_structure": structure,
        "targets": sorted(sparse_layers),
        "ignore": [],
        "registry_requires_subclass": False,
    }


def compressed_tensors_version() -> str:
    """The installed compressed-tensors version, which the configs record; read from the package
    metadata, since importing compressed_tensors takes seconds."""
    return version("compressed-tensors")


def sparse_only_config(sparsity: dict) -> dict:
    """quantization_config for a pruned, unquantized model: no config groups, only sparsity.
    transformers reads it as "nothing to quantize" and loads the weights as they are."""
    return {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "quantization_status": "compressed",
        "config_groups": {},
        "ignore": [],
        "sparsity_config": sparsity,
        "version": compressed_tensors_version(),
        "producer": "squeeze",
    }


def is_sparse_bitmask(config: dict) -> bool:
    """Whether a config.json dict describes a sparse-bitmask checkpoint."""
    sparsity = (config.get("quantization_config") or {}).get("sparsity_config") or {}
    return sparsity.get("format") == "sparse-bitmask"


class _SparsityConfigFormat(PrunedFormat):
    """A pruned checkpoint described by a compressed-tensors ``sparsity_config``."""

    def encode(self, state: dict[str, torch.Tensor], sparse_layers: list[str]) -> dict[str, torch.Tensor]:
        """``state`` with the weights of ``sparse_layers`` in this format's layout."""
        return state

    def write(
        self,
        model: nn.Module,
        structure: str,
        global_sparsity: float,
        sparse_layers: list[str],
        out_dir: Path,
        tokenizer=None,
        dtype: torch.dtype | None = None,
        max_shard_bytes: int = MAX_SHARD_BYTES,
    ) -> Written:
        out_dir.mkdir(parents=True, exist_ok=True)
        state = self.encode(dense_tensors(model, dtype), sparse_layers)
        self.write_config(model, structure, global_sparsity, sparse_layers, out_dir, tokenizer, dtype)
        return Written(save_safetensors(state, out_dir, max_shard_bytes), list(self.notes))

    def write_config(
        self, model: nn.Module, structure: str, global_sparsity: float, sparse_layers: list[str], out_dir: Path, tokenizer=None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = sparse_only_config(sparsity_config(self.name, structure, global_sparsity, sparse_layers))
        write_config_files(model, out_dir, config, tokenizer, dtype)


@PRUNED_FORMATS.register
class SparseBitmask(_SparsityConfigFormat):
    """compressed-tensors' sparse-bitmask layout (see the module docstring); squeeze reads it back."""

    name = "sparse-bitmask"
    summary = "sparse-bitmask (compressed-tensors layout, smaller on disk)"
    notes = (
        "sparse-bitmask checkpoint: transformers 5 cannot decompress it by itself (compressed-tensors dropped sparse "
        "decompression in 0.15); squeeze loads it, and so does the loader in report.md; --format dense writes one "
        "that from_pretrained loads as is",
    )

    def encode(self, state: dict[str, torch.Tensor], sparse_layers: list[str]) -> dict[str, torch.Tensor]:
        for name in sparse_layers:
            weight = state.pop(f"{name}.weight")
            state.update(bitmask_tensors(name, weight))
        return state

    def weight_bytes(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> int:
        return bitmask_bytes(weight, dtype)

    def loading(self, folder: Path, kind: str) -> str:
        return "```python\n" + LOADING_SNIPPET.format(folder=folder, auto_class=auto_class(kind).__name__) + "```\n"

    def recognises(self, folder: Path) -> bool:
        return Path(folder).is_dir() and is_sparse_bitmask(read_config(folder))

    def read(self, folder: Path, kind: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
        """Decoded to dense weights with zeros: transformers 5 no longer decompresses sparse checkpoints itself."""
        state = decode_bitmask_state(read_safetensors_folder(folder))
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = auto_class(kind).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.tie_weights()
        # tied copies (lm_head = embeddings) are not stored; buffers a config rebuilds need not be either
        distinct = {n for n, _ in model.named_parameters()}
        missing = [k for k in missing if k in distinct]
        if missing or unexpected:
            raise SqueezeError(
                f"sparse checkpoint {folder} does not match its config: "
                + (f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}")
            )
        return model


@PRUNED_FORMATS.register
class Dense(_SparsityConfigFormat):
    """Plain ``weight`` tensors with the zeros: loads with a plain ``from_pretrained``. A
    mixture-of-experts model gets no ``sparsity_config`` (transformers 5 cannot load one on its
    fused experts), so that it still loads as is."""

    def write(
        self, model: nn.Module, structure: str, global_sparsity: float, sparse_layers: list[str], out_dir: Path,
        tokenizer=None, dtype: torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
    ) -> Written:
        written = super().write(model, structure, global_sparsity, sparse_layers, out_dir, tokenizer, dtype, max_shard_bytes)
        if has_experts(model):
            written.notes.append(
                "no sparsity_config in config.json: transformers cannot load one on a mixture-of-experts model; "
                "the zeros are in the weights"
            )
        return written

    def write_config(
        self, model: nn.Module, structure: str, global_sparsity: float, sparse_layers: list[str], out_dir: Path, tokenizer=None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if has_experts(model):
            write_config_files(model, out_dir, None, tokenizer, dtype)
        else:
            super().write_config(model, structure, global_sparsity, sparse_layers, out_dir, tokenizer, dtype)

    name = "dense"
    summary = "dense (zeros stored, loads with from_pretrained)"
    suffix = "-dense"

    def weight_bytes(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> int:
        return weight.numel() * (dtype or weight.dtype).itemsize

    def loading(self, folder: Path, kind: str) -> str:
        return f"`transformers.{auto_class(kind).__name__}.from_pretrained(\"{folder}\")`: the zeros are stored dense.\n"
