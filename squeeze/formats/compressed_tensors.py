"""compressed-tensors checkpoints of quantized models: written for transformers and vLLM, read back by squeeze.

Per quantized Linear ``name`` the checkpoint holds:

- pack-quantized (weight-only): ``name.weight_packed`` int32 ``[out, ceil(in·bits/32)]``,
  ``name.weight_shape`` int64 ``[2]``, ``name.weight_scale``, and for asymmetric schemes
  ``name.weight_zero_point`` (packed along the output dimension for channel/group strategies);
- int-quantized (W8A8): ``name.weight`` int8 ``[out, in]``, ``name.weight_scale``,
  ``name.weight_zero_point`` when asymmetric, and ``name.input_scale`` (+ zero point) for static
  activation scales.

``config.json`` carries a ``quantization_config`` with ``quant_method: compressed-tensors``, one
config group for the scheme, and an ``ignore`` list naming every Linear left in full precision.
squeeze reads these checkpoints back into QuantizedLinear layers holding the stored codes, so a
reloaded model computes exactly what the quantize pass evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import torch
import transformers
from torch import nn

from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.formats.base import QUANTIZED_FORMATS, QuantizedFormat, Sparsity, Written, no_init_weights
from squeeze.formats.files import (
    MAX_SHARD_BYTES,
    auto_class,
    dense_tensors,
    read_config,
    read_safetensors_folder,
    save_safetensors,
    write_config_files,
)
from squeeze.formats.sparse import compressed_tensors_version, sparsity_config
from squeeze.linears import as_linear_layers, expert_layers, to_held_layout
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.pack import pack_int32, unpack_int32
from squeeze.quant.scheme import QuantArgs, QuantScheme


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


def checkpoint_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor to save: quantized layers compressed, the rest as they are, tied copies once.

    ``dtype`` casts the floating tensors that were not quantized (embeddings, norms, heads,
    biases), e.g. back to the bfloat16 a model was stored in; scales keep their own dtype.
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear):
            state.update(quantized_tensors(name, layer))
    state.update(dense_tensors(model, dtype, skip=QuantizedLinear))
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
    config = {
        "quant_method": "compressed-tensors",
        "format": scheme.checkpoint_format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": sparsity or {},
        "transform_config": {},
        "version": compressed_tensors_version(),
        "producer": "squeeze",
    }
    if scheme.checkpoint_format == "pack-quantized" and not scheme.weights.symmetric:
        # transformers (5.x with compressed-tensors 0.20) sizes the zero point of a compressed
        # module unpacked while the format stores it packed; decompressing at load reads it right.
        config["dequantize"] = True
    return config


def write_checkpoint(
    model: nn.Module,
    scheme: QuantScheme,
    ignored: list[str],
    out_dir: Path,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    sparsity: dict | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[Path]:
    """Save ``model`` (with QuantizedLinear layers) to ``out_dir``: safetensors, config.json, tokenizer.

    ``dtype`` is the dtype to store the unquantized tensors in (default: as held in memory).
    Returns the safetensors files written (shards of at most ``max_shard_bytes``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config_files(model, out_dir, quantization_config(scheme, ignored, sparsity), tokenizer, dtype)
    return save_safetensors(checkpoint_state_dict(model, dtype), out_dir, max_shard_bytes)


# ---------------------------------------------------------------------------------------------
# reading back


def is_quantized_config(config: dict) -> bool:
    """Whether a config.json dict describes a compressed-tensors integer checkpoint."""
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors" and bool(qc.get("config_groups"))


def quantization_scheme(folder: Path) -> QuantScheme | None:
    """The scheme of a compressed-tensors checkpoint with one integer config group; None when the
    folder's config has no compressed-tensors quantization (a dense or sparse-only model)."""
    config = read_config(folder)
    if not is_quantized_config(config):
        return None
    groups = list(config["quantization_config"]["config_groups"].values())
    if len(groups) != 1:
        raise SqueezeError(f"{folder}: {len(groups)} quantization config groups; squeeze runs checkpoints with one")
    group = groups[0]

    def args(entry: dict | None) -> QuantArgs | None:
        if entry is None:
            return None
        if entry.get("type", "int") != "int":
            raise SqueezeError(f"{folder}: {entry.get('type')} quantization is not supported; squeeze runs int schemes")
        return QuantArgs(
            num_bits=entry["num_bits"], symmetric=entry["symmetric"], strategy=entry["strategy"],
            group_size=entry.get("group_size") if entry["strategy"] == "group" else None,
            dynamic=bool(entry.get("dynamic")), scale_dtype=entry.get("scale_dtype"),
        )

    return QuantScheme(weights=args(group["weights"]), input_activations=args(group.get("input_activations")))


Decoder = tuple[list[str], Callable[[list[torch.Tensor]], torch.Tensor]]


def layer_decoders(name: str, stored: Collection[str], scheme: QuantScheme, out_features: int, in_features: int) -> dict[str, Decoder]:
    """How the checkpoint gives each QuantizedLinear tensor of layer ``name`` (codes, scale, zero
    point, input scale and zero point): the stored tensors it is read from (names among
    ``stored``) and the function that decodes it from them, in that order. Packed codes and zero
    points are unpacked; a zero point the checkpoint omits (symmetric) is zeros."""
    args = scheme.weights
    first = lambda parts: parts[0]  # noqa: E731
    scale = f"{name}.weight_scale"
    decoders: dict[str, Decoder] = {"weight_scale": ([scale], first)}
    packed = f"{name}.weight_packed" in stored
    if packed:
        decoders["weight_codes"] = ([f"{name}.weight_packed"], lambda parts: unpack_int32(parts[0], args.num_bits, in_features))
    else:
        decoders["weight_codes"] = ([f"{name}.weight"], first)
    zero = f"{name}.weight_zero_point"
    if zero not in stored:
        decoders["weight_zero_point"] = ([scale], lambda parts: torch.zeros(parts[0].shape, dtype=torch.int8))
    elif packed and args.strategy in ("channel", "group"):
        decoders["weight_zero_point"] = ([zero], lambda parts: unpack_int32(parts[0], args.num_bits, out_features, dim=0))
    else:
        decoders["weight_zero_point"] = ([zero], first)
    input_scale = f"{name}.input_scale"
    if input_scale in stored:
        decoders["input_scale"] = ([input_scale], first)
        input_zero = f"{name}.input_zero_point"
        if input_zero in stored:
            decoders["input_zero_point"] = ([input_zero], first)
        else:
            decoders["input_zero_point"] = ([input_scale], lambda parts: torch.zeros_like(parts[0], dtype=torch.int8))
    return decoders


def _quantized_layer(name: str, linear: nn.Linear, state: dict[str, torch.Tensor], scheme: QuantScheme) -> QuantizedLinear:
    """Rebuild one layer's QuantizedLinear from its checkpoint tensors (taken out of ``state``)."""
    decoders = layer_decoders(name, state, scheme, linear.out_features, linear.in_features)
    held = {attr: decode([state[part] for part in parts]) for attr, (parts, decode) in decoders.items()}
    for part in {part for parts, _ in decoders.values() for part in parts} | {f"{name}.weight_shape"}:
        state.pop(part, None)
    bias = state.get(f"{name}.bias")  # stays in the state: loaded into the layer's own parameter
    return QuantizedLinear(
        scheme, held["weight_codes"], held["weight_scale"], held["weight_zero_point"], bias, held.get("input_scale"),
        held.get("input_zero_point"), compute_dtype=linear.weight.dtype,
    )


def load_quantized(folder: Path, kind: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """A compressed-tensors checkpoint as squeeze evaluates it: every quantized Linear becomes a
    QuantizedLinear holding the stored codes and scales; everything else is loaded as stored.

    A Linear counts as quantized when the checkpoint holds its ``weight_scale``.
    """
    folder = Path(folder)
    scheme = quantization_scheme(folder)
    if scheme is None:
        raise SqueezeError(f"{folder} is not a compressed-tensors quantized checkpoint")
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = read_safetensors_folder(folder)
    with no_init_weights():  # every tensor is overwritten from the checkpoint
        model = auto_class(kind).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    as_linear_layers(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.weight_scale" in state:
            layer = _quantized_layer(name, module, state, scheme)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    state = to_held_layout(model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    distinct = {n for n, _ in model.named_parameters()}
    missing = [k for k in missing if k in distinct and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise SqueezeError(
            f"quantized checkpoint {folder} does not match its config: "
            + (f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}")
        )
    return model.eval().requires_grad_(False)


@QUANTIZED_FORMATS.register
class CompressedTensors(QuantizedFormat):
    """compressed-tensors pack-quantized / int-quantized: read by transformers and vLLM, and by
    squeeze itself (the layers compute exactly what the pass evaluated)."""

    name = "compressed-tensors"
    transposed_refusal = "compressed-tensors quantizes Linear layers only, so transformers would load them uninitialised"
    summary = "compressed-tensors (transformers, vLLM)"
    records_sparsity = True

    def describe(self, scheme: QuantScheme) -> str:
        return f"compressed-tensors ({scheme.checkpoint_format})"

    def drops_weight(self, scheme: QuantScheme) -> bool:
        return scheme.checkpoint_format == "pack-quantized"

    def check_model(self, model: nn.Module, layers: list[str], scheme: QuantScheme) -> None:
        super().check_model(model, layers, scheme)
        everything = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        experts = expert_layers(model, everything)
        packed = scheme.checkpoint_format == "pack-quantized" and scheme.weights.symmetric
        dense = [n for n in experts if n not in set(layers)]
        if experts and (dense or not packed):
            why = f"{literal(dense[0])} would stay dense" if dense else f"{literal(experts[0])} would be {literal(scheme.describe())}"
            raise OptionError(
                "transformers loads the mixture-of-experts layers of a compressed-tensors checkpoint only packed and symmetric "
                f"(weight-only, no zero points, every expert quantized), and {why}; quantize every expert's weights only, "
                "without {0}",
                "asym",
            )

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        return quantized_tensors(name, layer)  # type: ignore[arg-type]

    def _write(
        self, model: nn.Module, scheme: QuantScheme, ignored: list[str], out_dir: Path, tokenizer, dtype: torch.dtype | None,
        method: dict, sparsity: Sparsity | None, max_shard_bytes: int,
    ) -> Written:
        # the codes, zeros included, are stored dense; the sparsity_config says which layers are sparse
        sparse = sparsity_config("dense", *sparsity) if sparsity is not None else None
        return Written(write_checkpoint(model, scheme, ignored, out_dir, tokenizer, dtype, sparse, max_shard_bytes), [])

    def recognises(self, folder: Path) -> bool:
        return Path(folder).is_dir() and is_quantized_config(read_config(folder))

    def read(self, folder: Path, kind: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
        return load_quantized(folder, kind, dtype, trust_remote_code)
