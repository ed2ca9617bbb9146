"""Write weight-only quantized models in the GPTQ checkpoint layout (AutoGPTQ / GPTQModel).

Per quantized Linear ``name`` the checkpoint holds, with ``p = 32 / bits`` codes per int32 word:

- ``name.qweight`` int32 ``[in / p, out]``: unsigned codes ``q = code + 2^(bits-1)`` packed along
  the *input* dimension, element 0 in the lowest bits;
- ``name.qzeros`` int32 ``[groups, out / p]``: unsigned zero points packed along the output
  dimension; format ``gptq`` (v1) stores ``zero - 1``, format ``gptq_v2`` the zero itself;
- ``name.scales`` float16 ``[groups, out]`` and ``name.g_idx`` int32 ``[in]`` (group of each input);
- ``name.bias`` when the layer has one.

The weight is ``scales[g_idx[i], j] · (q[i, j] − zero[g_idx[i], j])``: the same numbers as
squeeze's codes, scales and zero points, only laid out differently. A per-channel scheme is one
group spanning the input (``group_size: -1``). v1 cannot store a zero point of 0, which an
asymmetric group whose minimum rounds to zero needs; such a model is written as ``gptq_v2``
(read by GPTQModel and optimum, not by the retired AutoGPTQ) and the report says so.

``config.json`` and ``quantize_config.json`` carry ``quant_method: gptq`` with bits, group size,
``sym``, ``desc_act: false`` (squeeze's act-order keeps groups contiguous, so ``g_idx`` stays
ordered) and ``modules_in_block_to_quantize`` when some Linear layers of the blocks are left in
full precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from squeeze import __version__
from squeeze.calib.blocks import block_list, is_encoder_decoder
from squeeze.errors import SqueezeError
from squeeze.formats.base import QUANTIZED_FORMATS, QuantizedFormat, Sparsity, Written
from squeeze.formats.files import MAX_SHARD_BYTES, dense_tensors, save_safetensors, write_config_files
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.pack import pack_int32
from squeeze.quant.scheme import QuantScheme

GPTQ_BITS = (2, 4, 8)  # widths whose codes fill int32 words exactly (3-bit GPTQ packs differently)


def check_gptq_scheme(scheme: QuantScheme) -> None:
    """Raise SqueezeError if ``scheme`` has no GPTQ-format equivalent."""
    args = scheme.weights
    if scheme.input_activations is not None:
        raise SqueezeError("--format gptq stores weight-only schemes; drop --act or use --format compressed-tensors")
    if args.num_bits not in GPTQ_BITS:
        raise SqueezeError(f"--format gptq stores {', '.join(map(str, GPTQ_BITS))}-bit weights, not {args.num_bits}-bit")
    if args.strategy == "tensor":
        raise SqueezeError("--format gptq has per-channel or per-group scales; use --mode per-channel or per-group")
    if args.scale_dtype != "float16":
        raise SqueezeError(f"--format gptq stores float16 scales, not {args.scale_dtype}; use --scale-dtype auto or float16")


def _group_size(scheme: QuantScheme) -> int:
    return scheme.weights.group_size if scheme.weights.strategy == "group" else -1  # type: ignore[return-value]


def gptq_tensors(name: str, layer: QuantizedLinear, version: str = "gptq") -> dict[str, torch.Tensor]:
    """One layer's GPTQ tensors. ``version`` is ``gptq`` (v1, zero − 1 stored) or ``gptq_v2``."""
    args = layer.scheme.weights
    bits = args.num_bits
    scale = layer.weight_scale.reshape(layer.out_features, -1)
    zero = layer.weight_zero_point.reshape(layer.out_features, -1).to(torch.int64)
    stored_zero = zero - 1 if version == "gptq" else zero  # signed codes: pack_int32 adds 2^(bits-1)
    if int(stored_zero.min()) < args.qmin:
        raise ValueError(f"{name}: a zero point of 0 cannot be stored in GPTQ v1; write gptq_v2")
    group_size = args.group_size if args.strategy == "group" else layer.in_features
    out = {
        f"{name}.qweight": pack_int32(layer.weight_codes, bits).t().contiguous(),
        f"{name}.qzeros": pack_int32(stored_zero.t().contiguous().to(torch.int8), bits),
        f"{name}.scales": scale.t().to(torch.float16).contiguous(),
        f"{name}.g_idx": (torch.arange(layer.in_features) // group_size).to(torch.int32),
    }
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach()
    return out


def _needs_v2(layer: QuantizedLinear) -> bool:
    return int(layer.weight_zero_point.min()) <= layer.scheme.weights.qmin


def gptq_version(model: nn.Module) -> str:
    """``gptq`` (v1) unless some zero point is 0 (unsigned), which only ``gptq_v2`` can store."""
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear) and _needs_v2(layer):
            return "gptq_v2"
    return "gptq"


def check_gptq_layers(model: nn.Module, names: list[str], bits: int) -> list[str]:
    """The quantized layers' names relative to a block, the same in every block; raise SqueezeError
    when GPTQ loaders could not place them (a layer outside the blocks, blocks that differ) or
    when a layer's sides do not fill whole int32 words of ``bits``-bit codes, or the model has two
    stacks of blocks (GPTQ loaders place one)."""
    if is_encoder_decoder(model):
        raise SqueezeError(
            f"--format gptq describes one stack of blocks and {type(model).__name__} has an encoder and a decoder; "
            "use --format compressed-tensors"
        )
    prefix, blocks = block_list(model)
    outside = [n for n in names if not n.startswith(prefix + ".")]
    if outside:
        raise SqueezeError(
            f"--format gptq quantizes Linear layers inside the transformer blocks only, not {', '.join(outside)}; "
            "add --ignore for them or use --format compressed-tensors"
        )
    per_word = 32 // bits
    for name in names:
        layer = model.get_submodule(name)
        if layer.in_features % per_word or layer.out_features % per_word:
            raise SqueezeError(
                f"--format gptq packs {per_word} codes per int32 word: {name} is {layer.out_features}x{layer.in_features}, "
                f"not a multiple of {per_word}; use --format compressed-tensors"
            )
    per_block: dict[int, set[str]] = {}
    for name in names:
        index, _, rest = name[len(prefix) + 1 :].partition(".")
        per_block.setdefault(int(index), set()).add(rest)
    sets = {frozenset(s) for s in per_block.values()}
    if len(sets) > 1 or len(per_block) != len(blocks):
        raise SqueezeError(
            "--format gptq needs the same Linear layers quantized in every block; adjust --target/--ignore "
            "or use --format compressed-tensors"
        )
    return sorted(next(iter(sets)))


def quantize_config(model: nn.Module, scheme: QuantScheme, version: str, method: dict) -> dict:
    """The ``quantization_config`` GPTQ loaders read (also written as quantize_config.json)."""
    prefix, blocks = block_list(model)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    chosen = check_gptq_layers(model, quantized, scheme.weights.num_bits)
    inside = [n for n, m in blocks[0].named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    config = {
        "quant_method": "gptq",
        "bits": scheme.weights.num_bits,
        "group_size": _group_size(scheme),
        "desc_act": False,
        "sym": scheme.weights.symmetric,
        "lm_head": False,
        "true_sequential": bool(method.get("true_sequential", False)),
        "damp_percent": method.get("damp_percent", 0.01),
        "format": version,
        "checkpoint_format": version,
        "block_name_to_quantize": prefix,
        "meta": {"quantizer": [f"squeeze:{__version__}"], "method": method.get("method", "rtn")},
    }
    if len(chosen) != len(inside):
        config["modules_in_block_to_quantize"] = [chosen]
    return config


def write_gptq_checkpoint(
    model: nn.Module,
    scheme: QuantScheme,
    out_dir: Path,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    method: dict | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> tuple[list[Path], str]:
    """Save ``model`` in the GPTQ layout (shards of at most ``max_shard_bytes``); returns the
    safetensors files and the format version written."""
    check_gptq_scheme(scheme)
    version = gptq_version(model)
    config = quantize_config(model, scheme, version, method or {})
    state: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear):
            state.update(gptq_tensors(name, layer, version))
    state.update(dense_tensors(model, dtype, skip=QuantizedLinear))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config_files(model, out_dir, config, tokenizer, dtype)
    (out_dir / "quantize_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return save_safetensors(state, out_dir, max_shard_bytes), version


@QUANTIZED_FORMATS.register
class Gptq(QuantizedFormat):
    """The GPTQ layout (see the module docstring), read by GPTQModel and transformers + optimum."""

    name = "gptq"
    summary = "gptq (GPTQModel, transformers + optimum)"
    suffix = "-gptq"

    def check(self, scheme: QuantScheme, method: str) -> None:
        check_gptq_scheme(scheme)

    def drops_weight(self, scheme: QuantScheme) -> bool:
        return True

    def check_model(self, model: nn.Module, layers: list[str], scheme: QuantScheme) -> None:
        super().check_model(model, layers, scheme)
        check_gptq_layers(model, layers, scheme.weights.num_bits)

    def describe(self, scheme: QuantScheme) -> str:
        return "GPTQ (qweight/qzeros/scales/g_idx)"

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        """One layer's tensors, as v1 unless its zero points need v2 (the layouts have the same sizes)."""
        return gptq_tensors(name, layer, "gptq_v2" if _needs_v2(layer) else "gptq")  # type: ignore[arg-type]

    def _write(
        self, model: nn.Module, scheme: QuantScheme, ignored: list[str], out_dir: Path, tokenizer, dtype: torch.dtype | None,
        method: dict, sparsity: Sparsity | None, max_shard_bytes: int,
    ) -> Written:
        files, version = write_gptq_checkpoint(model, scheme, out_dir, tokenizer, dtype, method, max_shard_bytes)
        notes = []
        if version == "gptq_v2":
            notes.append(
                "written as gptq_v2: some group's zero point is 0, which GPTQ v1 cannot store; "
                "GPTQModel and transformers + optimum read it, AutoGPTQ does not"
            )
        return Written(files, notes)
