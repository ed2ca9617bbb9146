"""The files every checkpoint format shares: safetensors (sharded when large), config.json, the
tokenizer, and the tensors outside the compressed layers.

The lowest layer of ``squeeze.formats``: it knows files and state dicts, not formats, and is
what ``squeeze.models`` and each format's writer and reader build on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from squeeze.errors import SqueezeError

MAX_SHARD_BYTES = 5 * 10**9  # the default largest safetensors file, as transformers' "5GB"
WEIGHTS_NAME = "model.safetensors"


def read_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder as a dict; SqueezeError when it cannot be read."""
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SqueezeError(f"cannot read {Path(folder) / 'config.json'}: {exc}") from exc


def auto_class(kind: str) -> type:
    """The transformers Auto class that builds a model of ``kind`` ("causal" or "encoder")."""
    return transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (shards merged), on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def dense_tensors(model: nn.Module, dtype: torch.dtype | None = None, skip: type | tuple[type, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors outside the compressed layers (modules of type ``skip``), tied copies stored once.

    ``dtype`` casts the floating tensors (embeddings, norms, heads, biases), e.g. back to the
    bfloat16 a model was stored in.
    """
    compressed = [n for n, m in model.named_modules() if isinstance(m, skip)]
    inside_compressed = tuple(f"{n}." for n in compressed)
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in model.state_dict(keep_vars=False).items():
        if key.startswith(inside_compressed):
            continue
        # tied weights (lm_head = embeddings) share storage: store them once, under the first name
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_tensors_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file, readable by everyone like any other file of the checkpoint."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates the file private (0600); a checkpoint is meant to be shared like any file
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def save_safetensors(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write ``state`` as one safetensors file, or shards plus the standard index when large."""
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        path = out_dir / WEIGHTS_NAME
        save_tensors_file(shards[0], path)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors_file(shard, path)
        paths.append(path)
        weight_map.update({k: path.name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / f"{WEIGHTS_NAME}.index.json").write_text(json.dumps(index, indent=2))
    return paths


def write_config_files(model: nn.Module, out_dir: Path, quant_config: dict | None, tokenizer=None, dtype: torch.dtype | None = None) -> None:
    """config.json (with ``quant_config`` as its quantization_config, none if None), generation config, tokenizer."""
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    if quant_config is not None:
        config_dict["quantization_config"] = quant_config
    if dtype is not None:
        config_dict["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
