"""Write quantized models as compressed-tensors checkpoints (loadable by transformers and vLLM).

Per quantized Linear ``name`` the checkpoint holds:

- pack-quantized (weight-only): ``name.weight_packed`` int32 ``[out, ceil(in·bits/32)]``,
  ``name.weight_shape`` int64 ``[2]``, ``name.weight_scale``, and for asymmetric schemes
  ``name.weight_zero_point`` (packed along the output dimension for channel/group strategies);
- int-quantized (W8A8): ``name.weight`` int8 ``[out, in]``, ``name.weight_scale``,
  ``name.weight_zero_point`` when asymmetric, and ``name.input_scale`` (+ zero point) for static
  activation scales.

``config.json`` carries a ``quantization_config`` with ``quant_method: compressed-tensors``, one
config group for the scheme, and an ``ignore`` list naming every Linear left in full precision.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.pack import pack_int32
from squeeze.quant.scheme import QuantScheme

MAX_SHARD_BYTES = 4 * 1024**3
WEIGHTS_NAME = "model.safetensors"


def quantized_tensors(name: str, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized layer, in the scheme's compressed-tensors format."""
    scheme = layer.scheme
    args = scheme.weights
    out: dict[str, torch.Tensor] = {f"{name}.weight_scale": layer.weight_scale}
    if scheme.checkpoint_format == "pack-quantized":
        out[f"{name}.weight_packed"] = pack_int32(layer.weight_codes, args.num_bits)
        out[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
        if not args.symmetric:
            zp = layer.weight_zero_point
            packs_zero_point = args.strategy in ("channel", "group")
            out[f"{name}.weight_zero_point"] = pack_int32(zp, args.num_bits, dim=0) if packs_zero_point else zp
    else:
        out[f"{name}.weight"] = layer.weight_codes
        if not args.symmetric:
            out[f"{name}.weight_zero_point"] = layer.weight_zero_point
    if layer.input_scale is not None:
        out[f"{name}.input_scale"] = layer.input_scale
        if not scheme.input_activations.symmetric:  # type: ignore[union-attr]
            out[f"{name}.input_zero_point"] = layer.input_zero_point
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias
    return out


def compressed_weight_bytes(layer: QuantizedLinear) -> int:
    """Checkpoint bytes of one layer's weight: integer codes (packed) + scales + zero points."""
    return sum(
        t.numel() * t.element_size()
        for key, t in quantized_tensors("layer", layer).items()
        if key.rpartition(".")[2] in ("weight", "weight_packed", "weight_scale", "weight_zero_point")
    )


def checkpoint_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor to save: quantized layers compressed, the rest as they are, tied copies once.

    ``dtype`` casts the floating tensors that were not quantized (embeddings, norms, heads,
    biases), e.g. back to the bfloat16 a model was stored in; scales keep their own dtype.
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear):
            state.update(quantized_tensors(name, layer))
    state.update(dense_tensors(model, dtype))
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def dense_tensors(model: nn.Module, dtype: torch.dtype | None = None, skip: type = QuantizedLinear) -> dict[str, torch.Tensor]:
    """The tensors outside the quantized layers (modules of type ``skip``), tied copies stored once."""
    quantized = [n for n, m in model.named_modules() if isinstance(m, skip)]
    inside_quantized = tuple(f"{n}." for n in quantized)
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in model.state_dict(keep_vars=False).items():
        if key.startswith(inside_quantized):
            continue
        # tied weights (lm_head = embeddings) share storage: store them once, under the first name
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def quantization_config(scheme: QuantScheme, ignore: list[str], sparsity: dict | None = None) -> dict:
    """The ``quantization_config`` entry of config.json for one scheme over all Linear layers
    (``sparsity``: the ``sparsity_config`` of a pruned model)."""
    group = {
        "targets": ["Linear"],
        "weights": scheme.weights.to_compressed_tensors(),
        "input_activations": scheme.input_activations.to_compressed_tensors() if scheme.input_activations else None,
        "output_activations": None,
        "format": scheme.checkpoint_format,
    }
    import compressed_tensors

    config = {
        "quant_method": "compressed-tensors",
        "format": scheme.checkpoint_format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": sparsity or {},
        "transform_config": {},
        "version": compressed_tensors.__version__,
        "producer": "squeeze",
    }
    if scheme.checkpoint_format == "pack-quantized" and not scheme.weights.symmetric:
        # transformers (5.x with compressed-tensors 0.20) sizes the zero point of a compressed
        # module unpacked while the format stores it packed; decompressing at load reads it right.
        config["dequantize"] = True
    return config


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


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
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
        _save_file(shards[0], path)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_file(shard, path)
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


def write_checkpoint(
    model: nn.Module,
    scheme: QuantScheme,
    ignored: list[str],
    out_dir: Path,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    sparsity: dict | None = None,
) -> list[Path]:
    """Save ``model`` (with QuantizedLinear layers) to ``out_dir``: safetensors, config.json, tokenizer.

    ``dtype`` is the dtype to store the unquantized tensors in (default: as held in memory).
    Returns the safetensors files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config_files(model, out_dir, quantization_config(scheme, ignored, sparsity), tokenizer, dtype)
    return save_safetensors(checkpoint_state_dict(model, dtype), out_dir)
